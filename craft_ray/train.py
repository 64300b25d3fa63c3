"""``python -m craft_ray.train``: SFT baseline and CRAFT reward finetuning on Ray Train.

The stages (DESIGN.md, "Training"): ``sft`` (LoRA adaptation with the diffusion loss),
``craft`` (reward finetuning on the CAS dimensions from the SFT LoRA: DRaFT-K's reward gradient and/or a
reward-ranked preference term) and ``all`` (both, then the SFT-vs-CRAFT evaluation table). The
training is one Ray Train ``TorchTrainer`` run, named ``<name>-<stage>`` under ``ray.storage_path``
(``<name>-all`` for sft then craft in the same worker group): rerunning with the same ``name``
resumes from its last checkpoint (a finished stage is not trained again). The per-worker loop is
:func:`craft_ray.training.run_stages`; evaluation lives in :mod:`craft_ray.evaluate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from craft_ray.cli import config_parser, resolve, run
from craft_ray.config import to_yaml
from craft_ray.errors import UserError

# stage -> the stages it runs.
PLAN: dict[str, tuple[str, ...]] = {"sft": ("sft",), "craft": ("craft",), "all": ("sft", "craft", "evaluate")}
# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train v2 would route workers' print() through its logger *and* the
# forwarded stdout, so every progress line reached the driver twice.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Local Ray only: the Train controller polls its workers every 2 s by default, and each report waits
# for that poll; 0.2 s keeps short steps from idling.
# Train v2's preemption watcher (an actor per stage polling for spot nodes being reclaimed) has nothing to
# watch on one local machine.
LOCAL_RAY_ENV = {**WORKER_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

EPILOG = """examples:
  python -m craft_ray.train                                  # embedded default: tiny profile, phantom cxr
  python -m craft_ray.train modality=derm train.sft_steps=50
  python -m craft_ray.train experiment.yaml --print-config
  python -m craft_ray.train stage=craft train.init_lora=runs/craft-cxr/sft name=craft-cxr-b2 reward.beta=0.2
  ray job submit --working-dir . -- python -m craft_ray.train modality=fundus
"""


def stage_table() -> str:
    """One line per stage saying what it does."""
    return "\n".join([
        "stages:",
        "  sft       LoRA adaptation with the diffusion loss (the baseline)",
        "  craft     reward finetuning on the CAS dimensions, from the SFT LoRA (DRaFT-K and/or a",
        "            reward-ranked preference term)",
        "  evaluate  SFT vs CRAFT on a fixed seed set (stage=all only)",
    ])


# ----------------------------------------------------------------------------------------------- Ray


def init_ray(cfg: DictConfig) -> bool:
    """Connect to ``ray.address`` (or RAY_ADDRESS, e.g. under ``ray job submit``), else start a local
    instance; returns whether this process started Ray."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ.get(k, v) for k, v in LOCAL_RAY_ENV.items()}
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or None, log_to_driver=True)
        return False
    # The dashboard stays on: Ray Train v2's placement-group cleaner queries the state API it serves.
    ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=int(cfg.ray.object_store_memory),
             runtime_env={"env_vars": env})
    return True


def ensure_judges(cfg: DictConfig) -> bool:
    """Use the judges app named in config (on this cluster or at ``judges.url``); start the embedded one
    on this cluster when none answers. Returns whether judges are available."""
    from craft_ray.judges.client import JudgesClient, base_url, serve_app_running

    j = cfg.judges
    if serve_app_running(str(j.app_name)):
        print(f"judges: using Serve app {j.app_name!r} on this Ray cluster", flush=True)
        return True
    try:
        with JudgesClient.from_config(j, retries=0, timeout_s=5.0) as client:
            client.health()
        print(f"judges: using {base_url(j)}", flush=True)
        return True
    except Exception:  # nothing answers there: start the embedded app below
        pass
    from ray import serve

    from craft_ray.judges.app import application

    t0 = time.perf_counter()
    try:
        serve.start(http_options={"host": j.host, "port": int(j.port)})
        serve.run(application(cfg), name=str(j.app_name), route_prefix=str(j.route_prefix))
    except Exception as exc:  # training goes on; evaluations record the judge as missing
        reason = (str(exc).strip().splitlines() or [""])[-1][:300]  # Ray wraps the cause in a remote traceback
        print(f"judges: could not start the embedded app {j.app_name!r} ({type(exc).__name__}: {reason}); the "
              "checklist-judge score is left out", flush=True)
        return False
    print(f"judges: started the embedded app {j.app_name!r} at {base_url(j)} in {time.perf_counter() - t0:.0f} s "
          f"(model {j.engine.model})", flush=True)
    return True


