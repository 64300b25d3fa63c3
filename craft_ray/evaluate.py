"""Evaluation of a generator: fixed-seed generation, CAS under both evaluators, tail rates, judge, oracle.

Used by training (periodic evaluation, the SFT-vs-CRAFT table at the end of ``stage=all``) and by
the sweep. The pieces:

- :class:`ScoringSetup` holds one evaluator's CAS machinery for a modality: the evaluator, its text
  embeddings, the realism reference bank (real training images) and the tail threshold tau_q
  (q-quantile of CAS over held-out real images). Banks and thresholds are computed once per
  (data, evaluator id and weights, knowledge version) and cached under ``data.cache_dir``.
- :func:`generate` draws images for (prompt, seed) pairs; the initial noise of an image depends on
  its seed only, so a fixed seed set gives the same images whatever the batch size.
- :func:`score_images` computes every per-image score; :func:`summarise` and :func:`compare_table`
  turn scores into metrics and the SFT-vs-CRAFT table with 95 % bootstrap confidence intervals.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft_ray import cas
from craft_ray.data.dataset import ImageDataset, load_dataset, phantom_cache_dir
from craft_ray.errors import UserError
from craft_ray.knowledge import Knowledge, load_knowledge, load_knowledge_for, load_shipped  # noqa: F401
from craft_ray.modalities import get_modality
from craft_ray.sampling import sample_no_grad

EVALUATORS = ("train", "ood")  # the training evaluator (reward) and the out-of-family one (audits)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def real_images(manifest, cfg: Any, split: str) -> tuple[torch.Tensor, list[str]]:
    """All images of one split as [N,3,H,W] in [-1,1] with their label names."""
    ds = ImageDataset(manifest, split, cfg.data.size, corrupt_images=cfg.data.corrupt_images)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["pixels"] for it in items]), [it["label_name"] for it in items]


def held_out_split(manifest) -> str:
    """The split of held-out real images (tau_q, audits, downstream testing): test, else val."""
    return "test" if manifest.split("test") else "val"


def _data_id(cfg: Any) -> str:
    if cfg.data.source == "phantom":
        return phantom_cache_dir(cfg).name
    digest = hashlib.sha256(str(Path(cfg.data.manifest).absolute()).encode()).hexdigest()[:12]
    return f"{cfg.modality}_{cfg.data.dataset}_{cfg.data.size}_{digest}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[-60:]


@dataclass
class ScoringSetup:
    """One evaluator's CAS machinery for a modality (see the module docstring)."""

    name: str  # "train" or "ood"
    scorer: cas.CASScorer
    threshold: cas.Threshold

    @property
    def evaluator(self):
        return self.scorer.evaluator

    @staticmethod
    def build(cfg: Any, which: str, knowledge: Knowledge, device: torch.device | str = "cpu",
              manifest=None) -> ScoringSetup:
        """Load the evaluator ``which`` (train | ood) of ``cfg`` with its bank and threshold (cached)."""
        from craft_ray.models.evaluators import load_evaluator

        if which not in EVALUATORS:
            raise ValueError(f"which must be one of {EVALUATORS}, got {which!r}")
        ev_cfg = cfg.model.evaluator if which == "train" else cfg.model.ood_evaluator
        evaluator = load_evaluator(ev_cfg, device)
        texts = cas.build_texts(evaluator, knowledge, cfg.modality, cfg.data.dataset)
        manifest = manifest if manifest is not None else load_dataset(cfg)
        digest, kv = evaluator.weights_digest(), knowledge.content_hash()  # same path, new weights: a new cache
        identity = f"{evaluator.id}@{digest}"
        folder = Path(cfg.data.cache_dir) / "cas" / _data_id(cfg) / f"{_slug(evaluator.id)}-{digest}-{kv}"
        bank = cas.reference_bank(folder / "bank.safetensors", evaluator, kv, lambda: real_images(manifest, cfg, "train"),
                                  k=int(cfg.cas.realism_k), evaluator_id=identity)
        scorer = cas.CASScorer(evaluator, texts, bank)
        weights = cas.check_weights(dict(cfg.cas.weights))
        q = float(cfg.cas.q)
        tpath = folder / f"threshold_q{q:g}_{cas.weights_key(weights)}.json"
        if tpath.is_file():
            threshold = cas.Threshold.load(tpath, evaluator_id=identity, knowledge_version=kv, q=q, weights=weights)
        else:
            images, labels = real_images(manifest, cfg, held_out_split(manifest))
            with torch.no_grad():
                real_cas = torch.cat([scorer.score(images[i:i + 64], labels[i:i + 64], weights)[0]
                                      for i in range(0, len(labels), 64)])
            threshold = cas.compute_threshold(real_cas, q, modality=cfg.modality, evaluator_id=identity,
                                              knowledge_version=kv, weights=weights)
            threshold.save(tpath)
        return ScoringSetup(which, scorer, threshold)


def eval_plan(cfg: Any, n_per_label: int, seed_offset: int = 0) -> tuple[list[str], list[str], list[int]]:
    """The fixed evaluation set: (labels, canonical prompts, seeds), ``n_per_label`` per label."""
    mod = get_modality(cfg.modality)
    labels, prompts, seeds = [], [], []
    for j, lab in enumerate(mod.label_names(cfg.data.dataset)):
        for i in range(n_per_label):
            labels.append(lab)
            prompts.append(mod.prompt(lab, cfg.data.dataset))
            seeds.append(seed_offset + 100_000 * j + i)
    return labels, prompts, seeds


