"""The per-worker training loop of the SFT and CRAFT stages (run by Ray Train, or in-process).

:func:`run_stage` trains one stage on one worker (DDP rank); :func:`run_stages` trains sft, then craft
from the LoRA sft ended with, in one Ray Train run (``stage=all``):

- ``sft``: LoRA on the UNet with the noise-prediction loss on real images and their
  label-conditioned prompts (10 % of prompts dropped, so classifier-free guidance keeps working).
- ``craft``: from the SFT LoRA, DRaFT-K: sample with DDIM from prompts drawn from the knowledge
  file, backpropagate the reward (weighted CAS dimensions of the training evaluator) through the
  last K steps, and subtract ``beta`` times the diffusion loss on a real batch. Optionally
  (``reward.preference_weight``; the tiny profile's CRAFT) a reward-ranked preference term: online
  Diffusion-DPO on pairs of several samples per prompt (the best and the worst, or every two), ranked
  by the same reward, relative to the SFT LoRA.

Both use AdamW on the LoRA parameters only, gradient accumulation, warm-up + cosine decay, gradient
clipping, autocast on GPU and (optionally) gradient checkpointing. Data order and noise are
functions of (seed, step, rank), so a run resumed from a checkpoint continues exactly where the
checkpoint was taken. Rank 0 evaluates every ``train.eval_every`` steps (SFT:
``train.sft_eval_every``) on a fixed seed set, logs to MLflow, writes checkpoints (LoRA in the
diffusers format, optimizer, scheduler, RNG state, step and the reward-hacking guard's state) and a
``progress.json`` with the step and its process id.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from craft_ray import evaluate as ev
from craft_ray.config import LIST_CHOICES, check_craft_objective
from craft_ray.data.dataset import ImageDataset, load_dataset
from craft_ray.errors import UserError
from craft_ray.judges.client import connect_or_none
from craft_ray.modalities import get_modality
from craft_ray.models.diffusion import DiffusionModel
from craft_ray.rewards import make_reward
from craft_ray.sampling import draft_lv, draw_k, sample, sample_no_grad
from craft_ray.stages import (  # noqa: F401 (re-exported)
    INIT_LORA_FILE,
    LORA_TOKEN_TAG,
    LORA_WEIGHT_NAME,
    describe_metrics,
    images_per_micro_step,
    stage_steps,
)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
BEST_LORA_FILE = "best_ood_lora.safetensors"
COND_DROPOUT = 0.1  # SFT: share of prompts replaced by "" (keeps the unconditional model for guidance)


# ----------------------------------------------------------------------------------------------- sessions


class Session:
    """Where a stage runs: rank, device, checkpoints and reports. See :class:`RaySession`, :class:`LocalSession`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def latest_checkpoint_dir(self):  # -> contextmanager yielding a folder, or None
        raise NotImplementedError

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def wrap(self, unet: torch.nn.Module) -> torch.nn.Module:
        return unet


