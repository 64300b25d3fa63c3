"""Training under failure and under ``ray job submit``: a killed Ray Train worker resumes from its last
checkpoint without counting a step twice, and the driver runs as a Ray job on a head started here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MICRO_OVERRIDES
from tests.ray_nodes import VENV_BIN, Cluster, ray_cluster

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


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[Cluster]:
    """A Ray head (2 CPUs, dashboard, auth disabled) of this test only, stopped by pid in teardown."""
    with ray_cluster(tmp_path, [2]) as cluster:
        yield cluster


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
