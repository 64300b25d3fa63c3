"""Ray Tune sweeps: spec validation, a tiny sweep end to end, ASHA early stopping, resume after a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from craft_ray import sweep
from craft_ray.config import load_config
from craft_ray.errors import UserError
from tests.conftest import MICRO_OVERRIDES, REPO_ROOT


def micro_spec(world: Path, tmp: Path, **changes) -> dict:
    spec = {
        "name": "t",
        "dir": str(tmp / "out"),
        "base": {"overrides": [f"tiny_world={world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp / 'cache'}",
                               f"output_dir={tmp / 'runs'}", f"ray.storage_path={tmp / 'ray'}",
                               f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "train.sft_steps=2",
                               "train.craft_steps=4", "train.eval_every=2", "train.log_every=2",
                               "train.checkpoint_every=2", "train.num_workers=0", "cas.use_judge=false"]},
        "modalities": ["cxr"],
        "search_space": {"weights": {"label": [0.1, 1.0], "checklist": [0.1, 1.0], "modality": [0.1, 1.0],
                                     "realism": [0.0, 0.5]},
                         "params": {"train.craft_lr": {"loguniform": [1e-4, 1e-2]}}},
        "search": {"algorithm": "random", "num_samples": 2, "max_concurrent": 2, "seed": 0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 0.25, "gpu": 0},
        "objective": {"metric": "eval/ood_tail_rate", "mode": "min"},
    }
    for key, value in changes.items():
        node = spec
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return spec


def write_spec(tmp: Path, spec: dict) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "'<top>.bogus' is not a known key"),
        ({"search_space.extra": 1}, "'search_space.extra' is not a known key"),
        ({"search_space.weights.label": [0, 0], "search_space.weights.checklist": [0, 0],
          "search_space.weights.modality": [0, 0], "search_space.weights.realism": [0, 0]}, "cannot be normalised"),
        ({"search_space.weights.label": [0.5, 0.1]}, r"must satisfy 0 <= low <= high"),
        ({"search_space.weights.pixels": [0, 1]}, "'search_space.weights.pixels' is not a known key"),
        ({"search_space.params": {"train.lr_typo": {"uniform": [0, 1]}}}, "unknown config key 'train.lr_typo'"),
        ({"search_space.params": {"train.craft_lr": {"normal": [0, 1]}}}, "must be one of"),
        ({"search.algorithm": "grid"}, "search.algorithm"),
        ({"objective.mode": "up"}, "objective.mode"),
        ({"modalities": ["xray"]}, "unknown modality .xray.*known: cxr, derm, fundus, histo"),
    ],
)
def test_bad_specs_fail_before_any_trial(micro_world, tmp_path, change, message):
    path = write_spec(tmp_path, micro_spec(micro_world, tmp_path, **change))
    with pytest.raises(UserError, match=message):
        spec = sweep.load_spec(path)
        sweep.check_spec_against_config(spec)
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_and_missing_file_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    for args, message in (([str(bad)], "is not valid YAML"), ([str(tmp_path / "nope.yaml")], "not found")):
        out = subprocess.run([sys.executable, "-m", "craft_ray.sweep", *args], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 2
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_impossible_resources_fail_before_any_trial(micro_world, tmp_path, ray_local):
    spec = sweep.parse_spec(micro_spec(micro_world, tmp_path, resources={"cpu": 64, "gpu": 0}))
    with pytest.raises(UserError, match="resources.cpu=64 per trial, but the Ray cluster has 2 CPU"):
        sweep.sweep(spec)
    assert not list((tmp_path / "out").glob("*/results.md"))


def test_shipped_specs_are_valid():
    for name in ("cas_weights.yaml", "cas_weights_gpu.yaml"):
        spec = sweep.load_spec(REPO_ROOT / "sweeps" / name)
        assert spec.metric == "eval/ood_tail_rate" and spec.mode == "min"
    spec = sweep.load_spec(REPO_ROOT / "sweeps" / "cas_weights.yaml")
    assert spec.modalities == ["cxr", "derm", "fundus", "histo"]
    sweep.check_spec_against_config(spec)


def test_trial_config_normalises_weights_onto_the_simplex(micro_world, tmp_path):
    spec = sweep.parse_spec(micro_spec(micro_world, tmp_path))
    cfg = sweep.trial_config(sweep.base_config(spec, "derm"), {"label": 2, "checklist": 1, "modality": 1,
                                                               "realism": 0}, {"train.craft_lr": 0.003})
    assert dict(cfg.reward.weights) == {"label": 0.5, "checklist": 0.25, "modality": 0.25, "realism": 0.0}
    assert cfg.train.craft_lr == 0.003 and cfg.modality == "derm" and cfg.stage == "craft"


# ----------------------------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_tiny_sweep_runs_trials_logs_mlflow_and_writes_a_trainable_best_config(micro_world, tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    spec = sweep.parse_spec(micro_spec(micro_world, tmp_path, modalities=["cxr", "derm"]))
    table = sweep.sweep(spec)
    out = table.parent
    text = table.read_text()
    assert "| cxr |" in text and "| derm |" in text
    for name in ("best.csv", "trials.csv", "objective_vs_weights.png", "trials_over_time.png", "best_cxr.yaml"):
        assert (out / name).is_file(), name
    trials = (out / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2 * 2  # header + num_samples x modalities

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("craft_ray")
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")
    assert {p.data.tags["modality"] for p in parents} == {"cxr", "derm"}
    for parent in parents:
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == 2
        for child in children:
            assert {"reward.weights.label", "train.craft_lr"} <= set(child.data.params)
            weights = [float(child.data.params[f"reward.weights.{d}"]) for d in sweep.DIMENSIONS]
            assert sum(weights) == pytest.approx(1.0)
            assert "eval/ood_tail_rate" in child.data.metrics
        arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"best", "sweep"} <= arts

    best = load_config(str(out / "best_cxr.yaml"))
    assert best.stage == "craft" and best.train.init_lora.endswith("sft")
    run = subprocess.run([sys.executable, "-m", "craft_ray.train", str(out / "best_cxr.yaml"), "--print-config"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.slow
def test_optuna_trials_on_a_torchtrainer_inside_each_trial(micro_world, tmp_path, ray_local):
    """The Train-inside-Tune pattern: with train.num_workers=1 each trial fits a TorchTrainer whose worker
    reports reach Tune (and ASHA) through TuneReportCallback; Optuna proposes the trials."""
    base = micro_spec(micro_world, tmp_path)["base"]["overrides"]
    spec = sweep.parse_spec(micro_spec(micro_world, tmp_path, **{
        "search.algorithm": "optuna", "search.max_concurrent": 1, "resources": {"cpu": 0.25, "gpu": 0},
        "base.overrides": [*base, "train.num_workers=1"]}))
    table = sweep.sweep(spec)
    rows = (table.parent / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 2
    assert all(int(r.split(",")[2]) == 2 for r in rows)  # both evaluations of each trial reached Tune
    assert (table.parent / "best_cxr.yaml").is_file()


@pytest.mark.slow
def test_asha_stops_weak_trials_early(micro_world, tmp_path, ray_local):
    """Learning rates three orders of magnitude apart and the training CAS as objective: ASHA has clear
    losers at its first rung and must stop some of them before the last evaluation."""
    spec = sweep.parse_spec(micro_spec(
        micro_world, tmp_path,
        **{"search_space.params": {"train.craft_lr": {"choice": [1e-6, 0.3]}}, "search.num_samples": 6,
           "search.max_concurrent": 2, "objective.metric": "eval/train_cas", "objective.mode": "max",
           "base.overrides": micro_spec(micro_world, tmp_path)["base"]["overrides"]
           + ["train.craft_steps=8", "reward.beta=0", "train.warmup_steps=0"]}))
    table = sweep.sweep(spec)
    rows = (table.parent / "trials.csv").read_text().splitlines()[1:]
    evaluations = [int(r.split(",")[2]) for r in rows]
    assert len(evaluations) == 6
    assert max(evaluations) == 4 and min(evaluations) < 4  # at least one trial stopped early


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(micro_world, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = micro_spec(micro_world, tmp_path, **{"search.num_samples": 3, "search.max_concurrent": 1,
                                                "scheduler.type": "fifo"})
    path = write_spec(tmp_path, spec)
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def finished_trials() -> list[str]:
        try:
            client = MlflowClient(db)
            exp = client.get_experiment_by_name("craft_ray")
            if exp is None:
                return []
            runs = client.search_runs([exp.experiment_id], "tags.trial_status = 'finished'")
            return sorted(r.data.tags["craft_ray.trial"] for r in runs)
        except Exception:  # the store is being created by the sweep
            return []

    def terminated_in_tune_state() -> set[str]:
        """Trial ids that Tune's own experiment state (what a restore reads) records as TERMINATED."""
        files = sorted((tmp_path / "ray" / "t-cxr").glob("experiment_state-*.json"))
        if not files:
            return set()
        try:
            data = json.loads(files[-1].read_text())
        except ValueError:  # being written
            return set()
        trials = [json.loads(t[0]) for t in data["trial_data"]]
        return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}

    proc = subprocess.Popen([sys.executable, "-m", "craft_ray.sweep", str(path)], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not terminated_in_tune_state():
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.5)
        done_before = terminated_in_tune_state()
        assert done_before, "no trial finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
    assert len(done_before) < 3

    again = subprocess.run([sys.executable, "-m", "craft_ray.sweep", str(path)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the sweep" in again.stdout
    assert finished_trials() == sorted(set(finished_trials())) and len(finished_trials()) == 3
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("craft_ray")
    for run in client.search_runs([exp.experiment_id], "tags.trial_status = 'finished'"):
        if run.data.tags["craft_ray.trial"] in done_before:  # finished before the kill: not trained again
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
            assert steps == sorted(set(steps)), steps
