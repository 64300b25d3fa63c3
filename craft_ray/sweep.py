"""``python -m craft_ray.sweep SPEC.yaml``: Ray Tune sweeps of the CAS reward weights across modalities.

A sweep spec (``sweeps/cas_weights.yaml`` is the embedded default) names a base experiment (config
file + overrides), the modalities, a search space over the reward weights (positive values drawn
per dimension, then normalised onto the simplex) and other config keys, the search algorithm
(random or Optuna), the ASHA scheduler, trial resources and the objective. For each modality:

1. the SFT LoRA is trained once (stage ``sft``, run name ``<sweep>-<modality>``; reused when done);
2. a Tune experiment runs the CRAFT stage per trial from that LoRA (in the trial's process with
   ``train.num_workers=0``, else a ``TorchTrainer`` inside the trial), reporting at every
   evaluation so ASHA can stop weak trials early;
3. the best trial's config is written as a YAML that ``python -m craft_ray.train`` accepts as is.

The objective defaults to the out-of-family evaluator's tail rate (min), so the sweep never optimises
the score it trains on. Rerunning the same command after the driver died continues the sweep
(``Tuner.restore``): finished trials are not rerun. Results (Markdown + CSV table, plots, best
configs) go under ``<sweep.dir>/<name>/`` and to MLflow (a parent run per sweep and modality, a
child run per trial).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from craft_ray.cas import DIMENSIONS, normalise_weights
from craft_ray.cli import Parser, run
from craft_ray.config import load_config, to_yaml
from craft_ray.errors import UserError, one_of
from craft_ray.modalities import MODALITY_NAMES

EPILOG = """examples:
  python -m craft_ray.sweep sweeps/cas_weights.yaml                 # embedded default: 4 phantom modalities
  python -m craft_ray.sweep sweeps/cas_weights.yaml modalities=[cxr] search.num_samples=2
  python -m craft_ray.sweep sweeps/cas_weights_gpu.yaml             # template for a GPU cluster
