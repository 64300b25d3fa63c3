"""Training under failure and under ``ray job submit``: a killed Ray Train worker resumes from its last
checkpoint without counting a step twice, and the driver runs as a Ray job on a head started here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import MICRO_OVERRIDES

VENV_BIN = Path(sys.executable).parent
BATCH = 4  # train.batch_size in MICRO_OVERRIDES
ANSI = r"\x1b\[[0-9;]*m"  # colour codes in Ray's CLI output


def micro_args(world: Path, tmp: Path, *extra: str) -> list[str]:
    """CLI overrides for a micro run whose every path is absolute and under ``tmp``."""
    return [f"tiny_world={world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp / 'cache'}", f"output_dir={tmp / 'runs'}",
            f"ray.storage_path={tmp / 'ray'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.artifact_location={tmp / 'artifacts'}", *extra]


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """{step: folder} of the complete checkpoints (state.json readable) of a Ray Train run."""
    found = {}
    for state in run_dir.glob("checkpoint_*/state.json"):
        try:
            found[int(json.loads(state.read_text())["step"])] = state.parent
        except (OSError, ValueError, KeyError):  # still being written
            continue
    return found


# ----------------------------------------------------------------------------------------------- worker killed


@dataclass
class Kill:
    """What the killer thread saw when it killed the worker."""

    pid: int = 0
    step: int = 0  # progress.json step read just before SIGKILL
    time_ms: int = 0
    checkpoints: list[int] = field(default_factory=list)  # checkpoint steps on disk at the kill
    error: BaseException | None = None


def kill_worker_when(progress: Path, run_dir: Path, min_step: int, done: threading.Event, kill: Kill) -> None:
    """Poll ``progress``; once step >= min_step and a checkpoint exists, SIGKILL the pid in it."""
    try:
        while not done.is_set():
            try:
                p = json.loads(progress.read_text())
            except (OSError, ValueError):
                p = None
            ckpts = checkpoint_steps(run_dir)
            if p and p["step"] >= min_step and ckpts:
                kill.pid, kill.step, kill.checkpoints = int(p["pid"]), int(p["step"]), sorted(ckpts)
                kill.time_ms = int(time.time() * 1000)
                os.kill(kill.pid, signal.SIGKILL)
                return
            time.sleep(0.02)
    except BaseException as exc:  # surfaced by the test
        kill.error = exc


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(micro_world, tmp_path, ray_local, capsys):
    import mlflow

    from craft_ray import train, training

    name, total, every = "t-kill", 16, 4
    args = micro_args(micro_world, tmp_path, "stage=sft", f"name={name}", "train.num_workers=1",
                      f"train.sft_steps={total}", f"train.checkpoint_every={every}", "train.eval_every=100",
                      "train.max_failures=2", "cas.use_judge=false")
    run_dir = tmp_path / "ray" / f"{name}-sft"
    progress = tmp_path / "runs" / name / "sft" / "progress.json"
    kill, done = Kill(), threading.Event()
    killer = threading.Thread(target=kill_worker_when, args=(progress, run_dir, 10, done, kill), daemon=True)
    killer.start()
    t0 = time.time()
    try:
        rc = train.main(args)
    finally:
        done.set()
        killer.join(5)
    out = capsys.readouterr().out
    assert kill.error is None, kill.error
    assert kill.pid, f"the run finished before step 10 with a checkpoint was seen; driver output:\n{out[-3000:]}"
    assert rc == 0

    final = training.read_progress(tmp_path / "runs" / name, "sft")
    assert final["step"] == total and final["pid"] != kill.pid  # a new worker finished the stage

    ckpts = checkpoint_steps(run_dir)
    state = json.loads((ckpts[max(ckpts)] / "state.json").read_text())
    assert state["step"] == total and state["images_seen"] == total * BATCH  # no step counted twice

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("craft_ray")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`craft_ray.name` = '{name}' and tags.stage = 'sft'")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    before = sorted((m.step, m.value) for m in history if m.timestamp <= kill.time_ms)
    after = sorted((m.step, m.value) for m in history if m.timestamp > kill.time_ms)
    steps_before, steps_after = [s for s, _ in before], [s for s, _ in after]
    # The killed worker logged 1..n once each; the new one logged resume+1..total once each.
    assert steps_before == list(range(1, len(before) + 1)) and kill.step - 1 <= len(before) <= kill.step + 1
    resume = steps_after[0] - 1
    assert steps_after == list(range(resume + 1, total + 1))
    assert {m.step for m in history} == set(range(1, total + 1))
    # It resumed from a checkpoint that was on disk, and from the newest one Ray Train had registered:
    # a report returns only after the previous one was taken, so every checkpoint <= kill step - 2 was.
    assert resume % every == 0 and resume in kill.checkpoints, (resume, kill)
    assert resume >= max(c for c in kill.checkpoints if c <= kill.step - 2), (resume, kill)
    # Only the steps between that checkpoint and the kill ran twice, and they ran identically.
    twice = sorted(set(steps_before) & set(steps_after))
    assert twice == list(range(resume + 1, len(before) + 1))
    assert len(twice) <= kill.step + 1 - resume
    first, again = dict(before), dict(after)
    for s in twice:
        assert again[s] == pytest.approx(first[s], rel=1e-5, abs=1e-7), s
    resumed_ms = min(m.timestamp for m in history if m.timestamp > kill.time_ms)
    print(f"killed pid {kill.pid} at step {kill.step} after {kill.time_ms / 1000 - t0:.0f} s (checkpoints on disk "
          f"{kill.checkpoints}); resumed from step {resume}, first step again {(resumed_ms - kill.time_ms) / 1000:.0f} s "
          f"after the kill; re-executed {twice}; run {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------- ray job submit


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    """A Ray head started by a test: GCS port, dashboard (job API) URL, the env its clients need."""

    gcs_port: int
    dashboard: str
    env: dict[str, str]
    temp_dir: Path
    log: Path


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is gone; its parent just has not reaped it yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _head_processes(root_pid: int, temp_dir: Path, since: float) -> dict[int, psutil.Process]:
    """The head's live processes: ``ray start --block`` and its descendants, plus anything whose command line
    names the head's temp dir (reparented orphans), started after ``since`` and not this one or an ancestor."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    roots = []
    with contextlib.suppress(psutil.Error):
        roots.append(psutil.Process(root_pid))
    for p in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(p.info["cmdline"] or ()):
            roots.append(p)
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in [root, *root.children(recursive=True)]})
    out = {}
    for pid, p in found.items():
        with contextlib.suppress(psutil.Error):
            if pid not in mine and p.create_time() >= since and _alive(p):
                out[pid] = p
    return out


