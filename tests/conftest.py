"""Shared fixtures: one local Ray instance per test session, one MLflow SQLite store per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Torch threads busy-wait when the other core is loaded; one thread per process on the 2-core CI box.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach a model hub; hub ids must fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """A real local Ray instance (2 CPUs, no dashboard, object store sized for a 24 GiB machine)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=500_000_000,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
                                  # Ray Train reports wait for the controller's poll (default every 2 s).
                                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow tracking store for this test: an absolute sqlite:/// URI (MLflow 3 refuses file:)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


# Data and training settings that make a whole SFT + CRAFT run take seconds on the micro world.
MICRO_OVERRIDES = [
    "data.size=32", "model.resolution=32", "data.n_train=48", "data.n_val=8", "data.n_test=48",
    "sampling.num_steps=3", "train.batch_size=4", "train.torch_threads=1", "train.cpus_per_worker=0.25",
    "train.eval_images_per_label=2", "train.final_images_per_label=4", "train.log_every=1", "train.warmup_steps=1",
    "cas.bootstrap=50", "judges.replica_cpus=0.1", "model.gradient_checkpointing=false",
]


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-world folder (diffusion, evaluator_vit, evaluator_conv, judge) of random micro models at 32 px.

    Same on-disk formats and loading code as the shipped tiny world, built in seconds; use it with
    ``tiny_world=<folder>`` plus :data:`MICRO_OVERRIDES`.
    """
    from craft_ray.models.diffusion import make_tiny_pipeline
    from craft_ray.models.evaluators import make_tiny_evaluator
    from craft_ray.models.tiny_judge import make_tiny_judge

    root = tmp_path_factory.mktemp("micro_world")
    make_tiny_pipeline(root / "diffusion", sample_size=8, vae_channels=(16, 32, 32))
    make_tiny_evaluator(root / "evaluator_vit", "vit", seed=0, image_size=32, bpe_merges=2000)
    make_tiny_evaluator(root / "evaluator_conv", "convnet", seed=1, image_size=32, bpe_merges=2000)
    make_tiny_judge(root / "judge", seed=0)
    return root
