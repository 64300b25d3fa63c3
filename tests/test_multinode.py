"""Two Ray nodes on one machine (a head and a worker started by the test with ``ray start``): a 2-worker
training whose workers land on different nodes, checkpointing to a shared storage path, and a sweep trial
placed on the second node by a custom resource."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MICRO_OVERRIDES
from tests.ray_nodes import ray_cluster

pytestmark = pytest.mark.slow


def micro_args(world: Path, tmp: Path, *extra: str) -> list[str]:
    return [f"tiny_world={world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp / 'cache'}", f"output_dir={tmp / 'runs'}",
            f"ray.storage_path={tmp / 'shared'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "cas.use_judge=false", *extra]


def run_driver(cluster, *args: str, timeout: int = 420) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", *args], env={**cluster.env, "RAY_ADDRESS": cluster.address},
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return out


def actors_by_node(cluster) -> dict[str, list]:
    from ray.util.state import list_actors

    out: dict[str, list] = {}
    for a in list_actors(address=cluster.dashboard, detail=True, limit=10_000, raise_on_missing_output=False):
        out.setdefault(a.node_id, []).append(a)
    return out


def test_two_nodes_training_and_a_sweep_trial_on_the_second_node(micro_world, tmp_path):
    # 1 CPU per node; one train_slot per node forces one Train worker per node; only node 1 runs sweep trials.
    with ray_cluster(tmp_path, [1, 1], [{"train_slot": 1}, {"train_slot": 1, "sweep_slot": 1}]) as cluster:
        head, second = cluster.node_ids()

        run_driver(cluster, "craft_ray.train", *micro_args(
            micro_world, tmp_path, "name=t-2nodes", "stage=sft", "train.sft_steps=4", "train.checkpoint_every=2",
            "train.num_workers=2", "train.cpus_per_worker=0.25", "train.worker_resources={train_slot: 1}",
            "train.eval_every=100"))
        workers = [a for node in actors_by_node(cluster).values() for a in node if a.class_name == "RayTrainWorker"]
        assert {a.node_id for a in workers} == {head, second}, [(a.node_id, a.state) for a in workers]
        ckpts = sorted((tmp_path / "shared" / "t-2nodes-sft").glob("checkpoint_*/state.json"))
        assert ckpts and json.loads(ckpts[-1].read_text())["step"] == 4
        # the global batch is both workers' batches: 4 steps x 2 workers x batch 4
        assert json.loads(ckpts[-1].read_text())["images_seen"] == 4 * 2 * 4

        spec = {
            "name": "t-mn", "dir": str(tmp_path / "sweeps"), "modalities": ["cxr"],
            "base": {"overrides": micro_args(micro_world, tmp_path, "train.sft_steps=2", "train.craft_steps=2",
                                             "train.eval_every=2", "train.checkpoint_every=2",
                                             "train.num_workers=0")},
            "search_space": {"weights": {"label": [0.1, 1.0], "checklist": [0.1, 1.0], "modality": [0.1, 1.0],
                                         "realism": [0.0, 0.5]}},
            "search": {"algorithm": "random", "num_samples": 1, "max_concurrent": 1, "seed": 0},
            "scheduler": {"type": "fifo"},
            "resources": {"cpu": 0.25, "gpu": 0, "custom": {"sweep_slot": 1}},
        }
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        before = {a.actor_id for node in actors_by_node(cluster).values() for a in node}
        run_driver(cluster, "craft_ray.sweep", str(tmp_path / "spec.yaml"))
        assert len((tmp_path / "sweeps" / "t-mn" / "trials.csv").read_text().splitlines()) == 2
        new = {node: [a for a in actors if a.actor_id not in before] for node, actors in actors_by_node(cluster).items()}
        # the trial (its actor runs the CRAFT loop in process: train.num_workers=0) ran on node 1, not the head
        trial_classes = {a.class_name for a in new.get(second, [])}
        assert trial_classes, {n: [a.class_name for a in v] for n, v in new.items()}
        assert not [a for a in new.get(head, []) if a.class_name in trial_classes], trial_classes