def initial_noise(model, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """Initial latents [N,C,h,w]: image i's noise comes from a generator seeded with seeds[i]."""
    side = resolution // model.latent_scale
    shape = (model.latent_channels, side, side)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(model, prompts: Sequence[str], seeds: Sequence[int], sampling: Any, resolution: int,
             batch_size: int = 32, threads: int = 1) -> torch.Tensor:
    """Images [N,3,H,W] in [-1,1] for (prompt, seed) pairs with DDIM (``sampling`` = cfg.sampling); each
    batch shared by ``threads`` Python threads (:func:`craft_ray.sampling.sample_no_grad`)."""
    unet = getattr(model.unet, "module", model.unet)  # never the DDP wrapper: rank 0 evaluates alone
    was_training = unet.training
    unet.eval()
    out = []
    uncond_one = model.encode_prompts([""])
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i:i + batch_size])
        latents = initial_noise(model, seeds[i:i + batch_size], resolution).to(model.device)
        cond = model.encode_prompts(p)
        latents = sample_no_grad(unet, model.scheduler, cond, uncond_one.expand(len(p), -1, -1), latents,
                                 num_steps=int(sampling.num_steps), guidance_scale=float(sampling.guidance_scale),
                                 timestep_spacing=str(sampling.timestep_spacing), threads=threads,
                                 context=model.autocast)
        out.append(model.decode_latents(latents.float()).cpu())
    unet.train(was_training)
    return torch.cat(out)


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 images [B,H,W,3] -> float [B,3,H,W] in [-1,1] (inverse of :func:`to_uint8`)."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1  # a writable copy


@torch.no_grad()
def score_images(images: torch.Tensor, labels: Sequence[str], setups: Mapping[str, ScoringSetup], cfg: Any, *,
                 judge=None, knowledge: Knowledge | None = None, embedding: str | None = None) -> dict[str, Any]:
    """Per-image scores of generated images [N,3,H,W] with label names ``labels``.

    Keys: ``{train,ood}_cas`` and ``{train,ood}_<dimension>`` (numpy [N]); ``judge`` [N] (NaN when no
    judge or the judges failed; ``judge_error`` then says why) and ``judge_items`` (label -> item ids
    and P(yes) [n_label, K]); ``oracle_label`` (phantom only); ``embedding`` [N,D] (float32, L2-normalised)
    of the evaluator named by ``embedding``, when given.
    """
    weights = cas.check_weights(dict(cfg.cas.weights))
    scores: dict[str, Any] = {"labels": list(labels)}
    for name, setup in setups.items():
        embs = [setup.evaluator.encode_images(images[i:i + 64]) for i in range(0, len(labels), 64)]
        parts = [setup.scorer.dimensions_from_embeddings(e, labels[i * 64:(i + 1) * 64]) for i, e in enumerate(embs)]
        scores[f"{name}_cas"] = torch.cat([cas.combine(d, weights) for d in parts]).cpu().numpy()
        for dim in parts[0]:
            scores[f"{name}_{dim}"] = torch.cat([d[dim] for d in parts]).cpu().numpy()
        if name == embedding:
            emb = torch.nn.functional.normalize(torch.cat(embs).float(), dim=-1)
            scores["embedding"] = emb.cpu().numpy().astype(np.float32)
    pixels = to_uint8(images)
    scores["judge"] = np.full(len(labels), np.nan)
    scores["judge_items"] = {}
    if judge is not None and knowledge is not None:
        from PIL import Image

        try:
            for lab in sorted(set(labels)):
                idx = [i for i, y in enumerate(labels) if y == lab]
                pil = [Image.fromarray(pixels[i]) for i in idx]
                score, p, ids = cas.judge_checklist(judge, pil, lab, knowledge, gating=bool(cfg.cas.judge_gating))
                scores["judge"][idx] = score
                scores["judge_items"][lab] = {"ids": list(ids), "p": np.asarray(p)}
        except Exception as exc:  # the judges are optional at evaluation time: record, do not fail training
            scores["judge"][:] = np.nan
            scores["judge_items"] = {}
            scores["judge_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if cfg.data.source == "phantom":
        from craft_ray.data.phantom import oracle

        predicted = [oracle.classify(cfg.modality, p) for p in pixels]
        scores["oracle_label"] = np.array([p == y for p, y in zip(predicted, labels, strict=True)], dtype=np.float64)
    return scores


def summarise(scores: Mapping[str, Any], taus: Mapping[str, float]) -> dict[str, float]:
    """Scalar metrics: means of every score, tail rates under each evaluator's tau (``taus``: evaluator ->
    tau), judge and oracle means."""
    out: dict[str, float] = {}
    for key, value in scores.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.ndim == 1:
            finite = value[np.isfinite(value)]
            out[key] = float(finite.mean()) if finite.size else float("nan")
    for name, tau in taus.items():
        out[f"{name}_tail_rate"] = cas.tail_rate(scores[f"{name}_cas"], tau)
        out[f"{name}_tau"] = float(tau)
    out["judge_missing"] = float("judge_error" in scores or not np.isfinite(scores["judge"]).any())
    return out


# ----------------------------------------------------------------------------------------------- tables


def _ci(value: tuple[float, float, float], pct: bool = False) -> str:
    est, lo, hi = value
    if any(math.isnan(v) for v in value):
        return "n/a"
    if pct:
        return f"{100 * est:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def compare_rows(runs: Mapping[str, Mapping[str, Any]], taus: Mapping[str, float], *, n_boot: int = 1000,
                 seed: int = 0) -> list[dict[str, str]]:
    """Rows of the comparison table (first run = baseline) with 95 % bootstrap CIs.

    ``runs``: run name -> per-image scores (:func:`score_images`); ``taus``: evaluator -> tau.
    """
    names = list(runs)
    base = runs[names[0]]
    rows: list[dict[str, str]] = []

    def row(metric: str, cells: dict[str, str]) -> None:
        rows.append({"metric": metric, **cells})

    dims = [k.removeprefix("train_") for k in base if k.startswith("train_") and k != "train_cas"]
    boot = {"n_boot": n_boot, "seed": seed}
    for ev, title in (("train", "training evaluator"), ("ood", "out-of-family evaluator")):
        if f"{ev}_cas" not in base:
            continue
        tau = taus[ev]
        row(f"CAS mean ({title})", {n: _ci(cas.bootstrap_ci(runs[n][f"{ev}_cas"], **boot)) for n in names})
        if ev == "train":
            for d in dims:
                row(f"  {d}", {n: _ci(cas.bootstrap_ci(runs[n][f"train_{d}"], **boot)) for n in names})
        row(f"tail rate % below tau={tau:.3f} ({title})",
            {n: _ci(cas.tail_rate_ci(runs[n][f"{ev}_cas"], tau, **boot), pct=True) for n in names})
        red = {n: cas.tail_reduction_ci(runs[n][f"{ev}_cas"], base[f"{ev}_cas"], tau, **boot) for n in names[1:]}
        row(f"  tail reduction, points ({title})", {names[0]: "-", **{n: _ci(red[n]["absolute"], pct=True) for n in red}})
        row(f"  tail reduction, relative % ({title})",
            {names[0]: "-", **{n: _ci(red[n]["relative"], pct=True) for n in red}})
    if np.isfinite(base["judge"]).any():
        row("checklist judge (MLLM)", {n: _ci(cas.bootstrap_ci(runs[n]["judge"][np.isfinite(runs[n]["judge"])], **boot))
                                       if np.isfinite(runs[n]["judge"]).any() else "n/a" for n in names})
    if "oracle_label" in base:
        row("oracle label accuracy % (phantom)",
            {n: _ci(cas.bootstrap_ci(runs[n]["oracle_label"], **boot), pct=True) for n in names})
    return rows


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [{k: str(r[k]).replace("|", "\\|") for k in keys} for r in rows]  # a literal pipe inside a cell
    widths = {k: max(len(k), *(len(r[k]) for r in cells)) for k in keys}
    lines = ["| " + " | ".join(k.ljust(widths[k]) for k in keys) + " |",
             "|" + "|".join("-" * (widths[k] + 2) for k in keys) + "|"]
    lines += ["| " + " | ".join(r[k].ljust(widths[k]) for k in keys) + " |" for r in cells]
    return "\n".join(lines)