"""

DISTRIBUTIONS = ("uniform", "loguniform", "choice")
SPEC_KEYS = {"name", "dir", "base", "modalities", "search_space", "search", "scheduler", "resources", "objective",
             "time_budget_s"}


# ----------------------------------------------------------------------------------------------- the spec


@dataclass
class SweepSpec:
    """A validated sweep spec (see ``sweeps/cas_weights.yaml`` for every field with comments)."""

    name: str
    dir: str
    base_config: str | None
    base_overrides: list[str]
    modalities: list[str]
    weights: dict[str, tuple[float, float]]  # dimension -> (low, high) of the positive value drawn, then normalised
    params: dict[str, dict[str, Any]]  # config key -> {uniform|loguniform: [lo, hi]} or {choice: [...]}
    algorithm: str = "random"
    num_samples: int = 4
    max_concurrent: int = 2
    seed: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    metric: str = "eval/ood_tail_rate"
    mode: str = "min"
    time_budget_s: float | None = None
    source: str = "<spec>"


def _fail(source: str, key: str, problem: str) -> UserError:
    return UserError(f"sweep spec {source!r}: '{key}' {problem}")


def _mapping(value: Any, source: str, key: str, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, key, f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _fail(source, f"{key}.{unknown[0]}", f"is not a known key; known: {', '.join(sorted(allowed))}")
    return value


def _range(value: Any, source: str, key: str) -> tuple[float, float]:
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)):
        raise _fail(source, key, f"must be [low, high] with two finite numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not 0 <= lo <= hi:
        raise _fail(source, key, f"must satisfy 0 <= low <= high, got [{lo}, {hi}]")
    return lo, hi


def parse_spec(data: Any, source: str = "<spec>", overrides: list[str] | None = None) -> SweepSpec:
    """Validate a loaded spec (plus ``key=value`` overrides of it); errors name the key and the problem."""
    if not isinstance(data, dict):
        raise UserError(f"sweep spec {source!r} must be a mapping at the top level, got {type(data).__name__}")
    if overrides:
        merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged)
    _mapping(data, source, "<top>", SPEC_KEYS)
    base = _mapping(data.get("base"), source, "base", {"config", "overrides"})
    search = _mapping(data.get("search"), source, "search", {"algorithm", "num_samples", "max_concurrent", "seed"})
    sched = _mapping(data.get("scheduler"), source, "scheduler", {"type", "grace_period", "reduction_factor"})
    res = _mapping(data.get("resources"), source, "resources", {"cpu", "gpu", "custom"})
    custom = data.get("resources", {}).get("custom") or {}
    if not isinstance(custom, dict) or not all(isinstance(v, int | float) and v > 0 for v in custom.values()):
        raise _fail(source, "resources.custom", f"must map Ray resource names to positive amounts, got {custom!r}")
    obj = _mapping(data.get("objective"), source, "objective", {"metric", "mode"})
    space = _mapping(data.get("search_space"), source, "search_space", {"weights", "params"})
    if "weights" not in space:
        raise _fail(source, "search_space.weights", "is required (ranges of the positive values per CAS dimension)")
    weights_raw = _mapping(space["weights"], source, "search_space.weights", set(DIMENSIONS))
    weights = {d: _range(weights_raw.get(d, [0.0, 0.0]), source, f"search_space.weights.{d}") for d in DIMENSIONS}
    if all(hi == 0 for _, hi in weights.values()):
        raise _fail(source, "search_space.weights", "cannot be normalised: every range is [0, 0]")
    params: dict[str, dict[str, Any]] = {}
    for key, dist in (space.get("params") or {}).items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise _fail(source, f"search_space.params.{key}",
                        f"must be one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{choice: [...]}}, got {dist!r}")
        kind, arg = next(iter(dist.items()))
        if kind in ("uniform", "loguniform"):
            lo, hi = _range(arg, source, f"search_space.params.{key}.{kind}")
            if kind == "loguniform" and lo <= 0:
                raise _fail(source, f"search_space.params.{key}.loguniform", "needs low > 0")
            arg = [lo, hi]
        elif not isinstance(arg, list) or not arg:
            raise _fail(source, f"search_space.params.{key}.choice", f"must be a non-empty list, got {arg!r}")
        params[str(key)] = {kind: arg}
    modalities = data.get("modalities") or list(MODALITY_NAMES)
    for m in modalities:
        if m not in MODALITY_NAMES:
            raise one_of("modality", m, MODALITY_NAMES, f"in sweep spec {source!r} (modalities)")
    algorithm = str(search.get("algorithm", "random"))
    if algorithm not in ("random", "optuna"):
        raise one_of("search.algorithm", algorithm, ("random", "optuna"), f"in sweep spec {source!r}")
    mode = str(obj.get("mode", "min"))
    if mode not in ("min", "max"):
        raise one_of("objective.mode", mode, ("min", "max"), f"in sweep spec {source!r}")
    stype = str(sched.get("type", "asha"))
    if stype not in ("asha", "fifo"):
        raise one_of("scheduler.type", stype, ("asha", "fifo"), f"in sweep spec {source!r}")
    for key in ("num_samples", "max_concurrent"):
        if int(search.get(key, 1)) < 1:
            raise _fail(source, f"search.{key}", f"must be >= 1, got {search.get(key)}")
    return SweepSpec(
        name=str(data.get("name") or Path(source).stem), dir=str(data.get("dir") or "sweeps_out"),
        base_config=base.get("config"), base_overrides=[str(o) for o in base.get("overrides") or []],
        modalities=list(modalities), weights=weights, params=params, algorithm=algorithm,
        num_samples=int(search.get("num_samples", 4)), max_concurrent=int(search.get("max_concurrent", 2)),
        seed=int(search.get("seed", 0)), scheduler={"type": stype, **{k: int(v) for k, v in sched.items() if k != "type"}},
        resources={"cpu": float(res.get("cpu", 1.0)), "gpu": float(res.get("gpu", 0.0)),
                   "custom": {str(k): float(v) for k, v in custom.items()}},
        metric=str(obj.get("metric", "eval/ood_tail_rate")), mode=mode,
        time_budget_s=float(data["time_budget_s"]) if data.get("time_budget_s") else None, source=source,
    )


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep spec YAML."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep spec {str(path)!r} not found (the embedded default is sweeps/cas_weights.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"sweep spec {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from exc
    spec = parse_spec(data, str(path), overrides)
    if spec.base_config and not Path(spec.base_config).is_absolute():
        spec.base_config = str((path.parent / spec.base_config).resolve())
    return spec


def base_config(spec: SweepSpec, modality: str) -> DictConfig:
    """The resolved experiment config of one modality (base file + overrides + modality), CRAFT stage."""
    return load_config(spec.base_config, [*spec.base_overrides, f"modality={modality}",
                                          f"name={spec.name}-{modality}", "stage=craft"])


def trial_config(base: DictConfig | dict, weights: dict[str, float], params: dict[str, Any]) -> DictConfig:
    """``base`` with normalised reward weights and the sampled params applied, validated as overrides are.

    A trial reports to Tune at every evaluation and only then (one Tune iteration = one evaluation, the
    unit ASHA counts, and every report carries the objective), so progress logs and checkpoints are
    aligned to ``train.eval_every``.
    """
    w = normalise_weights(weights)
    overrides = [f"reward.weights.{d}={w[d]}" for d in DIMENSIONS] + [f"{k}={v}" for k, v in params.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="craft-trial-") as fh:
        fh.write(to_yaml(OmegaConf.create(base)))
        fh.flush()
        cfg = load_config(fh.name, overrides)
    cfg.train.log_every = cfg.train.checkpoint_every = cfg.train.eval_every
    return cfg


def check_spec_against_config(spec: SweepSpec) -> None:
    """Apply a sample of the search space to each modality's base config: unknown keys or bad types fail now."""
    for modality in spec.modalities:
        base = base_config(spec, modality)
        sample = {k: (v.get("choice") or v.get("uniform") or v.get("loguniform"))[0] for k, v in spec.params.items()}
        try:
            trial_config(base, {d: max(hi, 1e-3) for d, (_, hi) in spec.weights.items()}, sample)
        except UserError as exc:
            raise UserError(f"sweep spec {spec.source!r}: search_space.params: {exc}") from exc


