"""MLflow as a cluster would run it: an ``mlflow server`` with a SQL backend and a proxied artifact store,
reached over HTTP by the training driver and its Ray Train worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MICRO_OVERRIDES
from tests.ray_nodes import free_ports

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` on a free 127.0.0.1 port: SQLite backend, artifacts served from a local folder."""
    import requests

    (port,) = free_ports(1)
    artifacts = tmp_path / "mlflow-artifacts"
    log = tmp_path / "mlflow-server.log"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts",
           "--artifacts-destination", str(artifacts)]
    with open(log, "wb") as fh:  # its own session: the server's worker processes are stopped as a group
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.slow
def test_training_logs_to_an_mlflow_server_over_http(micro_world, tmp_path, ray_local, mlflow_server):
    from mlflow.tracking import MlflowClient

    from craft_ray import train

    url, artifacts = mlflow_server
    rc = train.main([f"tiny_world={micro_world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}",
                     f"output_dir={tmp_path / 'runs'}", f"ray.storage_path={tmp_path / 'ray'}",
                     f"tracking.tracking_uri={url}", "name=t-server", "stage=sft", "train.sft_steps=3",
                     "train.num_workers=1", "train.eval_every=3", "cas.use_judge=false"])
    assert rc == 0
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("craft_ray")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # artifacts go through the server
    (run,) = client.search_runs([exp.experiment_id], "tags.`craft_ray.name` = 't-server'")
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "sft"
    # metrics logged by the Ray Train worker, artifacts by worker and driver, all over HTTP
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert "eval/ood_cas" in run.data.metrics
    lora = client.download_artifacts(run.info.run_id, "lora", str(tmp_path / "back"))
    assert (Path(lora) / "pytorch_lora_weights.safetensors").stat().st_size > 0
    config = client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path / "back"))
    assert f"tracking_uri: {url}" in Path(config).read_text()
    # the server stored them in its artifact folder
    assert list(artifacts.rglob("pytorch_lora_weights.safetensors"))