def image_grid(images: np.ndarray, ncol: int) -> np.ndarray:
    """uint8 images [N,H,W,3] tiled into one [rows*H, ncol*W, 3] grid (1-px white gutters)."""
    n, h, w, c = images.shape
    rows = -(-n // ncol)
    grid = np.full((rows * (h + 1) - 1, ncol * (w + 1) - 1, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        grid[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = img
    return grid


def evaluate_lora(cfg: Any, lora: str | Path | dict[str, torch.Tensor] | None, *, n_per_label: int,
                  labels: Sequence[str] | None = None, judge=None, device: str | torch.device = "cpu"
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    """Generate the final evaluation set (a seed set disjoint from the periodic one) with ``lora`` (a file or
    folder, a diffusers-format state dict, or None for the base model) and score it; returns (per-image
    scores, {evaluator: tau}).

    ``labels``: only these labels' part of the set, with the seeds the whole set gives them, so shards
    split by label concatenate (:func:`merge_scores`) to the whole set. The scores carry ``thumbs``,
    uint8 [k,H,W,3], every (n_per_label // 8)-th image, for a sample grid.
    """
    from craft_ray.models.diffusion import DiffusionModel

    knowledge = load_knowledge_for(cfg)
    manifest = load_dataset(cfg)
    setups = {w: ScoringSetup.build(cfg, w, knowledge, device, manifest) for w in EVALUATORS}
    names, prompts, seeds = eval_plan(cfg, n_per_label, seed_offset=1_000_000)
    if labels is not None:
        wanted = set(labels)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise UserError(f"no such labels in the {cfg.modality} evaluation set: {', '.join(unknown)}")
        keep = [i for i, lab in enumerate(names) if lab in wanted]
        names, prompts, seeds = ([xs[i] for i in keep] for xs in (names, prompts, seeds))
    model = DiffusionModel.from_config(cfg.model, device, seed=int(cfg.seed))
    if isinstance(lora, dict):
        model.load_lora_state_dict(lora)
    elif lora is not None:
        model.load_lora(lora)
    images = generate(model, prompts, seeds, cfg.sampling, int(cfg.model.resolution))
    scores = score_images(images, names, setups, cfg, judge=judge, knowledge=knowledge)
    scores["thumbs"] = to_uint8(images[:: max(1, n_per_label // 8)])
    return scores, {w: s.threshold.tau for w, s in setups.items()}


# ----------------------------------------------------------------------------------------- the command

EPILOG = """examples:
  python -m craft_ray.evaluate --base                           # the base model, embedded default (phantom cxr)
  python -m craft_ray.evaluate --lora runs/craft-cxr/sft        # a LoRA folder or .safetensors file
  python -m craft_ray.evaluate --run RUN_ID                      # an MLflow run of craft_ray.train: its config + LoRA
  python -m craft_ray.evaluate --lora runs/craft-cxr/craft evaluation.num_workers=2 evaluation.images_per_label=64
  python -m craft_ray.evaluate compare runs/evaluations/craft-cxr-sft runs/evaluations/craft-cxr-craft

Writes report.md, report.html (self-contained), scores.npz and summary.json to --out (default
<output_dir>/evaluations/<subject>, e.g. runs/evaluations/craft-cxr-sft) and logs them to an MLflow
run tagged stage=evaluate. `compare` takes evaluation folders or the MLflow run ids of evaluations.
"""

SCORES_FILE = "scores.npz"  # per-image scores of the generated set (what `compare` reads)
REAL_FILE = "real_scores.npz"  # per-image CAS of the held-out real images (report histograms)
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"  # the generated images as PNGs, indexed by images.csv (index, file, label, prompt, seed)
ARTIFACT_DIR = "evaluation"  # where an evaluation's files go in its MLflow run


@dataclass
class Subject:
    """What is evaluated: the base model, a LoRA file, or the LoRA of an MLflow training run."""

    kind: str  # base | lora | run
    name: str  # short name: output folder, report arm, MLflow run name
    lora: Path | None  # diffusers-format LoRA safetensors file; None = the base model
    run_id: str | None = None


def lora_file(path: str | Path) -> Path:
    """A LoRA safetensors file from a file or a folder holding one (as written by training)."""
    from craft_ray.models.diffusion import LORA_WEIGHT_NAME

    p = Path(path)
    f = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"LoRA {str(path)!r} not found: pass a .safetensors file or a folder holding {LORA_WEIGHT_NAME}")
    return f


def _lora_name(path: str | Path) -> str:
    """A short name for a LoRA path: ``<run>-<stage>`` for a training stage folder (runs/NAME/sft), else
    the folder's name or the file's stem."""
    from craft_ray.models.diffusion import LORA_WEIGHT_NAME

    p = Path(path).absolute()
    if p.suffix == ".safetensors" and p.name != LORA_WEIGHT_NAME:
        return p.stem
    folder = p.parent if p.name == LORA_WEIGHT_NAME else p
    return f"{folder.parent.name}-{folder.name}" if folder.name in ("sft", "craft") else folder.name


def _download(c, run_id: str, artifact_path: str, dst: Path) -> Path | None:
    try:
        return Path(c.download_artifacts(run_id, artifact_path, str(dst)))
    except Exception:  # MLflow raises several types for a missing artifact
        return None


def subject_from_run(tracking_uri: str, run_id: str, dst: Path) -> tuple[Subject, Path | None, str | None]:
    """The LoRA of an MLflow training run (a stage=all run means its CRAFT stage), the run's logged
    config file (or None) and its modality tag; artifacts are downloaded under ``dst``."""
    from craft_ray import tracking

    c = tracking.client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except Exception as exc:
        raise UserError(f"no MLflow run {run_id!r} in {tracking_uri} ({type(exc).__name__})") from exc
    tags = run.data.tags
    lora_run = run
    if tags.get("stage") == "all":
        children = c.search_runs([run.info.experiment_id],
                                 f"tags.`mlflow.parentRunId` = '{run_id}' and tags.stage = 'craft'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
        if not children:
            raise UserError(f"MLflow run {run_id} (stage=all) has no CRAFT child run to evaluate")
        lora_run = children[0]
    lid = lora_run.info.run_id
    folder = _download(c, lid, "lora", dst / "lora")
    if folder is None:
        raise UserError(f"MLflow run {lid} has no 'lora' artifact (stage={lora_run.data.tags.get('stage')!r}); "
                        "evaluate the run of a finished sft or craft stage, or pass --lora PATH")
    config = None
    for rid in (lid, run_id, lora_run.data.tags.get("mlflow.parentRunId")):
        if rid and config is None:
            config = _download(c, rid, "config/config.yaml", dst / "config")
    stage = lora_run.data.tags.get("stage", "run")
    subject = Subject("run", f"{lora_run.data.tags.get('craft_ray.name', lid[:8])}-{stage}", lora_file(folder), lid)
    return subject, config, tags.get("modality")


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _map(actors: Sequence[Any], method: str, calls: Sequence[tuple], desc: str) -> list[Any]:
    """Run ``actor.method(*args)`` for every args tuple, one call in flight per actor, with a progress bar;
    results in call order."""
    import ray
    from tqdm import tqdm

    results: list[Any] = [None] * len(calls)
    free, pending = list(actors), {}
    todo = list(enumerate(calls))
    with tqdm(total=len(calls), desc=desc, unit="batch", dynamic_ncols=True) as bar:
        while todo or pending:
            while todo and free:
                i, args = todo.pop(0)
                actor = free.pop()
                pending[getattr(actor, method).remote(*args)] = (i, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(done[0])
            results[i] = ray.get(done[0])
            free.append(actor)
            bar.update(1)
    return results


class EvaluationWorker:
    """A Ray actor holding the generator (base + LoRA) and both evaluators' scoring setups."""

    def __init__(self, cfg_dict: dict, lora_state: dict[str, torch.Tensor] | None, lora_name: str,
                 use_judges: bool) -> None:
        from omegaconf import OmegaConf

        from craft_ray.models.diffusion import DiffusionModel

        cfg = self.cfg = OmegaConf.create(cfg_dict)
        torch.set_num_threads(max(1, int(cfg.evaluation.cpus_per_worker)))
        self.device = "cuda" if cfg.evaluation.use_gpu and torch.cuda.is_available() else "cpu"
        self.knowledge = load_knowledge_for(cfg)
        self.manifest = load_dataset(cfg)
        self.setups = {w: ScoringSetup.build(cfg, w, self.knowledge, self.device, self.manifest) for w in EVALUATORS}
        self.model = DiffusionModel.from_config(cfg.model, self.device, seed=int(cfg.seed))
        if lora_state is not None:
            self.model.load_lora_state_dict(lora_state, source=lora_name)
        self.judge = None
        if use_judges:
            from craft_ray.judges.client import connect_or_none

            self.judge = connect_or_none(cfg)

    def generate(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """uint8 images [N,H,W,3] for (prompt, seed) pairs."""
        images = generate(self.model, prompts, seeds, self.cfg.sampling, int(self.cfg.model.resolution),
                          batch_size=len(prompts))
        return to_uint8(images)

    def score(self, pixels: np.ndarray, labels: list[str]) -> dict[str, Any]:
        """Per-image scores (see :func:`score_images`) of uint8 images [N,H,W,3], with embeddings."""
        return score_images(from_uint8(pixels), labels, self.setups, self.cfg, judge=self.judge,
                            knowledge=self.knowledge, embedding=str(self.cfg.evaluation.embedding))

    def held_out(self) -> dict[str, Any]:
        """Scores and embeddings (see :func:`score_images`) of the held-out real images (no judge)."""
        images, labels = real_images(self.manifest, self.cfg, held_out_split(self.manifest))
        return score_images(images, labels, self.setups, self.cfg, embedding=str(self.cfg.evaluation.embedding))

    @torch.no_grad()
    def train_embeddings(self) -> np.ndarray:
        """L2-normalised embeddings [N,D] of the real training images under ``evaluation.embedding``."""
        images, _ = real_images(self.manifest, self.cfg, "train")
        evaluator = self.setups[str(self.cfg.evaluation.embedding)].evaluator
        emb = torch.cat([evaluator.encode_images(images[i:i + 64]) for i in range(0, len(images), 64)])
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()

    def train_pixels(self, indices: list[int]) -> np.ndarray:
        """uint8 images [len(indices),H,W,3] of the real training images at ``indices``."""
        ds = ImageDataset(self.manifest, "train", self.cfg.data.size, corrupt_images=self.cfg.data.corrupt_images)
        return to_uint8(torch.stack([ds[i]["pixels"] for i in indices]))

    def downstream(self, pixels: np.ndarray, labels: list[str]) -> dict[str, dict[str, float]]:
        """:func:`downstream` classification on this actor's CPUs (or GPU)."""
        return downstream(self.cfg, self.manifest, pixels, labels)

    def taus(self) -> dict[str, float]:
        return {w: s.threshold.tau for w, s in self.setups.items()}


def _wait_started(actors: Sequence[Any], opts: Mapping[str, Any], timeout_s: float) -> dict[str, float]:
    """Wait until every actor has loaded its models; a cluster that cannot place them all is an error
    (calls to an actor that never starts would wait forever). Returns the tail thresholds."""
    import ray

    refs = [a.taus.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        raise UserError(
            f"only {len(ready)} of {len(refs)} evaluation actors started within {timeout_s:g} s; each needs {dict(opts)} "
            f"and the cluster has {free} free: lower evaluation.num_workers or evaluation.cpus_per_worker, or raise "
            "evaluation.start_timeout_s when nodes are still coming up")
    return ray.get(refs[0])


def merge_scores(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate the per-image scores of consecutive batches (judge items per label, first error kept)."""
    out: dict[str, Any] = {"labels": [y for p in parts for y in p["labels"]]}
    for key, value in parts[0].items():
        if isinstance(value, np.ndarray):
            out[key] = np.concatenate([p[key] for p in parts])
    items: dict[str, dict[str, Any]] = {}
    for p in parts:
        for lab, it in p.get("judge_items", {}).items():
            if lab in items:
                items[lab]["p"] = np.concatenate([items[lab]["p"], it["p"]])
            else:
                items[lab] = {"ids": list(it["ids"]), "p": np.asarray(it["p"])}
    out["judge_items"] = items
    errors = [p["judge_error"] for p in parts if "judge_error" in p]
    if errors:
        out["judge_error"] = errors[0]
        out["judge"] = np.full(len(out["labels"]), np.nan)
        out["judge_items"] = {}
    return out


def checklist_audit(judge_items: Mapping[str, Mapping[str, Any]], threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """Per label and checklist item, the share of images the judge answers yes (P(yes) >= threshold)."""
    return {lab: dict(zip(it["ids"], (np.asarray(it["p"]) >= threshold).mean(axis=0).tolist(), strict=True))
            for lab, it in judge_items.items()}


def per_label_rows(scores: Mapping[str, Any], taus: Mapping[str, float]) -> list[dict[str, str]]:
    """One row per label: image count, CAS mean and tail rate under each evaluator, judge, oracle."""
    labels = np.asarray(scores["labels"])
    rows = []
    for lab in dict.fromkeys(scores["labels"]):
        m = labels == lab
        row = {"label": lab, "n": str(int(m.sum()))}
        for ev in EVALUATORS:
            if f"{ev}_cas" in scores:
                row[f"{ev} CAS"] = f"{float(scores[f'{ev}_cas'][m].mean()):.3f}"
                row[f"{ev} tail %"] = f"{100 * cas.tail_rate(scores[f'{ev}_cas'][m], taus[ev]):.1f}"
        judge = scores["judge"][m]
        row["judge"] = f"{np.nanmean(judge):.3f}" if np.isfinite(judge).any() else "n/a"
        if "oracle_label" in scores:
            row["oracle %"] = f"{100 * float(scores['oracle_label'][m].mean()):.1f}"
        rows.append(row)
    return rows


def _image_set_metrics(emb: np.ndarray, real_train: np.ndarray, mem: Mapping[str, Any], k: int) -> dict[str, float]:
    """FD, precision/recall/density/coverage of embeddings ``emb`` against the real training ones, and the
    summary of their memorization result ``mem`` (:func:`craft_ray.metrics.memorization`)."""
    from craft_ray import metrics

    out = {"fd": metrics.frechet_distance(emb, real_train),
           **metrics.precision_recall_coverage(real_train, emb, k=k),
           "mean_nn_cosine": float(mem["mean_nn_sim"]), "memorized_share": float(mem["share_above"])}
    return {k_: float(v) for k_, v in out.items()}


def downstream(cfg: Any, manifest, pixels: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Downstream classification: a small CNN trained on synthetic (uint8 ``pixels`` with ``labels``), real,
    and real + synthetic images, each tested on held-out real images."""
    from craft_ray import metrics

    xr, yr = real_images(manifest, cfg, "train")
    xt, yt = real_images(manifest, cfg, held_out_split(manifest))
    real = (to_uint8(xr), yr)
    sets = {"synthetic": (pixels, labels), "real": real,
            "real+synthetic": (np.concatenate([real[0], pixels]), list(yr) + list(labels))}
    e = cfg.evaluation
    return metrics.downstream_classification(
        sets, (to_uint8(xt), yt), get_modality(cfg.modality).label_names(cfg.data.dataset),
        epochs=int(e.classifier_epochs), batch_size=int(e.classifier_batch_size), lr=float(e.classifier_lr),
        seed=int(cfg.seed), device="cuda" if e.use_gpu and torch.cuda.is_available() else "cpu", progress=True)


def _fmt(v: float, pct: bool = False) -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def evaluate(cfg: Any, subject: Subject, out_dir: Path) -> dict[str, Any]:
    """Generate the fixed evaluation set with ``subject`` on the Ray cluster, score it, compute every
    metric, write the report to ``out_dir`` and log it to MLflow; returns the summary."""
    import json
    import time

    import ray
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from craft_ray import metrics, report, tracking
    from craft_ray.train import ensure_judges, init_ray

    t0 = time.perf_counter()
    tracking.client(cfg.tracking.tracking_uri)  # a refused tracking URI fails before Ray starts
    e = cfg.evaluation
    if int(e.num_workers) < 1:
        raise UserError(f"evaluation.num_workers={e.num_workers}: need at least 1 Ray actor")
    init_ray(cfg)
    use_judges = bool(cfg.cas.use_judge) and ensure_judges(cfg)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    lora_ref = ray.put(load_file(str(subject.lora))) if subject.lora is not None else None
    opts: dict[str, Any] = {"num_cpus": float(e.cpus_per_worker)}
    if e.worker_resources:
        opts["resources"] = {str(k): float(v) for k, v in e.worker_resources.items()}
    if e.use_gpu:
        opts["num_gpus"] = 1
    worker_cls = ray.remote(EvaluationWorker)
    actors = [worker_cls.options(**opts).remote(cfg_dict, lora_ref, subject.name, use_judges)
              for _ in range(int(e.num_workers))]
    try:
        taus = _wait_started(actors, opts, float(e.start_timeout_s))
        labels, prompts, seeds = eval_plan(cfg, int(e.images_per_label), seed_offset=int(e.seed_offset))
        chunks = _chunks(len(labels), int(e.batch_size))
        t_gen = time.perf_counter()
        pixels = np.concatenate(_map(actors, "generate", [(prompts[c], seeds[c]) for c in chunks],
                                     f"generate {subject.name}"))
        t_score = time.perf_counter()
        scores = merge_scores(_map(actors, "score", [(pixels[c], labels[c]) for c in chunks], "score"))
        t_real = time.perf_counter()
        # Everything after generation runs on the actors, which already hold their CPUs: on a small
        # machine a new task could wait forever behind them and the judges.
        downstream_ref = actors[0].downstream.remote(pixels, labels)
        train_emb, real_test = ray.get([actors[-1].train_embeddings.remote(), actors[-1].held_out.remote()])
        thr, k = float(e.memorization_threshold), int(e.pr_k)
        mem = metrics.memorization(scores["embedding"], train_emb, thr)
        top = np.argsort(-mem["nn_sim"])[: int(e.top_pairs)]
        nearest = ray.get(actors[-1].train_pixels.remote([int(mem["nn_index"][i]) for i in top]))
        classification = ray.get(downstream_ref)
        t_end = time.perf_counter()
    finally:
        for a in actors:
            ray.kill(a)

    image_set = {"generated": _image_set_metrics(scores["embedding"], train_emb, mem, k),
                 "held-out real": _image_set_metrics(real_test["embedding"], train_emb,
                                                     metrics.memorization(real_test["embedding"], train_emb, thr), k)}
    pairs = [(pixels[i], real, float(mem["nn_sim"][i])) for i, real in zip(top, nearest, strict=True)]
    audit = checklist_audit(scores["judge_items"])
    n = len(labels)
    summary = {
        "subject": {"kind": subject.kind, "name": subject.name,
                    "lora": str(subject.lora) if subject.kind == "lora" else None,  # a run's LoRA: see run_id
                    "run_id": subject.run_id},
        "modality": cfg.modality, "dataset": cfg.data.dataset, "images": n, "taus": taus,
        "metrics": summarise(scores, taus),
        "image_set": image_set, "memorization_threshold": thr, "embedding": str(e.embedding),
        "downstream": classification, "audit": audit, "judge_error": scores.get("judge_error"),
        "timing_s": {"generate": t_score - t_gen, "score": t_real - t_score, "real_and_downstream": t_end - t_real,
                     "total": time.perf_counter() - t0},
        "images_per_s": {"generate": n / (t_score - t_gen), "score": n / (t_real - t_score)},
        "num_workers": int(e.num_workers),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_scores(out_dir / SCORES_FILE, scores, nn_sim=mem["nn_sim"])
    if e.save_images:
        save_images(out_dir / IMAGES_DIR, pixels, labels, prompts, seeds)
    save_scores(out_dir / REAL_FILE, real_test)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float))
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tables = _report_tables(cfg, subject.name, scores, taus, summary)
    arms = [report.Arm("real (held-out)", list(real_test["labels"]), _cas_of(real_test)),
            report.Arm(subject.name, list(labels), _cas_of(scores),
                       grid=image_grid(pixels[:: max(1, int(e.images_per_label) // 8)], 8), audit=audit or None,
                       memorization_pairs=pairs)]
    notes = [f"{n} images ({int(e.images_per_label)} per label, seeds from {int(e.seed_offset)}) generated with "
             f"{subject.kind} {subject.name} on {int(e.num_workers)} Ray worker(s); {cfg.modality} "
             f"({cfg.data.dataset}); 95 % bootstrap CIs in brackets."]
    if not cfg.cas.use_judge:
        notes.append("checklist judge off (cas.use_judge=false): no judge score, no checklist audit")
    elif summary["judge_error"] or not use_judges:
        notes.append(f"checklist judge missing: {summary['judge_error'] or 'judges not available (see log)'}")
    paths = report.write_report(out_dir, title=f"Evaluation of {subject.name} ({cfg.modality})", arms=arms,
                                taus=taus, tables=tables, notes=notes)
    _log_evaluation(cfg, subject, out_dir, summary)
    print(f"\n{(out_dir / 'report.md').read_text()}", flush=True)
    print(f"report: {paths['html']}\n(evaluation {summary['timing_s']['total']:.0f} s)", flush=True)
    return summary


def _cas_of(scores: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {ev: np.asarray(scores[f"{ev}_cas"]) for ev in EVALUATORS if f"{ev}_cas" in scores}


def _report_tables(cfg: Any, name: str, scores: Mapping[str, Any], taus: Mapping[str, float],
                   summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    tables = [("CAS and tail rates", markdown_table(compare_rows({name: scores}, taus, n_boot=int(cfg.cas.bootstrap),
                                                                   seed=int(cfg.seed)))),
              ("Per label", markdown_table(per_label_rows(scores, taus)))]
    sets = summary["image_set"]
    keys = [("fd", "Fréchet distance to real training images"), ("precision", "precision"), ("recall", "recall"),
            ("density", "density"), ("coverage", "coverage"), ("mean_nn_cosine", "mean whitened cosine to the nearest real training image"),
            ("memorized_share", f"share with that cosine >= {summary['memorization_threshold']:g} (%)")]
    rows = [{"metric": title, **{s: f"{v[key]:.3g}" if key == "fd" else _fmt(v[key], pct=key == "memorized_share")
                                 for s, v in sets.items()}} for key, title in keys]
    tables.append((f"Fidelity, diversity and memorization ({summary['embedding']} evaluator embeddings; held-out "
                   "real images as the reference level)", markdown_table(rows)))
    ds = summary["downstream"]
    tables.append(("Downstream classification (small CNN, tested on held-out real images)", markdown_table(
        [{"trained on": s, "images": str(int(v["n_train"])), "accuracy %": _fmt(v["accuracy"], True),
          "macro-F1": _fmt(v["macro_f1"]), "macro-AUROC": _fmt(v["macro_auroc"])} for s, v in ds.items()])))
    if summary["audit"]:
        rows = [{"label": lab, "item": item, "pass %": _fmt(rate, True)}
                for lab, items in summary["audit"].items() for item, rate in items.items()]
        tables.append(("Checklist audit (MLLM judge, share of images answered yes)", markdown_table(rows)))
    return tables


def save_scores(path: Path, scores: Mapping[str, Any], **extra: np.ndarray) -> None:
    """Per-image scores as .npz: labels and every 1-D numeric array (embeddings and pixels are not kept)."""
    arrays = {k: v for k, v in scores.items() if isinstance(v, np.ndarray) and v.ndim == 1}
    np.savez_compressed(path, labels=np.asarray(scores["labels"]), **arrays, **extra)


def save_images(folder: Path, pixels: np.ndarray, labels: Sequence[str], prompts: Sequence[str],
                seeds: Sequence[int]) -> Path:
    """uint8 images [N,H,W,3] as ``folder/00000.png`` ... with ``folder/images.csv`` (index, file, label, prompt,
    seed); images with the same (label, seed) from two generators are matched pairs."""
    import csv

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "images.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "label", "prompt", "seed"])
        for i, (img, lab, prompt, seed) in enumerate(zip(pixels, labels, prompts, seeds, strict=True)):
            Image.fromarray(img).save(folder / f"{i:05d}.png")
            w.writerow([i, f"{i:05d}.png", lab, prompt, int(seed)])
    return folder / "images.csv"


def load_scores(path: Path) -> dict[str, Any]:
    """Per-image scores written by :func:`save_scores`."""
    with np.load(path) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files}
    out["labels"] = [str(y) for y in out["labels"]]
    return out


def _log_evaluation(cfg: Any, subject: Subject, out_dir: Path, summary: Mapping[str, Any]) -> str:
    from craft_ray import tracking

    c = tracking.client(cfg.tracking.tracking_uri)
    tags = {"stage": "evaluate", "modality": str(cfg.modality), tracking.NAME_TAG: str(cfg.name),
            "craft_ray.subject": subject.name}
    if subject.run_id:
        tags["craft_ray.evaluated_run"] = subject.run_id
    run_id = c.create_run(tracking.experiment_id(cfg), run_name=f"eval-{subject.name}", tags=tags).info.run_id
    t = tracking.StageTracker(cfg.tracking.tracking_uri, run_id)
    flat = {f"eval/{k}": v for k, v in summary["metrics"].items()}
    flat.update({f"eval/{s}/{k}": v for s, m in summary["image_set"].items() for k, v in m.items()})
    flat.update({f"eval/downstream/{s}/{k}": v for s, m in summary["downstream"].items() for k, v in m.items()})
    t.log_metrics({k.replace(" ", "_").replace("+", "_plus_"): v for k, v in flat.items() if np.isfinite(v)}, 0)
    c.log_artifacts(run_id, str(out_dir), ARTIFACT_DIR)
    c.set_terminated(run_id, "FINISHED")
    print(f"MLflow: run {run_id} (experiment {cfg.tracking.experiment!r})", flush=True)
    return run_id


# ------------------------------------------------------------------------------------------ compare


def evaluation_folder(ref: str, tracking_uri: str, dst: Path) -> Path:
    """The folder of an evaluation: ``ref`` itself, or the ``evaluation`` artifacts of MLflow run ``ref``
    downloaded under ``dst``."""
    folder = Path(ref)
    if (folder / SCORES_FILE).is_file():
        return folder
    from craft_ray import tracking

    got = _download(tracking.client(tracking_uri), ref, ARTIFACT_DIR, dst / ref)
    if got is None or not (got / SCORES_FILE).is_file():
        raise UserError(f"{ref!r} is neither an evaluation folder (with {SCORES_FILE}) nor an MLflow run id "
                        f"of an evaluation in {tracking_uri}")
    return got


def load_evaluation(ref: str, tracking_uri: str, dst: Path) -> tuple[str, dict[str, Any], dict[str, Any], dict]:
    """(name, per-image scores, held-out real scores, summary) of an evaluation folder or MLflow run id."""
    import json

    folder = evaluation_folder(ref, tracking_uri, dst)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    return summary["subject"]["name"], load_scores(folder / SCORES_FILE), load_scores(folder / REAL_FILE), summary


def compare(refs: Sequence[str], cfg: Any, out_dir: Path) -> list[dict[str, str]]:
    """The side-by-side table of evaluations (first = baseline) with 95 % bootstrap CIs, and a report."""
    import tempfile

    from craft_ray import report

    if len(refs) < 2:
        raise UserError("compare needs at least two evaluations (folders or MLflow run ids)")
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [load_evaluation(r, cfg.tracking.tracking_uri, Path(tmp)) for r in refs]
    names: list[str] = []
    for name, *_ in loaded:
        unique = name if name not in names else f"{name} ({len(names) + 1})"
        names.append(unique)
    first = loaded[0][3]
    for (_, _, _, s), ref in zip(loaded, refs, strict=True):
        if (s["modality"], s["dataset"]) != (first["modality"], first["dataset"]):
            raise UserError(f"{ref} evaluates {s['modality']}/{s['dataset']}, {refs[0]} {first['modality']}/"
                            f"{first['dataset']}: compare evaluations of one modality")
        diff = {ev: (s["taus"].get(ev), first["taus"][ev]) for ev in first["taus"]
                if not abs(s["taus"].get(ev, np.nan) - first["taus"][ev]) <= 1e-9}  # a missing tau differs too
        if diff:
            raise UserError(f"{ref} was scored against other tail thresholds than {refs[0]} ({diff}): the evaluators, "
                            "knowledge or CAS weights differ; compare evaluations made with the same ones")
        if s["images"] != first["images"]:
            print(f"warning: {ref} has {s['images']} images, {refs[0]} {first['images']}", flush=True)
    runs = {n: sc for n, (_, sc, _, _) in zip(names, loaded, strict=True)}
    taus = first["taus"]
    rows = compare_rows(runs, taus, n_boot=int(cfg.cas.bootstrap), seed=int(cfg.seed))
    table = markdown_table(rows)
    sets = [("fd", "Fréchet distance to real training images", False), ("precision", "precision", False),
            ("recall", "recall", False), ("coverage", "coverage", False),
            ("memorized_share", "memorized share % (whitened cosine >= threshold)", True)]
    other = [{"metric": title, **{n: _fmt(s["image_set"]["generated"][key], pct) for n, (*_, s) in zip(names, loaded,
                                                                                                       strict=True)}}
             for key, title, pct in sets]
    other += [{"metric": f"downstream {metric}{' %' if metric == 'accuracy' else ''}, trained on synthetic only",
               **{n: _fmt(s["downstream"]["synthetic"][metric], metric == "accuracy")
                  for n, (*_, s) in zip(names, loaded, strict=True)}}
              for metric in ("accuracy", "macro_auroc")]
    arms = [report.Arm("real (held-out)", loaded[0][2]["labels"], _cas_of(loaded[0][2]))]
    arms += [report.Arm(n, sc["labels"], _cas_of(sc)) for n, sc in runs.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = report.write_report(out_dir, title=f"Comparison: {' vs '.join(names)} ({first['modality']})", arms=arms,
                                taus=taus, tables=[("CAS and tail rates (first column = baseline)", table),
                                                   ("Image-set metrics and downstream classification",
                                                    markdown_table(other))],
                                notes=[f"95 % bootstrap CIs ({int(cfg.cas.bootstrap)} resamples) in brackets; tail "
                                       f"reductions are against {names[0]}."])
    print(table, flush=True)
    print(f"report: {paths['html']}", flush=True)
    return rows


def main(argv: list[str]) -> int:
    """``python -m craft_ray.evaluate``: evaluate one generator, or ``compare`` stored evaluations."""
    import time

    from craft_ray.cli import Parser, add_common_flags, config_parser, resolve, split_config_args
    from craft_ray.config import load_config, to_yaml

    if argv and argv[0] == "compare":
        parser = Parser(prog="python -m craft_ray.evaluate compare", epilog=EPILOG,
                        description="side-by-side table and report of stored evaluations (the first is the baseline)")
        parser.add_argument("refs", nargs="+", metavar="EVAL", help="evaluation folder or MLflow run id")
        parser.add_argument("--out", help="report folder (default runs/compare-<time>)")
        parser.add_argument("--tracking-uri", help="MLflow tracking URI for run ids (default: the config's)")
        add_common_flags(parser)
        ns = parser.parse_args(argv[1:])
        cfg = load_config(None, [f"tracking.tracking_uri={ns.tracking_uri}"] if ns.tracking_uri else [])
        out = Path(ns.out or Path(cfg.output_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
        compare(ns.refs, cfg, out)
        return 0

    parser = config_parser("evaluate", __doc__.splitlines()[0], EPILOG)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", metavar="RUN_ID", help="MLflow run of craft_ray.train (stage=all: its CRAFT stage)")
    what.add_argument("--lora", metavar="PATH", help="LoRA .safetensors file or folder")
    what.add_argument("--base", action="store_true", help="the base model without LoRA")
    parser.add_argument("--out", help="output folder (default <output_dir>/evaluations/<subject>)")
    ns = parser.parse_args(argv)
    if not ns.run:
        cfg = resolve(ns)
        subject = (Subject("base", f"base-{cfg.modality}", None) if ns.base else
                   Subject("lora", _lora_name(ns.lora), lora_file(ns.lora)))
        evaluate(cfg, subject, Path(ns.out) if ns.out else Path(cfg.output_dir) / "evaluations" / subject.name)
        return 0
    import tempfile

    config_file, overrides = split_config_args(ns.args)
    cfg = load_config(config_file, overrides)  # names the tracking URI to find the run in
    with tempfile.TemporaryDirectory(prefix="craft-eval-") as tmp:  # the run's LoRA and config, while needed
        subject, run_config, modality = subject_from_run(cfg.tracking.tracking_uri, ns.run, Path(tmp))
        if config_file is None and run_config is not None:  # the run's own config, with the overrides on top
            cfg = load_config(run_config, overrides)
        if modality and cfg.modality != modality:
            raise UserError(f"run {ns.run} is a {modality} run but the config says modality={cfg.modality}")
        if ns.print_config:
            print(to_yaml(cfg), end="")
            return 0
        evaluate(cfg, subject, Path(ns.out) if ns.out else Path(cfg.output_dir) / "evaluations" / subject.name)
    return 0


if __name__ == "__main__":
    import sys

    from craft_ray.cli import run

    run(main, sys.argv[1:])