# ----------------------------------------------------------------------------------------------- trials


def _tune_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for d, (lo, hi) in spec.weights.items():
        space[f"w_{d}"] = tune.uniform(lo, hi) if hi > lo else lo
    for key, dist in spec.params.items():
        kind, arg = next(iter(dist.items()))
        space[key] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                      "choice": tune.choice}[kind](arg)
    return space


def run_trial(config: dict, base: dict, init_lora: str, parent_run: str) -> None:
    """One Tune trial: the CRAFT stage from the modality's SFT LoRA with the sampled weights and params.

    ``config`` holds only the sampled values (``w_<dimension>`` and config keys); the modality's base
    config, SFT LoRA and MLflow parent run come through ``tune.with_parameters``.
    """
    from ray import tune

    from craft_ray import training
    from craft_ray.tracking import StageTracker, trial_run

    weights = {d: float(config[f"w_{d}"]) for d in DIMENSIONS}
    params = {k: v for k, v in config.items() if not k.startswith("w_")}
    cfg = trial_config(base, weights, params)
    trial = tune.get_context().get_trial_name()
    run_id = trial_run(cfg, parent_run, trial,
                       {**{f"reward.weights.{d}": v for d, v in normalise_weights(weights).items()}, **params})
    stage_config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stage": "craft", "init_lora": init_lora,
                    "mlflow_run_id": run_id, "output_dir": str(Path(cfg.output_dir) / cfg.name / trial),
                    "use_judges": False}
    if int(cfg.train.num_workers) == 0:
        training.run_stage(stage_config, TuneSession())
    else:
        _fit_in_trial(cfg, stage_config)
    StageTracker(cfg.tracking.tracking_uri, run_id).set_tag("trial_status", "finished")


class TuneSession:
    """A :class:`craft_ray.training.Session` for a Tune trial's own process (``train.num_workers=0``)."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def latest_checkpoint_dir(self):
        from ray import tune

        ckpt = tune.get_checkpoint()
        return ckpt.as_directory() if ckpt else None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def wrap(self, unet):
        return unet


def _fit_in_trial(cfg: DictConfig, stage_config: dict) -> None:
    """Train inside a trial on a TorchTrainer; its reports reach Tune through TuneReportCallback."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from craft_ray import training
    from craft_ray.train import worker_resources

    resources = {"CPU": float(cfg.train.cpus_per_worker), **({"GPU": 1.0} if cfg.train.use_gpu else {}),
                 **worker_resources(cfg)}
    TorchTrainer(
        training.train_loop_per_worker, train_loop_config=stage_config,
        scaling_config=ScalingConfig(num_workers=int(cfg.train.num_workers), use_gpu=bool(cfg.train.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=Path(stage_config["output_dir"]).name, storage_path=str(cfg.ray.storage_path),
                             callbacks=[TuneReportCallback()]),
    ).fit()


# ----------------------------------------------------------------------------------------------- driver


def _check_resources(spec: SweepSpec) -> None:
    import ray

    have = ray.cluster_resources()
    wants = [("cpu", "CPU", spec.resources["cpu"]), ("gpu", "GPU", spec.resources["gpu"])]
    wants += [(f"custom.{k}", k, v) for k, v in spec.resources["custom"].items()]
    for key, ray_key, want in wants:
        if want > have.get(ray_key, 0.0):
            raise UserError(f"sweep spec {spec.source!r}: resources.{key}={want:g} per trial, but the Ray cluster has "
                            f"{have.get(ray_key, 0.0):g} {ray_key}; no trial could ever start")


def _scheduler(spec: SweepSpec, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler["type"] == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                         grace_period=int(spec.scheduler.get("grace_period", 1)),
                         reduction_factor=int(spec.scheduler.get("reduction_factor", 2)))


def _search_alg(spec: SweepSpec):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if spec.algorithm == "random":  # seeded, so the same spec samples the same trials
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent)
    if spec.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:
            raise UserError("search.algorithm=optuna needs optuna (a craft_ray dependency): pip install optuna") from exc
        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.max_concurrent)
    raise AssertionError(f"unhandled search algorithm {spec.algorithm!r}")