def online_enrichment(cfg: DictConfig) -> dict[str, list[str]]:
    """Extra CRAFT prompts per label from the enricher (``knowledge.online_enrichment``)."""
    from craft_ray.judges.client import connect
    from craft_ray.modalities import get_modality

    extra: dict[str, list[str]] = {}
    client = connect(cfg)
    for lab in get_modality(cfg.modality).label_names(cfg.data.dataset):
        extra[lab] = list(client.enrich(cfg.modality, lab, int(cfg.knowledge.n_enriched), seed=int(cfg.seed)))
    n = sum(len(v) for v in extra.values())
    print(f"online enrichment: {n} extra prompts for {len(extra)} labels", flush=True)
    return extra


def worker_resources(cfg: DictConfig) -> dict[str, float]:
    """The custom Ray resources each Train worker requests (``train.worker_resources``), e.g. to pin workers
    to a node type of the cluster."""
    return {str(k): float(v) for k, v in cfg.train.worker_resources.items()}


def _remote_options(cfg: DictConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": float(cfg.train.cpus_per_worker)}
    if cfg.train.use_gpu:
        opts["num_gpus"] = 1
    return opts


def _prepare(cfg: DictConfig | dict) -> dict[str, float]:
    """Generate/scan the data and build both evaluators' reference banks and thresholds (cached on disk)."""
    from craft_ray import evaluate as ev

    cfg = OmegaConf.create(cfg)
    knowledge = ev.load_knowledge_for(cfg)
    manifest = ev.load_dataset(cfg)
    return {w: ev.ScoringSetup.build(cfg, w, knowledge, "cpu", manifest).threshold.tau for w in ev.EVALUATORS}


class FinalEvaluator:
    """A Ray actor of the final evaluation (see :class:`FinalEvaluation`): evaluates LoRAs on the fixed
    final seed set, a share of the labels per call. It imports the evaluation code when it starts and
    keeps it, and the judges' client once :meth:`connect` made one (an evaluation that needs it and finds
    none, as after a restart, connects first), for its later calls. The first actor also prepares the
    data and thresholds (:meth:`prepare`) while the judges start."""

    def __init__(self, cfg_dict: dict) -> None:
        import torch

        from craft_ray import evaluate  # noqa: F401 (imported once, here)

        self.cfg = OmegaConf.create(cfg_dict)
        torch.set_num_threads(max(1, int(self.cfg.train.torch_threads)))
        self.device = "cuda" if self.cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
        self.judge, self.connected = None, False

    def prepare(self) -> dict[str, float]:
        return _prepare(self.cfg)

    def connect(self) -> None:
        """Connect to the judges; without them the table's judge row is left empty."""
        from craft_ray.judges.client import connect_or_none

        self.judge, self.connected = connect_or_none(self.cfg), True

    def evaluate(self, loras: dict[str, dict], labels: list[str], use_judges: bool
                 ) -> tuple[dict[str, dict], dict]:
        """For each LoRA (name -> diffusers-format state dict), the per-image scores of ``labels``' part of
        the final seed set; and the taus."""
        from craft_ray import evaluate as ev

        if use_judges and not self.connected:
            self.connect()
        n = int(self.cfg.train.final_images_per_label)
        scores, taus = {}, {}
        for name, lora in loras.items():
            scores[name], taus = ev.evaluate_lora(self.cfg, lora, n_per_label=n, labels=labels, judge=self.judge,
                                                  device=self.device)
        return scores, taus


class FinalEvaluation:
    """The SFT-vs-CRAFT evaluation (``stage=all``) on ``train.final_eval_workers`` Ray actors, each with
    ``train.final_eval_cpus`` CPUs (a GPU with ``train.use_gpu``), that split each LoRA's labels between
    them (the merged shards are the whole set). ``train.sft_eval_workers`` of them evaluate the SFT LoRA
    beside the CRAFT loop, all of them the CRAFT LoRA after CRAFT.

    On CPU the actors start with the run: the first prepares the data and thresholds while the judges
    start (:meth:`prepare`, in place of a Ray task whose process would import the same code), the others
    beside the Train worker group's start (:meth:`start`). Their imports are then done before the SFT
    LoRA reaches them, not beside the CRAFT loop. With ``train.use_gpu`` they
    start with the first LoRA submitted: an actor holds its GPU while it lives, and the Train workers
    need theirs first. A Ray task in their place started a new process after CRAFT, whose start and
    imports took 7-10 s of an 18-27 s evaluation on 2 cores."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.use_judges = False
        self.actors: list[Any] = []
        self.refs: dict[str, list[Any]] = {}  # what was submitted -> one object ref per shard

    @property
    def starts_early(self) -> bool:
        return not self.cfg.train.use_gpu

    def _start(self, n: int) -> None:
        import ray

        t = self.cfg.train
        opts: dict[str, Any] = {"num_cpus": float(t.final_eval_cpus or t.cpus_per_worker), "max_restarts": 1,
                                "max_task_retries": 1}
        if t.use_gpu:
            opts["num_gpus"] = 1
        actor = ray.remote(FinalEvaluator).options(**opts)
        cfg_dict = OmegaConf.to_container(self.cfg, resolve=True)
        while len(self.actors) < n:
            self.actors.append(actor.remote(cfg_dict))
            if self.use_judges:
                self.actors[-1].connect.remote()

    def prepare(self) -> Any:
        """The first actor prepares the data and the thresholds: an object ref of {evaluator: tau}."""
        self._start(1)
        return self.actors[0].prepare.remote()

    def connect(self, use_judges: bool) -> None:
        """Whether the actors use the judges; those started connect now, the others when they start."""
        self.use_judges = use_judges
        if use_judges:
            for a in self.actors:
                a.connect.remote()

    def start(self) -> None:
        """Start the remaining actors (on CPU; with GPUs they start with the first LoRA submitted)."""
        if self.starts_early:
            self._start(int(self.cfg.train.final_eval_workers))

    def submit(self, key: str, loras: dict[str, dict], workers: int | None = None) -> None:
        """Evaluate ``loras`` (name -> state dict, see :func:`read_lora`) on ``workers`` of the actors
        (default: all), each on a share of the labels; ``key`` names the results for :meth:`gather`."""
        from craft_ray.modalities import get_modality

        self._start(int(self.cfg.train.final_eval_workers))
        labels = get_modality(self.cfg.modality).label_names(self.cfg.data.dataset)
        n = min(int(workers or len(self.actors)), len(self.actors))
        shards = [part for i in range(n) if (part := labels[len(labels) * i // n:len(labels) * (i + 1) // n])]
        self.refs[key] = [a.evaluate.remote(loras, list(part), self.use_judges)
                          for a, part in zip(self.actors[:len(shards)], shards, strict=True)]

    def gather(self) -> tuple[dict[str, dict], dict]:
        """Each LoRA's per-image scores on the whole final set (name -> scores), and the taus."""
        import ray

        from craft_ray import evaluate as ev

        scores, taus = {}, {}
        for refs in self.refs.values():
            parts = ray.get(refs)
            for name in parts[0][0]:
                scores[name] = ev.merge_scores([got[name] for got, _ in parts])
            taus = parts[0][1]
        return scores, taus

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def read_lora(source: Any, file: str) -> dict:
    """A LoRA file in a ``ray.train.Checkpoint`` (local or remote) or a folder, as a state dict."""
    from safetensors.torch import load_file

    with source.as_directory() if hasattr(source, "as_directory") else contextlib.nullcontext(source) as folder:
        return load_file(str(Path(folder) / file))


# ----------------------------------------------------------------------------------------------- stages


def _train_loop(config: dict) -> None:
    """A Train worker's entry point: :func:`craft_ray.training.train_loop_per_worker`, imported there (the
    driver does not load the training loop's diffusers and peft for it)."""
    from craft_ray.training import train_loop_per_worker

    train_loop_per_worker(config)


def _describe_stage(cfg: DictConfig, stage: str) -> str:
    """The line printed when a stage starts: its steps and effective batch."""
    from craft_ray.stages import images_per_micro_step, stage_steps

    n, t, r = max(1, int(cfg.train.num_workers)), cfg.train, cfg.reward
    preference = ""
    if stage == "craft" and float(r.preference_weight) > 0:
        prompts, n_cand = int(r.preference_prompts) or t.batch_size, int(r.preference_candidates)
        preference = (f"; preference term: {prompts} pairs per worker and micro-step, the best and the worst of "
                      f"{n_cand} samples" if str(r.preference_pairs) == "extremes" else
                      f"; preference term: {prompts} prompts per worker and micro-step, every two of {n_cand} samples "
                      f"({n_cand * (n_cand - 1) // 2} pairs each)")
    per = images_per_micro_step(cfg, stage)
    return (f"[{stage}] {stage_steps(cfg, stage)} steps; effective batch {per * t.grad_accum * n} = "
            f"{per} per worker x {t.grad_accum} accumulation x {n} worker(s){preference}")


def fit_stage(cfg: DictConfig, stage: str, run_id: str | None, init_lora: Any, extra_prompts: dict,
              use_judges: bool, out_dir: Path):
    """Train one stage: :func:`fit_stages` with one."""
    return fit_stages(cfg, (stage,), {stage: run_id}, init_lora, extra_prompts, use_judges, out_dir)


def fit_stages(cfg: DictConfig, stages: tuple[str, ...], run_ids: dict[str, str | None], init_lora: Any,
               extra_prompts: dict, use_judges: bool, out_dir: Path, lora_token: str | None = None):
    """Train ``stages`` (one, or sft then craft) in one TorchTrainer run, named ``<name>-<stage>``, or
    ``<name>-all`` for both (in this process when ``train.num_workers=0``). One run for both stages
    saves starting a second worker group (its processes, imports and models: about 25 s of a 5-minute
    tiny run on 2 cores).

    Returns the final checkpoint (a ``ray.train.Checkpoint`` or a local folder; after both stages it
    also holds the SFT LoRA, ``stages.INIT_LORA_FILE``) and the last stage's final metrics.
    ``lora_token``: rank 0 tags each stage's MLflow run with it once the stage's LoRA is logged there.
    """
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stages": list(stages), "init_lora": init_lora,
              "mlflow_run_ids": run_ids, "output_dir": str(out_dir), "extra_prompts": extra_prompts,
              "use_judges": use_judges, "lora_token": lora_token}
    n = int(cfg.train.num_workers)
    for stage in stages:
        print(_describe_stage(cfg, stage), flush=True)
    name = f"{cfg.name}-{stages[0] if len(stages) == 1 else 'all'}"
    storage = Path(cfg.ray.storage_path) if "://" not in str(cfg.ray.storage_path) else None
    if n == 0:
        from craft_ray import training

        session = training.LocalSession((storage or out_dir) / name, keep=int(cfg.train.keep_checkpoints))
        training.run_stages(config, session)
        return session.latest, session.last_metrics

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": float(cfg.train.cpus_per_worker), **worker_resources(cfg)}
    if cfg.train.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=bool(cfg.train.use_gpu), resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(cfg.ray.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=int(cfg.train.keep_checkpoints)),
            failure_config=FailureConfig(max_failures=int(cfg.train.max_failures)),
            worker_runtime_env={"env_vars": {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: the worker's error is the useful part
        raise UserError(f"stage {'+'.join(stages)} failed: {' '.join(str(exc).split())[:1500]}") from exc
    if result.checkpoint is None:
        raise UserError(f"stage {'+'.join(stages)} finished without a checkpoint under {cfg.ray.storage_path}")
    return result.checkpoint, dict(result.metrics or {})


@contextlib.contextmanager
def _evaluate_sft_once_logged(cfg: DictConfig, sft_run: str, token: str, evaluation: FinalEvaluation,
                              poll_s: float = 2.0):
    """While the body trains sft and then craft, submit the SFT LoRA to ``evaluation`` (as ``"sft"``, on
    ``train.sft_eval_workers`` of its actors) as soon as rank 0 has logged that LoRA to MLflow (SFT's run
    tagged with ``token``; polled every ``poll_s``), so that it is evaluated beside the CRAFT loop instead
    of after it. The LoRA is read from MLflow, which every node reaches. If it does not appear (a
    restarted run that skipped SFT), the driver evaluates the SFT LoRA after CRAFT, from CRAFT's
    checkpoint."""
    from craft_ray import tracking
    from craft_ray.stages import LORA_TOKEN_TAG, LORA_WEIGHT_NAME

    client, done = tracking.client(cfg.tracking.tracking_uri), threading.Event()

    def watch() -> None:
        try:
            # The table's code (and diffusers, torch) imported now, while training leaves a core free, not
            # after CRAFT, where it competed with the evaluation tasks (~2 s)
            from craft_ray import evaluate  # noqa: F401

            while not done.wait(poll_s):
                if client.get_run(sft_run).data.tags.get(LORA_TOKEN_TAG) == token:
                    with tempfile.TemporaryDirectory(prefix="craft-sft-lora-") as tmp:
                        path = Path(client.download_artifacts(sft_run, f"lora/{LORA_WEIGHT_NAME}", tmp))
                        lora = read_lora(path.parent, path.name)
                    evaluation.submit("sft", {"sft": lora}, int(cfg.train.sft_eval_workers))
                    print("the SFT LoRA's final evaluation started, beside CRAFT", flush=True)
                    return
        except Exception as exc:  # evaluated after CRAFT instead
            print(f"the SFT LoRA's evaluation waits for CRAFT's end ({type(exc).__name__}: {exc})", flush=True)

    thread = threading.Thread(target=watch, name="evaluate-sft", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _init_lora(cfg: DictConfig, out_dir: Path) -> str:
    """stage=craft: the SFT LoRA to start from (``train.init_lora``, else this name's own SFT stage's)."""
    if cfg.train.init_lora:
        return str(cfg.train.init_lora)
    own = out_dir / "sft"
    if (own / "pytorch_lora_weights.safetensors").is_file():
        return str(own)
    raise UserError(
        f"stage=craft needs an SFT LoRA: set train.init_lora=PATH, or run stage=sft (or all) with name={cfg.name} "
        f"first (looked for {own}/pytorch_lora_weights.safetensors)"
    )


def train(cfg: DictConfig) -> int:
    """Run the stages of ``cfg.stage`` and, for ``all``, print and log the SFT-vs-CRAFT table."""
    from craft_ray import tracking
    from craft_ray.config import check_craft_objective, check_out_of_family

    stages = PLAN[cfg.stage]
    t_start = time.perf_counter()
    out_dir = Path(cfg.output_dir) / str(cfg.name)
    if "craft" in stages:
        check_craft_objective(cfg.reward)
    if "evaluate" in stages and int(cfg.train.final_eval_workers) < 1:
        raise UserError(f"train.final_eval_workers={cfg.train.final_eval_workers}: need at least 1 Ray actor")
    tracking.client(cfg.tracking.tracking_uri)  # a refused tracking URI fails before Ray starts
    check_out_of_family(cfg.model.evaluator, cfg.model.ood_evaluator)
    init_ray(cfg)
    with contextlib.closing(FinalEvaluation(cfg)) as evaluation:  # stage=all; no actors otherwise
        return _run(cfg, stages, evaluation, out_dir, t_start)


def _run(cfg: DictConfig, stages: tuple[str, ...], evaluation: FinalEvaluation, out_dir: Path,
         t_start: float) -> int:
    import ray

    from craft_ray import tracking

    # the data and thresholds are prepared by the first evaluation actor, or a Ray task, while the judges start
    if "evaluate" in stages and evaluation.starts_early:
        prepared = evaluation.prepare()
    else:
        prepared = ray.remote(_prepare).options(**_remote_options(cfg)).remote(OmegaConf.to_container(cfg))
    use_judges = bool(cfg.cas.use_judge or cfg.knowledge.online_enrichment) and ensure_judges(cfg)
    evaluation.connect(use_judges)
    taus = ray.get(prepared)
    print("real-image CAS thresholds tau_q: " + ", ".join(f"{k} {v:.4f}" for k, v in taus.items()), flush=True)
    runs = tracking.stage_runs(cfg, tuple(s for s in stages if s != "evaluate"))
    top = tracking.StageTracker(cfg.tracking.tracking_uri, runs.get("parent") or runs[stages[0]])
    _log_inputs(cfg, top, out_dir)
    extra = online_enrichment(cfg) if cfg.knowledge.online_enrichment and use_judges else {}
    if extra:
        top.log_dict(extra, "knowledge/online_enrichment.json")

    status = "FAILED"
    try:
        if "evaluate" in stages:
            evaluation.start()  # beside the Train worker group's start
        training_stages = tuple(s for s in stages if s != "evaluate")
        init = _init_lora(cfg, out_dir) if training_stages == ("craft",) else None
        t0 = time.perf_counter()
        token = uuid.uuid4().hex
        with (_evaluate_sft_once_logged(cfg, runs["sft"], token, evaluation) if "evaluate" in stages
              else contextlib.nullcontext()):
            final, metrics = fit_stages(cfg, training_stages, runs, init, extra, use_judges, out_dir, token)
        from craft_ray.stages import INIT_LORA_FILE, LORA_WEIGHT_NAME, describe_metrics

        print(f"[{'+'.join(training_stages)}] finished in {time.perf_counter() - t0:.0f} s: "
              f"{describe_metrics(metrics)}", flush=True)
        if "evaluate" in stages:
            # CRAFT's last checkpoint also holds the SFT LoRA it started from
            loras = {"craft": read_lora(final, LORA_WEIGHT_NAME)}
            if "sft" not in evaluation.refs:
                loras["sft"] = read_lora(final, INIT_LORA_FILE)
            evaluation.submit("after CRAFT", loras)
            _evaluate(cfg, evaluation, top, out_dir)
        status = "FINISHED"
    finally:
        tracking.end_runs(cfg.tracking.tracking_uri, runs, status)
    print(f"total {time.perf_counter() - t_start:.0f} s; MLflow: {cfg.tracking.tracking_uri} experiment "
          f"{cfg.tracking.experiment!r}, run {runs.get('parent') or runs[stages[0]]}", flush=True)
    return 0


def _log_inputs(cfg: DictConfig, tracker, out_dir: Path) -> None:
    from craft_ray.knowledge import load_knowledge_for

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    tracker.log_artifact(out_dir / "config.yaml", "config")
    knowledge = load_knowledge_for(cfg)
    path = knowledge.save(out_dir / "knowledge.yaml")
    tracker.log_artifact(path, "knowledge")
    tracker.set_tag("knowledge_version", knowledge.content_hash())


def _evaluate(cfg: DictConfig, evaluation: FinalEvaluation, tracker, out_dir: Path) -> None:
    """Wait for the final evaluation, print and log the SFT-vs-CRAFT table."""
    import numpy as np

    from craft_ray import evaluate as ev

    t0 = time.perf_counter()
    scores, taus = evaluation.gather()
    runs = {name: scores[name] for name in ("sft", "craft")}  # the first is the table's baseline
    rows = ev.compare_rows(runs, taus, n_boot=int(cfg.cas.bootstrap), seed=int(cfg.seed))
    n = int(cfg.train.final_images_per_label)
    title = (f"SFT vs CRAFT, {cfg.modality} ({cfg.data.dataset}), {n} images per label on a fixed seed set; "
             "95 % bootstrap CIs in brackets")
    table = ev.markdown_table(rows)
    print(f"\n{title}\n{table}\n(evaluation: {time.perf_counter() - t0:.0f} s after CRAFT)", flush=True)
    (out_dir / "results.md").write_text(f"# {title}\n\n{table}\n")
    summary = {name: ev.summarise(scores, taus) for name, scores in runs.items()}
    (out_dir / "results.json").write_text(json.dumps({"taus": taus, "summary": summary}, indent=2))
    tracker.log_artifact(out_dir / "results.md", "results")
    tracker.log_artifact(out_dir / "results.json", "results")
    tracker.log_metrics({f"final/{name}/{k}": v for name, s in summary.items() for k, v in s.items()
                         if np.isfinite(v)}, 0)
    for name, scores in runs.items():
        tracker.log_image(ev.image_grid(scores["thumbs"], 8), f"samples/final_{name}.png")


def main(argv: list[str]) -> int:
    """Parse the CLI, print the resolved config and the stage plan, run the stages."""
    parser = config_parser("train", __doc__.splitlines()[0], EPILOG)
    parser.add_argument("--list-stages", action="store_true", help="print the resolved config and the stages, exit")
    ns = parser.parse_args(argv)
    cfg = resolve(ns)
    print(to_yaml(cfg), end="")
    print(stage_table())
    if ns.list_stages:
        return 0
    return train(cfg)


if __name__ == "__main__":
    run(main, sys.argv[1:])
