"""MLflow conventions: one experiment, a parent run per ``stage=all`` invocation, a child run per stage.

Runs carry the tags ``craft_ray.name`` (the run name, which is also the resume key), ``modality`` and
``stage``; rerunning with the same name finds and continues the same MLflow runs. The driver creates
the runs (:func:`stage_runs`); rank 0 of the training workers logs into its stage's run through a
:class:`StageTracker` (an ``MlflowClient`` bound to a run id, so no global active-run state crosses
process boundaries).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from craft_ray.errors import UserError

NAME_TAG = "craft_ray.name"


def client(tracking_uri: str):
    """An MlflowClient for ``tracking_uri``; the plain ``file:`` store (refused by MLflow 3) is an error."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        raise UserError(
            f"tracking.tracking_uri={tracking_uri!r}: MLflow 3 refuses the plain file store; use an absolute "
            "sqlite:////path/mlflow.db or an http(s):// MLflow server"
        )
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(cfg: Any) -> str:
    """The id of ``tracking.experiment``, created (with ``tracking.artifact_location``) when missing."""
    c = client(cfg.tracking.tracking_uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(cfg.tracking.experiment, artifact_location=cfg.tracking.artifact_location)


def _find_or_create(c, exp_id: str, run_name: str, tags: Mapping[str, str]) -> tuple[str, bool]:
    """(run id, created): the newest run carrying every one of ``tags``, else a new run with them."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([exp_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        return runs[0].info.run_id, False
    return c.create_run(exp_id, run_name=run_name, tags=dict(tags)).info.run_id, True


def stage_runs(cfg: Any, stages: tuple[str, ...]) -> dict[str, str]:
    """Run ids for ``cfg.stage`` and its stages: {"parent": id (stage=all only), "sft": id, "craft": id, ...}.

    Existing runs of the same name are reused (a rerun resumes them); new ones are created with the
    tags and the resolved config as parameters.
    """
    from craft_ray.config import flatten

    c = client(cfg.tracking.tracking_uri)
    exp_id = experiment_id(cfg)
    name = str(cfg.name)
    tags = {NAME_TAG: name, "modality": str(cfg.modality)}
    ids: dict[str, str] = {}
    parent = None
    if len(stages) > 1:
        parent, _ = _find_or_create(c, exp_id, name, {**tags, "stage": str(cfg.stage)})
        ids["parent"] = parent
    for stage in stages:
        extra = {"mlflow.parentRunId": parent} if parent else {}
        ids[stage], _ = _find_or_create(c, exp_id, f"{name}-{stage}", {**tags, "stage": stage, **extra})
    params = {k: str(v)[:500] for k, v in flatten(cfg).items()}
    for run_id in ids.values():
        existing = c.get_run(run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        _log_params(c, run_id, new)
    return ids


def _log_params(c, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


class StageTracker:
    """Logging into one MLflow run by id (used by rank 0 of a training stage and by the driver)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = client(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 200):
            self.client.log_batch(self.run_id, metrics=items[i:i + 200])

    def log_image(self, image, path: str) -> None:
        """An RGB uint8 array [H,W,3] as a PNG at ``path`` in the run's artifacts."""
        self.client.log_image(self.run_id, image, path)

    def log_artifact(self, local: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local), artifact_path)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_dict(self, data: Any, path: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value[:5000])

    def finish(self, state: Any = None) -> None:
        """Tag the stage result (steps done, early stop) on the run; the run stays open for reruns."""
        if state is not None:
            self.set_tag("steps_done", str(state.step))
            if getattr(state, "stopped_early", None):
                self.set_tag("stopped_early", state.stopped_early)


def end_runs(tracking_uri: str, run_ids: Mapping[str, str], status: str = "FINISHED") -> None:
    """Mark runs terminated (FINISHED or FAILED)."""
    c = client(tracking_uri)
    for run_id in run_ids.values():
        c.set_terminated(run_id, status)


def sweep_parent_run(cfg: Any, sweep_name: str, modality: str) -> str:
    """The parent run of one sweep and modality (tags ``craft_ray.sweep``, ``modality``, ``stage=sweep``)."""
    tags = {"craft_ray.sweep": sweep_name, "modality": modality, "stage": "sweep", NAME_TAG: f"{sweep_name}-{modality}"}
    return _find_or_create(client(cfg.tracking.tracking_uri), experiment_id(cfg), f"{sweep_name}-{modality}", tags)[0]


def trial_run(cfg: Any, parent: str, trial: str, params: Mapping[str, Any]) -> str:
    """The child run of one Tune trial under ``parent`` (reused when the trial is resumed), params logged."""
    c = client(cfg.tracking.tracking_uri)
    tags = {"mlflow.parentRunId": parent, "craft_ray.trial": trial, "stage": "craft", "modality": str(cfg.modality),
            NAME_TAG: f"{cfg.name}-{trial}"}
    run_id, created = _find_or_create(c, experiment_id(cfg), trial, tags)
    if created:
        _log_params(c, run_id, {k: str(v) for k, v in params.items()})
    return run_id