def sweep_modality(spec: SweepSpec, modality: str, out_dir: Path) -> dict[str, Any]:
    """SFT once, then the Tune experiment of one modality; returns its rows (one per trial) and the best."""
    from ray import tune

    from craft_ray import tracking
    from craft_ray import train as train_cli

    base = base_config(spec, modality)
    sft_cfg = OmegaConf.merge(base, {"stage": "sft"})
    sft_dir = Path(sft_cfg.output_dir) / str(sft_cfg.name)
    sft_lora = sft_dir / "sft"
    runs = tracking.stage_runs(sft_cfg, ("sft",))
    if not (sft_lora / "pytorch_lora_weights.safetensors").is_file():
        print(f"[{modality}] training the SFT LoRA once for every trial ({sft_cfg.train.sft_steps} steps)", flush=True)
        train_cli.fit_stage(sft_cfg, "sft", runs["sft"], None, {}, False, sft_dir)
    else:
        print(f"[{modality}] reusing the SFT LoRA {sft_lora}", flush=True)
    tracking.end_runs(sft_cfg.tracking.tracking_uri, runs)
    parent = tracking.sweep_parent_run(base, spec.name, modality)

    evals = max(1, int(base.train.craft_steps) // int(base.train.eval_every))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=OmegaConf.to_container(base, resolve=True), init_lora=str(sft_lora),
                             parent_run=parent),
        {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"], **spec.resources["custom"]})
    exp_name = f"{spec.name}-{modality}"
    storage = str(Path(base.ray.storage_path).absolute()) if "://" not in str(base.ray.storage_path) \
        else str(base.ray.storage_path)
    path = f"{storage.rstrip('/')}/{exp_name}"
    param_space = _tune_space(spec)
    if tune.Tuner.can_restore(path):
        print(f"[{modality}] resuming the sweep from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, param_space=param_space, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                max_concurrent_trials=spec.max_concurrent, scheduler=_scheduler(spec, evals),
                search_alg=_search_alg(spec), time_budget_s=spec.time_budget_s),
            run_config=tune.RunConfig(name=exp_name, storage_path=storage, verbose=1),
        )
    t0 = time.perf_counter()
    grid = tuner.fit()
    rows = []
    for res in grid:
        m = res.metrics or {}
        cfg = res.config or {}
        w = normalise_weights({d: cfg.get(f"w_{d}", 0.0) for d in DIMENSIONS})
        rows.append({"modality": modality, "trial": m.get("trial_id", ""), "evaluations": m.get("training_iteration", 0),
                     "objective": m.get(spec.metric, float("nan")), "cas": m.get("eval/train_cas", float("nan")),
                     "tail_rate": m.get("eval/train_tail_rate", float("nan")),
                     "ood_tail_rate": m.get("eval/ood_tail_rate", float("nan")),
                     "error": str(res.error)[:200] if res.error else "",
                     **{f"w_{d}": w[d] for d in DIMENSIONS},
                     **{k: cfg.get(k) for k in spec.params}, "end_time": m.get("timestamp", 0)})
    ok = [r for r in rows if not r["error"] and isinstance(r["objective"], float) and math.isfinite(r["objective"])]
    if not ok:
        raise UserError(f"sweep {spec.name!r}, {modality}: no trial reported {spec.metric!r}; errors: "
                        f"{'; '.join(r['error'] for r in rows if r['error'])[:600]}")
    best = (min if spec.mode == "min" else max)(ok, key=lambda r: r["objective"])
    best_cfg = trial_config(base, {d: best[f"w_{d}"] for d in DIMENSIONS}, {k: best[k] for k in spec.params})
    best_cfg = OmegaConf.merge(best_cfg, {"name": f"{spec.name}-{modality}-best", "train": {"init_lora": str(sft_lora)}})
    best_path = out_dir / f"best_{modality}.yaml"
    best_path.write_text(f"# best trial {best['trial']} of sweep {spec.name} ({spec.metric} {spec.mode}: "
                         f"{best['objective']:.4f}); run it with: python -m craft_ray.train {best_path}\n"
                         + to_yaml(best_cfg))
    tracker = tracking.StageTracker(base.tracking.tracking_uri, parent)
    tracker.log_artifact(best_path, "best")
    tracker.log_metrics({"best_objective": best["objective"]}, 0)
    tracking.end_runs(base.tracking.tracking_uri, {"parent": parent})
    print(f"[{modality}] {len(rows)} trials in {time.perf_counter() - t0:.0f} s; best {best['trial']}: "
          f"{spec.metric} {best['objective']:.4f}", flush=True)
    return {"rows": rows, "best": best, "parent": parent}