def _stop(procs: list[psutil.Process]) -> None:
    """SIGTERM the given processes, wait, SIGKILL the survivors (Ray's GCS can linger on SIGTERM)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.2)
    for p in procs:
        if _alive(p):
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[Head]:
    """A Ray head (2 CPUs, dashboard, auth disabled) of this test only, stopped by pid in teardown."""
    import requests

    since = time.time() - 1
    # Unix socket paths are limited to ~107 bytes: the session dir must sit under a short root.
    temp_dir = Path(tempfile.mkdtemp(prefix="crh-", dir="/tmp"))
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node, objects = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    log = tmp_path / "ray-head.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
           "--dashboard-host", "127.0.0.1", "--include-dashboard=true",
           "--num-cpus=2", "--object-store-memory=300000000", "--disable-usage-stats", "--temp-dir", str(temp_dir),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(node),
           "--object-manager-port", str(objects)]
    with open(log, "wb") as fh:
        starter = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    head = Head(gcs, f"http://127.0.0.1:{dash}", env, temp_dir, log)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            seen.update(_head_processes(starter.pid, temp_dir, since))
            if starter.poll() is not None:
                raise AssertionError(f"ray start exited with {starter.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{head.dashboard}/api/version", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the head's job API did not answer in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield head
    finally:
        # Collect the whole tree before signalling anything: orphans of a stopped raylet lose their parent.
        for _ in range(3):
            seen.update(_head_processes(starter.pid, temp_dir, since))
            alive = [p for p in seen.values() if _alive(p)]
            if not alive:
                break
            _stop(alive)
        starter.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        left = sorted(_head_processes(starter.pid, temp_dir, since))
        assert not left, f"processes of the test's Ray head still running: {left}"


@pytest.mark.slow
def test_ray_job_submit_runs_the_sft_stage_on_the_given_head(micro_world, tmp_path, ray_head):
    import mlflow

    name = "t-job"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "experiment.yaml").write_text(f"name: {name}\nmodality: cxr\ntrain:\n  sft_steps: 3\n")
    entry = ["python", "-m", "craft_ray.train", "experiment.yaml",
             *micro_args(micro_world, tmp_path, "stage=sft", "cas.use_judge=false")]
    job_id = f"craft-ray-test-{os.getpid()}-{int(time.time())}"
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id,
         "--working-dir", str(job_dir), "--", *entry],
        env=ray_head.env, capture_output=True, text=True, timeout=420)
    logs = re.sub(ANSI, "", submit.stdout + submit.stderr)
    status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", ray_head.dashboard, job_id],
                            env=ray_head.env, capture_output=True, text=True, timeout=60)
    (tmp_path / "job.log").write_text(logs)
    said = re.sub(ANSI, "", status.stdout)
    assert submit.returncode == 0 and f"Job '{job_id}' succeeded" in said, f"{said}\n{logs[-5000:]}"
    # The job's driver joined this head (RAY_ADDRESS set by the job), not another Ray on the machine.
    assert re.search(rf"Using address [\w.]+:{ray_head.gcs_port} set in the environment variable RAY_ADDRESS", logs), logs[-3000:]
    connected = rf"Connected to Ray cluster\. View the dashboard at {re.escape(ray_head.dashboard)}"
    assert re.search(connected, logs), logs[-3000:]
    assert "[sft] finished in" in logs, logs[-3000:]

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("craft_ray")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`craft_ray.name` = '{name}' and tags.stage = 'sft'")
    assert run.info.status == "FINISHED" and run.data.tags["modality"] == "cxr"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert json.loads((tmp_path / "runs" / name / "sft" / "progress.json").read_text())["step"] == 3
