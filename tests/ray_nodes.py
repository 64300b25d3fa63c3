"""Ray nodes started by a test with ``ray start --block`` and stopped by process id, never with ``ray stop``
(which would end every Ray process on the machine, including other tests' and the user's)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


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


def node_env() -> dict[str, str]:
    """The environment of the nodes and of the clients that talk to them (auth off, one thread, offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is gone; its parent just has not reaped it yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _processes(root_pids: list[int], temp_dir: Path, since: float) -> dict[int, psutil.Process]:
    """Live processes of the nodes: each ``ray start --block`` and its descendants, plus anything whose command
    line names the cluster's temp dir (reparented orphans), started after ``since``, not this one or an ancestor."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for pid in root_pids:
        with contextlib.suppress(psutil.Error):
            roots.append(psutil.Process(pid))
    for p in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(p.info["cmdline"] or ()):
            roots.append(p)
    found: dict[int, psutil.Process] = {}
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


@dataclass
class Cluster:
    """Ray nodes started by a test: the head's GCS port and dashboard (job and state API) URL, the env its
    clients need, and per node the ``ray start`` process (whose descendants are that node's workers)."""

    gcs_port: int
    dashboard: str
    env: dict[str, str]
    temp_dir: Path
    logs: list[Path]
    starters: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def node_of_pid(self, pid: int) -> int | None:
        """Index of the node (0 = head) whose ``ray start`` process is an ancestor of ``pid``, else None."""
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.Error:
            return None
        for i, s in enumerate(self.starters):
            if s.pid in ancestors:
                return i
        return None

    def node_ids(self) -> list[str]:
        """Ray node id of each started node, in start order (matched by the custom resource ``node_<i>``)."""
        from ray.util.state import list_nodes

        by_resource = {}
        for n in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")]):
            for i in range(len(self.starters)):
                if f"node_{i}" in n.resources_total:
                    by_resource[i] = n.node_id
        return [by_resource[i] for i in range(len(self.starters))]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def ray_cluster(tmp_path: Path, node_cpus: list[float], resources: list[dict[str, float]] | None = None,
                timeout_s: float = 120) -> Iterator[Cluster]:
    """A head plus ``len(node_cpus) - 1`` worker nodes on this machine. Node i has ``node_cpus[i]`` CPUs, the
    custom resource ``node_<i>: 1`` and ``resources[i]``. Every process the nodes started is stopped on exit."""
    import requests

    since = time.time() - 1
    resources = resources or [{} for _ in node_cpus]
    # Unix socket paths are limited to ~107 bytes: the session dir must sit under a short root.
    temp_dir = Path(tempfile.mkdtemp(prefix="crh-", dir="/tmp"))
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node, objects = free_ports(9)
    env = node_env()
    common = ["--block", "--object-store-memory=200000000", "--disable-usage-stats", "--temp-dir", str(temp_dir)]

    def res(i: int) -> str:
        return json.dumps({f"node_{i}": 1, **resources[i]})

    head_cmd = [str(VENV_BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
                "--dashboard-host", "127.0.0.1", "--include-dashboard=true", f"--num-cpus={node_cpus[0]:g}",
                f"--resources={res(0)}", "--ray-client-server-port", str(client), "--dashboard-agent-listen-port",
                str(agent), "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
                "--metrics-export-port", str(metrics), "--node-manager-port", str(node), "--object-manager-port",
                str(objects), *common]
    cluster = Cluster(gcs, f"http://127.0.0.1:{dash}", env, temp_dir, [tmp_path / "ray-node-0.log"])
    cluster.starters.append(_start(head_cmd, env, cluster.logs[0]))
    seen: dict[int, psutil.Process] = {}
    try:
        _wait(lambda: requests.get(f"{cluster.dashboard}/api/version", timeout=2).status_code == 200,
              cluster, "the head's dashboard", timeout_s)
        for i in range(1, len(node_cpus)):
            cluster.logs.append(tmp_path / f"ray-node-{i}.log")
            cmd = [str(VENV_BIN / "ray"), "start", "--address", cluster.address, f"--num-cpus={node_cpus[i]:g}",
                   f"--resources={res(i)}", *common]
            cluster.starters.append(_start(cmd, env, cluster.logs[i]))

        def joined() -> bool:
            from ray.util.state import list_nodes

            return len(list_nodes(address=cluster.dashboard, filters=[("state", "=", "ALIVE")])) == len(node_cpus)

        _wait(joined, cluster, "every node to join", timeout_s)
        yield cluster
    finally:
        pids = [s.pid for s in cluster.starters]
        # Collect the whole tree before signalling anything: orphans of a stopped raylet lose their parent.
        for _ in range(3):
            seen.update(_processes(pids, temp_dir, since))
            alive = [p for p in seen.values() if _alive(p)]
            if not alive:
                break
            _stop(alive)
        for s in cluster.starters:
            s.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        left = sorted(_processes(pids, temp_dir, since))
        assert not left, f"processes of the test's Ray nodes still running: {left}"


def _wait(ready, cluster: Cluster, what: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        for s, log in zip(cluster.starters, cluster.logs, strict=True):
            if s.poll() is not None:
                raise AssertionError(f"ray start exited with {s.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if ready():
                return
        except (requests.RequestException, KeyError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}:\n{cluster.logs[-1].read_text()[-3000:]}")
        time.sleep(1)