class RaySession(Session):
    """Inside a Ray Train worker (Train v2): DDP via ``prepare_model``, checkpoints via ``ray.train``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_checkpoint_dir(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt else None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def wrap(self, unet: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.world_size == 1:
            return unet
        # Buffers are not broadcast: rank 0 runs evaluation forwards alone, which must not be collectives.
        return ray.train.torch.prepare_model(unet, move_to_device=False,
                                             parallel_strategy_kwargs={"broadcast_buffers": False})


class LocalSession(Session):
    """In the calling process (``train.num_workers=0``): checkpoints are folders under ``root``."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu", keep: int = 2) -> None:
        self.root = Path(root)
        self.device = torch.device(device)
        self.keep = keep
        self.reports: list[dict[str, float]] = []  # every report of this process, in order

    def _checkpoints(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint_*")) if self.root.is_dir() else []

    def latest_checkpoint_dir(self):
        found = self._checkpoints()
        return contextlib.nullcontext(str(found[-1])) if found else None

    @property
    def last_metrics(self) -> dict[str, float]:
        return self.reports[-1] if self.reports else {}

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            # numbered in order (stage=all puts both stages' checkpoints here, so not by step)
            found = self._checkpoints()
            dest = self.root / f"checkpoint_{int(found[-1].name.split('_')[-1]) + 1 if found else 1:08d}"
            tmp = self.root / f".{dest.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
            for old in self._checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    @property
    def latest(self) -> Path | None:
        found = self._checkpoints()
        return found[-1] if found else None


# ----------------------------------------------------------------------------------------------- data


class StepBatches:
    """Batches as a pure function of (micro-step, rank): item j of the stream is permutation_{j // N}[j % N].

    Micro-step m on rank r takes items (m * world + r) * B ... + B - 1, so ranks never share an item
    within an epoch and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.dataset, self.batch_size, self.rank, self.world, self.seed = dataset, batch_size, rank, world_size, seed
        self._perm: dict[int, torch.Tensor] = {}
        n = len(dataset)
        self._cache: dict[int, dict] | None = {} if n * 3 * dataset.size ** 2 * 4 <= 512 * 2 ** 20 else None

    def _item(self, index: int) -> dict:
        if self._cache is None:
            return self.dataset[index]
        if index not in self._cache:
            self._cache[index] = self.dataset[index]
        return self._cache[index]

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        return self._perm[epoch]

    def batch(self, micro_step: int) -> dict[str, Any]:
        n = len(self.dataset)
        first = (micro_step * self.world + self.rank) * self.batch_size
        items = [self._item(int(self._perm_of(j // n)[j % n])) for j in range(first, first + self.batch_size)]
        return {"pixels": torch.stack([it["pixels"] for it in items]), "prompts": [it["prompt"] for it in items],
                "labels": [it["label_name"] for it in items]}


def craft_prompt_pool(cfg: DictConfig, knowledge, extra: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """CRAFT prompts per label: the knowledge file's enriched prompts, the label's template prompts
    (which include the canonical prompt SFT and evaluation use) and any online-enriched prompts."""
    mod = get_modality(cfg.modality)
    pool = {}
    for lab in mod.label_names(cfg.data.dataset):
        prompts = list(knowledge.prompts(lab)) + mod.prompts(lab, cfg.data.dataset) + list((extra or {}).get(lab, []))
        pool[lab] = list(dict.fromkeys(prompts))
    return pool


# ----------------------------------------------------------------------------------------------- guard


GUARD_SCORES = LIST_CHOICES["train.hacking_watch"]  # cas, label, checklist, modality, realism


@dataclass
class HackingGuard:
    """Reward-hacking guard: the training evaluator's CAS rising while an out-of-family score falls,
    ``patience`` evaluations in a row.

    ``watch`` names the out-of-family scores compared with the training CAS (``GUARD_SCORES``: its CAS
    and each CAS dimension). ``update`` is called after each periodic evaluation; it returns True when,
    for one watched score, the last ``patience`` consecutive evaluation-to-evaluation changes all had the
    training CAS up and that out-of-family score down. Watching a dimension catches a hack that leaves
    the out-of-family CAS level: on the tiny world's cxr, 240 CRAFT steps raise both evaluators' label
    scores while the out-of-family realism collapses. The guard also tracks the evaluation that was best
    under the out-of-family CAS (the rollback target).
    """

    patience: int
    watch: list[str] = field(default_factory=lambda: ["cas"])
    history: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)  # (step, train CAS, ood scores)
    best_step: int = -1
    best_ood: float = -math.inf
    triggered_at: int | None = None
    triggered_by: str | None = None  # the watched out-of-family score that fell first

    def __post_init__(self) -> None:
        unknown = sorted(set(self.watch) - set(GUARD_SCORES))
        if unknown or not self.watch:
            raise UserError(f"train.hacking_watch must name one or more of {', '.join(GUARD_SCORES)}; "
                            f"got {list(self.watch)}")
        if self.patience < 1:
            raise UserError(f"train.hacking_patience must be >= 1, got {self.patience}")
        # a checkpoint written before the guard watched dimensions stores the out-of-family CAS as a number
        self.history = [(h[0], h[1], h[2] if isinstance(h[2], dict) else {"cas": h[2]}) for h in self.history]

    def update(self, step: int, train_cas: float, ood: dict[str, float]) -> tuple[bool, bool]:
        """Record one evaluation (the out-of-family scores by name: ``cas`` and the watched ones);
        returns (is the new best under out-of-family CAS, guard triggered)."""
        self.history.append((step, float(train_cas),
                             {k: float(ood.get(k, math.nan)) for k in sorted({"cas", *self.watch})}))
        best = ood["cas"] > self.best_ood
        if best:
            self.best_ood, self.best_step = float(ood["cas"]), step
        falling = self.diverging()
        if falling and self.triggered_at is None:
            self.triggered_at, self.triggered_by = step, falling[0]
        return best, bool(falling)

    def diverging(self) -> list[str]:
        """Watched out-of-family scores that fell on each of the last ``patience`` changes, all of which
        raised the training CAS (empty when the guard is quiet)."""
        h = self.history[-(self.patience + 1):]
        if len(h) < self.patience + 1 or not all(b[1] > a[1] for a, b in zip(h[:-1], h[1:], strict=True)):
            return []
        return [k for k in self.watch
                if all(b[2].get(k, math.nan) < a[2].get(k, math.nan) for a, b in zip(h[:-1], h[1:], strict=True))]


# ----------------------------------------------------------------------------------------------- helpers


def warmup_cosine(warmup: int, total: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _generator(seed: int, stage: str, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """The noise generator of one micro-step: a function of (seed, stage, step, rank), so resumes are exact."""
    stage_id = {"sft": 1, "craft": 2}[stage]
    value = ((seed * 7919 + stage_id) * 1_000_003 + step) * 1009 + rank * 31 + micro
    return torch.Generator().manual_seed(value % (2 ** 63))


def _grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _broadcast(session: Session, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a no-op with one worker)."""
    if session.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class StageState:
    """What a checkpoint stores besides the LoRA and optimizer (``state.json``)."""

    stage: str
    step: int = 0
    images_seen: int = 0
    guard: dict = field(default_factory=dict)
    stopped_early: str | None = None  # why training stopped before the configured steps (guard action)


def train_loop_per_worker(config: dict) -> None:
    """Entry point of a Ray Train worker (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    run_stages(config, RaySession())


def run_stages(config: dict, session: Session) -> dict[str, StageState]:
    """Train ``config["stages"]`` in order (default: the one ``config["stage"]``) on this worker, each from
    the LoRA the one before ended with (the first from ``init_lora``); MLflow run ids per stage in
    ``config["mlflow_run_ids"]``. The stages share the session's checkpoints: after a restart, the stages
    before the one of the latest checkpoint are done and skipped; CRAFT's checkpoints hold the LoRA it
    started from (``INIT_LORA_FILE``), so it resumes without the SFT stage's."""
    stages = list(config.get("stages") or [config["stage"]])
    run_ids = config.get("mlflow_run_ids") or {stages[0]: config.get("mlflow_run_id")}
    init = config.get("init_lora")
    states: dict[str, StageState] = {}
    with tempfile.TemporaryDirectory(prefix="craft-init-") as tmp:
        first = 0
        latest = session.latest_checkpoint_dir() if len(stages) > 1 else None
        if latest is not None:
            with latest as folder:
                done = _checkpoint_stage(Path(folder))
                if done in stages[1:]:
                    first = stages.index(done)
                    if (Path(folder) / INIT_LORA_FILE).is_file():  # copied: a remote checkpoint's folder goes away
                        init = shutil.copy(Path(folder) / INIT_LORA_FILE, Path(tmp) / INIT_LORA_FILE)
        for stage in stages[first:]:
            states[stage], init = _run_stage({**config, "stage": stage, "init_lora": init,
                                              "mlflow_run_id": run_ids.get(stage)}, session)
    return states


def run_stage(config: dict, session: Session) -> StageState:
    """Train one stage on this worker. ``config`` keys: cfg (resolved config as a dict), stage, init_lora
    (CRAFT: the SFT LoRA, a folder, file, ``ray.train.Checkpoint`` or diffusers-format state dict),
    mlflow_run_id, output_dir, extra_prompts, use_judges."""
    return _run_stage(config, session)[0]


def _run_stage(config: dict, session: Session) -> tuple[StageState, dict[str, torch.Tensor]]:
    """:func:`run_stage`, also returning the final LoRA (diffusers-format state dict)."""
    cfg = OmegaConf.create(config["cfg"])
    stage = config["stage"]
    if stage not in ("sft", "craft"):
        raise UserError(f"unknown training stage {stage!r}; known: sft, craft")
    if stage == "craft":
        check_craft_objective(cfg.reward)
    torch.set_num_threads(max(1, int(cfg.train.torch_threads)))
    torch.manual_seed(int(cfg.seed) + session.rank)
    rank, world, device = session.rank, session.world_size, session.device
    out_dir = Path(config["output_dir"])
    total = stage_steps(cfg, stage)
    lr = float(cfg.train.sft_lr if stage == "sft" else cfg.train.craft_lr)
    accum = int(cfg.train.grad_accum)
    batch_size = int(cfg.train.batch_size)
    step_images = images_per_micro_step(cfg, stage) * accum * world
    eval_every = int(cfg.train.sft_eval_every or cfg.train.eval_every) if stage == "sft" else int(cfg.train.eval_every)

    model = DiffusionModel.from_config(cfg.model, device, seed=int(cfg.seed))
    init_copy: Path | None = None
    if stage == "craft":
        if not config.get("init_lora"):
            raise UserError("stage craft starts from an SFT LoRA: run stage=all, or stage=craft with an SFT run "
                            "of the same name done before")
        init = config["init_lora"]
        if isinstance(init, dict):  # the LoRA the SFT stage just ended with, in this process
            model.load_lora_state_dict(init, source="of the SFT stage")
        elif hasattr(init, "as_directory"):  # a ray.train.Checkpoint of the SFT stage
            with init.as_directory() as folder:
                model.load_lora(folder)
        else:
            model.load_lora(init)
        if session.rank == 0:  # the LoRA CRAFT starts from, copied into each of its checkpoints
            init_copy = model.save_lora(out_dir / stage / INIT_LORA_FILE)
    # the preference term's reference: the LoRA CRAFT starts from (taken before a checkpoint is resumed)
    reference = ({n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
                 if stage == "craft" and float(cfg.reward.preference_weight) > 0 else None)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg.train.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(cfg.train.warmup_steps), total))
    use_scaler = model.mixed_precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    state = StageState(stage)
    guard = HackingGuard(int(cfg.train.hacking_patience), list(cfg.train.hacking_watch))
    best_lora: dict[str, torch.Tensor] | None = None

    resume = session.latest_checkpoint_dir()
    if resume is not None:
        with resume as folder:
            if _checkpoint_stage(Path(folder)) == stage:  # with stage=all, it may be the SFT stage's last
                state, best_lora = _load_checkpoint(Path(folder), model, opt, sched, scaler)
        guard = HackingGuard(**state.guard) if state.guard else guard
        if rank == 0 and state.step:
            print(f"[{stage}] resuming from the checkpoint at step {state.step}/{total}", flush=True)
    model.unet = session.wrap(model.unet)
    model.train()

    manifest = load_dataset(cfg)
    train_ds = ImageDataset(manifest, "train", int(cfg.data.size), modality=cfg.modality,
                            dataset=cfg.data.dataset, corrupt_images=cfg.data.corrupt_images)
    real = StepBatches(train_ds, batch_size, rank, world, int(cfg.seed) + (0 if stage == "sft" else 17))
    knowledge = ev.load_knowledge_for(cfg)
    setups: dict[str, ev.ScoringSetup] = {}
    if stage == "craft" or rank == 0:
        setups["train"] = ev.ScoringSetup.build(cfg, "train", knowledge, device, manifest)
    if rank == 0:
        setups["ood"] = ev.ScoringSetup.build(cfg, "ood", knowledge, device, manifest)
    reward_fn = (make_reward(dict(cfg.reward.weights), setups["train"].scorer, str(cfg.reward.form),
                             shifts=int(cfg.reward.shifts), max_shift=float(cfg.reward.max_shift),
                             grad_sigma=float(cfg.reward.grad_sigma))
                 if stage == "craft" else None)
    pool = craft_prompt_pool(cfg, knowledge, config.get("extra_prompts"))
    labels_cycle = get_modality(cfg.modality).label_names(cfg.data.dataset)

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from craft_ray.tracking import StageTracker

        tracker = StageTracker(cfg.tracking.tracking_uri, config["mlflow_run_id"])
    judge = connect_or_none(cfg) if rank == 0 and config.get("use_judges") else None

    if rank == 0:
        print(f"[{stage}] rank 0 of {world}: steps {state.step}..{total}, per-worker batch {batch_size} x {accum} "
              f"accumulation, lr {lr:g}, device {device}", flush=True)
    progress = out_dir / stage / "progress.json"
    log_every = max(1, int(cfg.train.log_every))
    window_t, window_images, window_start = 0.0, 0, state.step
    metrics: dict[str, float] = {}
    loop_start, eval_total = time.perf_counter(), 0.0
    while state.step < total:
        t0 = time.perf_counter()
        step = state.step
        info: dict[str, float] = {}
        for micro in range(accum):
            g = _generator(int(cfg.seed), stage, step, rank, micro)
            sync = micro == accum - 1 or world == 1
            ctx = model.unet.no_sync() if not sync and hasattr(model.unet, "no_sync") else contextlib.nullcontext()
            with ctx:
                if stage == "sft":
                    loss, parts = _sft_loss(model, real.batch(step * accum + micro), g)
                else:
                    loss, parts = _craft_loss(model, cfg, reward_fn, pool, labels_cycle, real,
                                              step * accum + micro, g, rank, world, reference)
                scaler.scale(loss / accum).backward()
            for k, v in parts.items():
                info[k] = info.get(k, 0.0) + v / accum
        scaler.unscale_(opt)
        info["grad_norm"] = _grad_norm(params)
        torch.nn.utils.clip_grad_norm_(params, float(cfg.train.max_grad_norm))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        state.step += 1
        state.images_seen += step_images
        dt = time.perf_counter() - t0
        window_t += dt
        window_images += step_images
        info.update(lr=sched.get_last_lr()[0], step_time_s=dt)
        if rank == 0:
            _write_json(progress, {"stage": stage, "step": state.step, "total": total, "pid": os.getpid(),
                                   "time": time.time()})

        last = state.step == total
        evaluate_now = state.step % eval_every == 0 or last
        action = None
        if evaluate_now:
            if rank == 0:
                eval_metrics = periodic_evaluation(model, cfg, setups, knowledge, judge, tracker, state.step, stage)
                info.update(eval_metrics)
                eval_total += eval_metrics["eval/seconds"]
                ood = {k.removeprefix("eval/ood_"): v for k, v in eval_metrics.items() if k.startswith("eval/ood_")}
                best, hacking = guard.update(state.step, eval_metrics["eval/train_cas"], ood)
                if best:
                    best_lora = {k: v.clone() for k, v in model.lora_state_dict().items()}
                if hacking and stage == "craft":
                    action = str(cfg.train.hacking_action)
                    _warn_hacking(guard, action, tracker)
            action = _broadcast(session, action)
            if action == "rollback":
                best_lora = _broadcast(session, best_lora)
                model.load_lora_state_dict(best_lora, source=f"best checkpoint under out-of-family CAS "
                                                             f"(step {guard.best_step})")
            if action in ("stop", "rollback"):
                state.stopped_early = f"reward hacking suspected at step {state.step}: {action}"
                last = True
        if state.step % log_every == 0 or last or evaluate_now:
            info["images_per_s"] = window_images / max(window_t, 1e-9)
            info["peak_rss_mb"] = _peak_rss_mb()
            # Wall time of this process's training loop without evaluations (reports and logging included).
            info["loop_s"] = time.perf_counter() - loop_start - eval_total
            if device.type == "cuda":
                info["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            metrics = {"step": state.step, **info}
            if rank == 0:
                _print_progress(stage, state.step, total, info, window_start)
                if tracker:
                    tracker.log_metrics({k: v for k, v in info.items() if _finite(v)}, state.step)
            window_t, window_images, window_start = 0.0, 0, state.step
            checkpoint_now = state.step % int(cfg.train.checkpoint_every) == 0 or last
            state.guard = asdict(guard)
            with tempfile.TemporaryDirectory(prefix="craft-ckpt-") as tmp:
                folder = None
                if checkpoint_now and rank == 0:
                    folder = _save_checkpoint(Path(tmp), model, opt, sched, scaler, state, best_lora)
                    if init_copy is not None:
                        shutil.copy(init_copy, Path(folder) / INIT_LORA_FILE)
                session.report({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}, folder)
        if last:
            break

    if rank == 0:
        final = model.save_lora(out_dir / stage / LORA_WEIGHT_NAME)
        summary = describe_metrics(metrics)
        print(f"[{stage}] done at step {state.step}{': ' + summary if summary else ''}; LoRA written to {final}",
              flush=True)
        if tracker:
            tracker.log_artifact(final, "lora")
            tracker.finish(state)
            if config.get("lora_token"):  # the driver may evaluate this LoRA while the next stage trains
                tracker.set_tag(LORA_TOKEN_TAG, str(config["lora_token"]))
    return state, model.lora_state_dict()


def _sft_loss(model: DiffusionModel, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    loss = model.diffusion_loss(batch["pixels"].to(model.device), batch["prompts"], generator=g,
                                cond_dropout=COND_DROPOUT)
    return loss, {"loss": float(loss.detach())}


def _craft_prompts(pool: dict[str, list[str]], labels_cycle: list[str], n: int, micro_step: int, g: torch.Generator,
                   rank: int, world: int) -> tuple[list[str], list[str]]:
    """``n`` labels, balanced over the label cycle, and a prompt for each drawn from its pool."""
    first = (micro_step * world + rank) * n
    labels = [labels_cycle[(first + i) % len(labels_cycle)] for i in range(n)]
    prompts = [pool[lab][int(torch.randint(len(pool[lab]), (1,), generator=g))] for lab in labels]
    return labels, prompts


def _craft_loss(model: DiffusionModel, cfg: DictConfig, reward_fn, pool: dict[str, list[str]],
                labels_cycle: list[str], real: StepBatches, micro_step: int, g: torch.Generator, rank: int,
                world: int, reference: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """draft_weight · (−mean reward of DRaFT-K samples) + preference_weight · preference loss
    + beta · diffusion loss on a real batch (``reference``: the preference term's reference LoRA)."""
    r = cfg.reward
    loss, parts = torch.zeros((), device=model.device), {}
    if float(r.preference_weight) > 0:
        if reference is None:
            raise UserError("reward.preference_weight > 0 needs the reference LoRA (the one CRAFT starts from)")
        pref, info = _preference_loss(model, cfg, reward_fn, pool, labels_cycle, micro_step, g, rank, world,
                                      reference)
        loss = loss + float(r.preference_weight) * pref
        parts.update(info)
    if float(r.draft_weight) > 0:
        reward, info = _draft_reward(model, cfg, reward_fn, pool, labels_cycle, micro_step, g, rank, world)
        loss = loss - float(r.draft_weight) * reward.mean()
        parts.update(info)
    beta = float(r.beta)
    if beta > 0:
        batch = real.batch(micro_step)
        diff = model.diffusion_loss(batch["pixels"].to(model.device), batch["prompts"], generator=g,
                                    cond_dropout=COND_DROPOUT)
        loss = loss + beta * diff
        parts["diffusion_loss"] = float(diff.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def _draft_reward(model: DiffusionModel, cfg: DictConfig, reward_fn, pool: dict[str, list[str]],
                  labels_cycle: list[str], micro_step: int, g: torch.Generator, rank: int, world: int
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """DRaFT-K: the reward [B] of a batch sampled with gradients through the last K steps."""
    s = cfg.sampling
    b = int(cfg.train.batch_size)
    labels, prompts = _craft_prompts(pool, labels_cycle, b, micro_step, g, rank, world)
    side = int(cfg.model.resolution) // model.latent_scale
    noise = torch.randn((b, model.latent_channels, side, side), generator=g).to(model.device)
    cond = model.encode_prompts(prompts)
    uncond = model.encode_prompts([""]).expand(b, -1, -1)
    k = draw_k(int(s.k), list(s.k_range) if s.k_range else None, int(s.num_steps), g)
    with model.autocast():
        traj = sample(model.unet, model.scheduler, cond, uncond, noise, num_steps=int(s.num_steps),
                      guidance_scale=float(s.guidance_scale), eta=float(s.eta), k=k, generator=g,
                      grad_checkpointing=model.gradient_checkpointing, timestep_spacing=str(s.timestep_spacing))
        latents = traj.latents
        if s.draft_lv:
            latents = draft_lv(model.unet, model.scheduler, cond, uncond, latents, num_steps=int(s.num_steps),
                               guidance_scale=float(s.guidance_scale), n=int(s.draft_lv_n), generator=g,
                               timestep_spacing=str(s.timestep_spacing))
            labels = labels * int(s.draft_lv_n)
            prompts = prompts * int(s.draft_lv_n)
    images = model.decode_latents(latents.float())
    reward, dims = reward_fn(images, prompts, [{"label": y} for y in labels], generator=g)
    parts = {"reward": float(reward.detach().mean()), "k": float(k)}
    parts.update({f"reward_{d}": float(v.mean()) for d, v in dims.items()})
    return reward, parts


def _preference_loss(model: DiffusionModel, cfg: DictConfig, reward_fn, pool: dict[str, list[str]],
                     labels_cycle: list[str], micro_step: int, g: torch.Generator, rank: int, world: int,
                     reference: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Online Diffusion-DPO (Wallace et al., 2024) on reward-ranked pairs of the model's own samples.

    Each of P prompts gets N samples (no gradients, the sampler of DRaFT and evaluation); the reward
    ranks them, and the best and the worst form a pair (x_w, x_l); with ``reward.preference_pairs=all``
    every two of a prompt's candidates form one, the better one the winner. With one noise and timestep
    shared by a prompt's candidates (``reward.preference_timesteps`` of them), the loss is the mean of
    −log σ(−β/2 · [(e_θ(x_w) − e_ref(x_w)) − (e_θ(x_l) − e_ref(x_l))]), e the per-sample denoising
    error of the LoRA being trained (θ) and of the ``reference`` LoRA. It follows the reward's ranking
    of whole samples rather than its gradient with respect to the pixels, which on the tiny world's cxr
    is adversarial while the ranking is good (docs/cxr-experiments.md); both samples of a pair come
    from the model, so what they share cancels.
    """
    s, r = cfg.sampling, cfg.reward
    n, num = int(r.preference_candidates), int(r.preference_prompts) or int(cfg.train.batch_size)
    labels, prompts = _craft_prompts(pool, labels_cycle, num, micro_step, g, rank, world)
    side = int(cfg.model.resolution) // model.latent_scale
    noise = torch.randn((num * n, model.latent_channels, side, side), generator=g).to(model.device)
    unet = getattr(model.unet, "module", model.unet)
    each = [p for p in prompts for _ in range(n)]
    each_label = [lab for lab in labels for _ in range(n)]
    with torch.no_grad():
        cond = model.encode_prompts(each)
        uncond = model.encode_prompts([""]).expand(num * n, -1, -1)
        latents = sample_no_grad(unet, model.scheduler, cond, uncond, noise, num_steps=int(s.num_steps),
                                 guidance_scale=float(s.guidance_scale), eta=float(s.eta), generator=g,
                                 timestep_spacing=str(s.timestep_spacing), threads=int(cfg.train.sample_threads),
                                 context=model.autocast).float()
        reward, _ = reward_fn(model.decode_latents(latents), each, [{"label": y} for y in each_label], generator=g)
    reward = reward.view(num, n)
    if str(r.preference_pairs) == "all":  # every candidate, best first: each earlier one wins against each later one
        order = reward.argsort(dim=1, descending=True, stable=True)
    else:  # the best and the worst
        order = torch.stack([reward.argmax(dim=1), reward.argmin(dim=1)], dim=1)
    m = order.shape[1]
    first = torch.arange(num, device=reward.device) * n
    reps = int(r.preference_timesteps)
    groups = num * reps  # each prompt's ranked candidates at `reps` noise levels, one noise shared within a group
    x0 = torch.cat([latents[first + order[:, j]].repeat(reps, 1, 1, 1) for j in range(m)])
    eps = torch.randn(x0[:groups].shape, generator=g).to(model.device).repeat(m, 1, 1, 1)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (groups,), generator=g).to(model.device).repeat(m)
    noisy = model.scheduler.add_noise(x0, eps, t)
    target = eps if model.scheduler.config.prediction_type == "epsilon" else model.scheduler.get_velocity(x0, eps, t)
    text = model.encode_prompts(prompts * reps * m)
    with torch.no_grad(), model.autocast():
        ref = torch.func.functional_call(unet, reference, (noisy, t), {"encoder_hidden_states": text}).sample
    ref_err = (ref.float() - target).pow(2).mean(dim=(1, 2, 3))
    err = (model.predict(noisy, t, text) - target).pow(2).mean(dim=(1, 2, 3))
    gap = (err - ref_err).view(m, groups)
    win, lose = torch.triu_indices(m, m, offset=1, device=gap.device)
    inside = -0.5 * float(r.preference_beta) * (gap[win] - gap[lose])
    loss = -F.logsigmoid(inside).mean()
    return loss, {"preference_loss": float(loss.detach()), "preference_accuracy": float((inside > 0).float().mean()),
                  "preference_reward_gap": float((reward.max(dim=1).values - reward.min(dim=1).values).mean()),
                  "preference_reward": float(reward.mean())}


def periodic_evaluation(model: DiffusionModel, cfg: DictConfig, setups: dict[str, ev.ScoringSetup], knowledge,
                        judge, tracker, step: int, stage: str) -> dict[str, float]:
    """Rank 0: generate the fixed evaluation set, score it, log grids; returns ``eval/*`` metrics."""
    t0 = time.perf_counter()
    n = int(cfg.train.eval_images_per_label)
    labels, prompts, seeds = ev.eval_plan(cfg, n)
    images = ev.generate(model, prompts, seeds, cfg.sampling, int(cfg.model.resolution),
                         threads=int(cfg.train.sample_threads))
    scores = ev.score_images(images, labels, setups, cfg, judge=judge, knowledge=knowledge)
    summary = ev.summarise(scores, {w: s.threshold.tau for w, s in setups.items()})
    if "judge_error" in scores:
        print(f"[{stage}] step {step}: checklist judge missing from this evaluation ({scores['judge_error']})",
              flush=True)
        if tracker:
            tracker.log_text(f"step {step}: {scores['judge_error']}\n", f"judge_missing_step_{step:06d}.txt")
    if tracker:
        pixels = ev.to_uint8(images)
        tracker.log_image(ev.image_grid(pixels, n), f"samples/{stage}_step_{step:06d}.png")
    out = {f"eval/{k}": v for k, v in summary.items()}
    out["eval/seconds"] = time.perf_counter() - t0
    return out


def _warn_hacking(guard: HackingGuard, action: str, tracker) -> None:
    steps = [h[0] for h in guard.history[-(guard.patience + 1):]]
    scores = " and ".join("CAS" if k == "cas" else k for k in guard.diverging())
    msg = (f"reward hacking suspected: the training evaluator's CAS rose while the out-of-family {scores} fell "
           f"over the evaluations at steps {steps}; best out-of-family CAS {guard.best_ood:.4f} at step "
           f"{guard.best_step}; action: {action}")
    warnings.warn(msg, stacklevel=2)
    print(f"WARNING: {msg}", flush=True)
    if tracker:
        tracker.set_tag("reward_hacking", msg)


def _print_progress(stage: str, step: int, total: int, info: dict[str, float], since: int) -> None:
    keys = ("loss", "reward", "preference_loss", "preference_accuracy", "diffusion_loss", "grad_norm", "images_per_s",
            "eval/train_cas", "eval/ood_cas", "eval/train_tail_rate", "eval/ood_tail_rate", "eval/judge",
            "eval/oracle_label")
    parts = [f"{k.removeprefix('eval/')} {info[k]:.4g}" for k in keys if k in info and _finite(info[k])]
    print(f"[{stage}] step {step}/{total} " + " ".join(parts), flush=True)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(folder: Path, model: DiffusionModel, opt, sched, scaler, state: StageState,
                     best_lora: dict[str, torch.Tensor] | None) -> str:
    from safetensors.torch import save_file

    model.save_lora(folder / LORA_WEIGHT_NAME)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state()}, folder / OPTIMIZER_FILE)
    if best_lora is not None:
        save_file(best_lora, str(folder / BEST_LORA_FILE))
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return str(folder)


def _load_checkpoint(folder: Path, model: DiffusionModel, opt, sched, scaler
                     ) -> tuple[StageState, dict[str, torch.Tensor] | None]:
    from safetensors.torch import load_file

    model.load_lora(folder / LORA_WEIGHT_NAME)
    blob = torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["rng"])
    state = StageState(**json.loads((folder / STATE_FILE).read_text()))
    best = load_file(str(folder / BEST_LORA_FILE)) if (folder / BEST_LORA_FILE).is_file() else None
    return state, best


def _checkpoint_stage(folder: Path) -> str | None:
    """The stage that wrote a checkpoint folder."""
    path = folder / STATE_FILE
    return json.loads(path.read_text()).get("stage") if path.is_file() else None


def read_progress(output_dir: str | Path, stage: str) -> dict | None:
    """The last ``progress.json`` of a stage (step, total, pid, time), or None."""
    path = Path(output_dir) / stage / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else None