def write_results(spec: SweepSpec, results: dict[str, dict], out_dir: Path) -> Path:
    """The best-per-modality table (Markdown + CSV), all trials (CSV) and the plots."""
    all_rows = [r for res in results.values() for r in res["rows"]]
    keys = list(all_rows[0])
    with (out_dir / "trials.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(all_rows)
    best = [res["best"] for res in results.values()]
    cols = ["modality", "trial", "objective", "cas", "tail_rate", "ood_tail_rate", *[f"w_{d}" for d in DIMENSIONS],
            *spec.params]
    with (out_dir / "best.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(best)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"# Sweep {spec.name}: best trial per modality ({spec.metric}, {spec.mode})", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(b.get(c, "")) for c in cols) + " |" for b in best]
    table = out_dir / "results.md"
    table.write_text("\n".join(lines) + "\n")
    _plots(spec, all_rows, out_dir)
    return table


def _plots(spec: SweepSpec, rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if isinstance(r["objective"], float) and math.isfinite(r["objective"])]
    fig, axes = plt.subplots(1, len(DIMENSIONS), figsize=(4 * len(DIMENSIONS), 3.2), sharey=True)
    for ax, d in zip(axes, DIMENSIONS, strict=True):
        for m in spec.modalities:
            pts = [(r[f"w_{d}"], r["objective"]) for r in ok if r["modality"] == m]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=m, s=18)
        ax.set_xlabel(f"reward weight: {d}")
    axes[0].set_ylabel(spec.metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "objective_vs_weights.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    t0 = min((r["end_time"] for r in ok), default=0)
    for m in spec.modalities:
        pts = sorted((r["end_time"] - t0, r["objective"]) for r in ok if r["modality"] == m)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
    ax.set_xlabel("trial end (s after the first)")
    ax.set_ylabel(spec.metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "trials_over_time.png", dpi=110)
    plt.close(fig)


def sweep(spec: SweepSpec) -> Path:
    """Run the sweep over every modality; returns the results table."""
    import ray

    from craft_ray import tracking
    from craft_ray import train as train_cli

    check_spec_against_config(spec)
    first = base_config(spec, spec.modalities[0])
    tracking.client(first.tracking.tracking_uri)
    train_cli.init_ray(first)
    _check_resources(spec)
    out_dir = Path(spec.dir).absolute() / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.yaml").write_text(yaml.safe_dump({"source": spec.source, **spec.__dict__}, sort_keys=False))
    for modality in spec.modalities:  # thresholds and banks before any trial, once per modality
        cfg = base_config(spec, modality)
        ray.get(ray.remote(train_cli._prepare).options(num_cpus=min(1.0, spec.resources["cpu"]))
                .remote(OmegaConf.to_container(cfg)))
    results = {m: sweep_modality(spec, m, out_dir) for m in spec.modalities}
    table = write_results(spec, results, out_dir)
    for res in results.values():
        tracker = tracking.StageTracker(first.tracking.tracking_uri, res["parent"])
        for name in ("results.md", "best.csv", "trials.csv", "objective_vs_weights.png", "trials_over_time.png"):
            tracker.log_artifact(out_dir / name, "sweep")
    print("\n" + table.read_text(), flush=True)
    print(f"results, plots and best configs: {out_dir}", flush=True)
    return table


def main(argv: list[str]) -> int:
    """Parse ``SPEC.yaml [key=value ...]`` (overrides of the spec itself) and run the sweep."""
    parser = Parser(prog="python -m craft_ray.sweep", description=__doc__.splitlines()[0], epilog=EPILOG)
    parser.add_argument("spec", help="sweep spec YAML (sweeps/cas_weights.yaml is the embedded default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the spec (e.g. search.num_samples=2)")
    parser.add_argument("--print-spec", action="store_true", help="print the validated spec and exit")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    ns = parser.parse_args(argv)
    spec = load_spec(ns.spec, ns.overrides)
    if ns.print_spec:
        print(yaml.safe_dump(spec.__dict__, sort_keys=False), end="")
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sweep(spec)
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:])
