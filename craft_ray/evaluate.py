"""Evaluation of a generator: fixed-seed generation, CAS under both evaluators, tail rates, judge, oracle.

Used by training (periodic evaluation, the SFT-vs-CRAFT table at the end of ``stage=all``) and by
the sweep. The pieces:

- :class:`ScoringSetup` holds one evaluator's CAS machinery for a modality: the evaluator, its text
  embeddings, the realism reference bank (real training images) and the tail threshold tau_q
  (q-quantile of CAS over held-out real images). Banks and thresholds are computed once per
  (data, evaluator, knowledge version) and cached under ``data.cache_dir``.
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
from craft_ray.knowledge import Knowledge, load_knowledge, load_shipped
from craft_ray.modalities import get_modality
from craft_ray.sampling import sample

EVALUATORS = ("train", "ood")  # the training evaluator (reward) and the out-of-family one (audits)


def load_knowledge_for(cfg: Any) -> Knowledge:
    """The knowledge file of a config: ``knowledge.path`` or the shipped one for (modality, dataset)."""
    know = load_knowledge(cfg.knowledge.path) if cfg.knowledge.path else load_shipped(cfg.modality, cfg.data.dataset)
    if know.modality != cfg.modality or know.dataset != cfg.data.dataset:
        raise UserError(
            f"knowledge file {cfg.knowledge.path!r} is for {know.modality}/{know.dataset}, but the run is "
            f"{cfg.modality}/{cfg.data.dataset}"
        )
    return know


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def real_images(manifest, cfg: Any, split: str) -> tuple[torch.Tensor, list[str]]:
    """All images of one split as [N,3,H,W] in [-1,1] with their label names."""
    ds = ImageDataset(manifest, split, cfg.data.size, corrupt_images=cfg.data.corrupt_images)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["pixels"] for it in items]), [it["label_name"] for it in items]


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
        folder = Path(cfg.data.cache_dir) / "cas" / _data_id(cfg) / f"{_slug(evaluator.id)}-{knowledge.content_hash()}"
        kv = knowledge.content_hash()
        bank = cas.reference_bank(folder / "bank.safetensors", evaluator, kv, lambda: real_images(manifest, cfg, "train"),
                                  k=int(cfg.cas.realism_k))
        scorer = cas.CASScorer(evaluator, texts, bank)
        weights = cas.check_weights(dict(cfg.cas.weights))
        q = float(cfg.cas.q)
        tpath = folder / f"threshold_q{q:g}_{cas.weights_key(weights)}.json"
        if tpath.is_file():
            threshold = cas.Threshold.load(tpath, evaluator_id=evaluator.id, knowledge_version=kv, q=q, weights=weights)
        else:
            split = "test" if manifest.split("test") else "val"
            images, labels = real_images(manifest, cfg, split)
            with torch.no_grad():
                real_cas = torch.cat([scorer.score(images[i:i + 64], labels[i:i + 64], weights)[0]
                                      for i in range(0, len(labels), 64)])
            threshold = cas.compute_threshold(real_cas, q, modality=cfg.modality, evaluator_id=evaluator.id,
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
             batch_size: int = 32) -> torch.Tensor:
    """Images [N,3,H,W] in [-1,1] for (prompt, seed) pairs with DDIM (``sampling`` = cfg.sampling)."""
    unet = getattr(model.unet, "module", model.unet)  # never the DDP wrapper: rank 0 evaluates alone
    was_training = unet.training
    unet.eval()
    out = []
    uncond_one = model.encode_prompts([""])
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i:i + batch_size])
        latents = initial_noise(model, seeds[i:i + batch_size], resolution).to(model.device)
        cond = model.encode_prompts(p)
        with model.autocast():
            traj = sample(unet, model.scheduler, cond, uncond_one.expand(len(p), -1, -1), latents,
                          num_steps=int(sampling.num_steps), guidance_scale=float(sampling.guidance_scale),
                          eta=0.0, k=0, grad_checkpointing=False)
        out.append(model.decode_latents(traj.latents.float()).cpu())
    unet.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def score_images(images: torch.Tensor, labels: Sequence[str], setups: Mapping[str, ScoringSetup], cfg: Any, *,
                 judge=None, knowledge: Knowledge | None = None) -> dict[str, Any]:
    """Per-image scores of generated images [N,3,H,W] with label names ``labels``.

    Keys: ``{train,ood}_cas`` and ``{train,ood}_<dimension>`` (numpy [N]); ``judge`` [N] (NaN when no
    judge or the judges failed; ``judge_error`` then says why); ``oracle_label`` (phantom only).
    """
    weights = cas.check_weights(dict(cfg.cas.weights))
    scores: dict[str, Any] = {"labels": list(labels)}
    for name, setup in setups.items():
        parts = [setup.scorer.score(images[i:i + 64], labels[i:i + 64], weights) for i in range(0, len(labels), 64)]
        scores[f"{name}_cas"] = torch.cat([c for c, _ in parts]).cpu().numpy()
        for dim in parts[0][1]:
            scores[f"{name}_{dim}"] = torch.cat([d[dim] for _, d in parts]).cpu().numpy()
    pixels = to_uint8(images)
    scores["judge"] = np.full(len(labels), np.nan)
    if judge is not None and knowledge is not None:
        from PIL import Image

        try:
            for lab in sorted(set(labels)):
                idx = [i for i, y in enumerate(labels) if y == lab]
                pil = [Image.fromarray(pixels[i]) for i in idx]
                score, _, _ = cas.judge_checklist(judge, pil, lab, knowledge, gating=bool(cfg.cas.judge_gating))
                scores["judge"][idx] = score
        except Exception as exc:  # the judges are optional at evaluation time: record, do not fail training
            scores["judge"][:] = np.nan
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
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
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
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = ["| " + " | ".join(k.ljust(widths[k]) for k in keys) + " |",
             "|" + "|".join("-" * (widths[k] + 2) for k in keys) + "|"]
    lines += ["| " + " | ".join(r[k].ljust(widths[k]) for k in keys) + " |" for r in rows]
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


def evaluate_loras(cfg: Any, loras: Mapping[str, str | Path | None], *, n_per_label: int, judge=None,
                   device: str | torch.device = "cpu") -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Generate the final evaluation set (a seed set disjoint from the periodic one) with each LoRA
    (None = the base model) and score it; returns ({name: per-image scores}, {evaluator: tau})."""
    from craft_ray.models.diffusion import DiffusionModel

    knowledge = load_knowledge_for(cfg)
    manifest = load_dataset(cfg)
    setups = {w: ScoringSetup.build(cfg, w, knowledge, device, manifest) for w in EVALUATORS}
    labels, prompts, seeds = eval_plan(cfg, n_per_label, seed_offset=1_000_000)
    runs: dict[str, dict[str, Any]] = {}
    for name, lora in loras.items():
        model = DiffusionModel.from_config(cfg.model, device, seed=int(cfg.seed))
        if lora is not None:
            model.load_lora(lora)
        images = generate(model, prompts, seeds, cfg.sampling, int(cfg.model.resolution))
        runs[name] = score_images(images, labels, setups, cfg, judge=judge, knowledge=knowledge)
        runs[name]["grid"] = image_grid(to_uint8(images[:: max(1, n_per_label // 8)]), 8)
    return runs, {w: s.threshold.tau for w, s in setups.items()}


def main(argv: list[str]) -> int:
    """``python -m craft_ray.evaluate``: not in this version (the library above is; see the README)."""
    raise UserError(
        "the evaluate command is not in this version yet; `python -m craft_ray.train` (stage=all) prints and logs "
        "the SFT-vs-CRAFT evaluation table built from this module"
    )


if __name__ == "__main__":
    import sys

    from craft_ray.cli import run

    run(main, sys.argv[1:])
