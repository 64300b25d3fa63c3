"""The Clinical Alignment Score (CAS): four differentiable dimensions, thresholds and tail metrics.

Project definition (DESIGN.md, "The Clinical Alignment Score"). For images x of modality m with
labels y and an evaluator E = (image encoder f, text encoder g, logit scale s), cos = cosine:

1. label      softmax_y'( s·cos(f(x), g(prompt(y'))) ) at y, text embeddings averaged over a
              prompt ensemble (templates + enriched prompts) per label.
2. checklist  mean over the label's items of sigmoid( s·(cos(f(x), g(present)) − cos(f(x), g(absent))) ).
3. modality   softmax over the four modality descriptions plus distractors, at m.
4. realism    sigmoid((d~ − d)/q) where d = mean cosine distance from f(x) to its k nearest real
              embeddings of (m, y), and d~, q are the median and spread of the same leave-one-out
              distances among the real images.

Every function here is pure (tensors in, tensors out) so it runs the same in a test, a Train worker
and an evaluation job; the evaluator-specific text embeddings are computed once by :class:`CASTexts`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from craft_ray.errors import UserError
from craft_ray.knowledge import checklist_judge  # noqa: F401 (re-exported; the judges' ingress imports it there)
from craft_ray.modalities import DISTRACTORS, MODALITIES

DIMENSIONS: tuple[str, ...] = ("label", "checklist", "modality", "realism")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def check_weights(weights: Mapping[str, float], atol: float = 1e-6) -> dict[str, float]:
    """Validate CAS weights: the four dimensions, non-negative, summing to 1 (the simplex)."""
    unknown = sorted(set(weights) - set(DIMENSIONS))
    if unknown:
        raise UserError(f"unknown CAS dimension(s) {unknown} in weights; known: {', '.join(DIMENSIONS)}")
    w = {d: float(weights.get(d, 0.0)) for d in DIMENSIONS}
    negative = {d: v for d, v in w.items() if v < 0 or not np.isfinite(v)}
    if negative:
        raise UserError(f"CAS weights must be finite and >= 0, got {negative}")
    total = sum(w.values())
    if abs(total - 1.0) > atol:
        raise UserError(
            f"CAS weights must sum to 1 (the simplex), got {total:.6g} from {w}; use normalise_weights()"
        )
    return w


def weights_key(weights: Mapping[str, float]) -> str:
    """A short file-name-safe key of simplex weights, e.g. ``w0.25-0.25-0.25-0.25``."""
    w = check_weights(weights)
    return "w" + "-".join(f"{w[d]:.4g}" for d in DIMENSIONS)


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Project non-negative weights onto the simplex by dividing by their sum."""
    w = {d: float(weights.get(d, 0.0)) for d in DIMENSIONS}
    total = sum(w.values())
    if total <= 0 or any(v < 0 for v in w.values()):
        raise UserError(f"CAS weights {w} cannot be normalised: they need to be >= 0 with a positive sum")
    return {d: v / total for d, v in w.items()}


def combine(dims: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """CAS = sum_i w_i · dim_i over the dimensions present; [B] tensors in, [B] out."""
    w = check_weights(weights)
    missing = [d for d, v in w.items() if v > 0 and d not in dims]
    if missing:
        raise UserError(f"CAS weights give weight to {missing} but those dimensions were not computed")
    out = None
    for d, v in w.items():
        if v > 0:
            term = v * dims[d]
            out = term if out is None else out + term
    assert out is not None  # the weights sum to one, so some weight is positive
    return out


# --------------------------------------------------------------------------------------------
# The dimensions (pure functions of embeddings)
# --------------------------------------------------------------------------------------------


def label_dim(img: torch.Tensor, label_texts: torch.Tensor, target: torch.Tensor, scale: float | torch.Tensor
              ) -> torch.Tensor:
    """Pathology fidelity. img [B,D] and label_texts [L,D] L2-normalised, target [B] long -> [B] in [0,1]."""
    logits = scale * img @ label_texts.T
    return logits.softmax(dim=-1).gather(1, target[:, None]).squeeze(1)


def checklist_dim(
    img: torch.Tensor, present: torch.Tensor, absent: torch.Tensor, mask: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """Checklist satisfaction. img [B,D]; present/absent [B,K,D] (the items of each image's label);
    mask [B,K] (1 for real items, 0 for padding) -> [B] in [0,1]."""
    diff = torch.einsum("bd,bkd->bk", img, present) - torch.einsum("bd,bkd->bk", img, absent)
    sat = torch.sigmoid(scale * diff) * mask
    return sat.sum(1) / mask.sum(1).clamp_min(1)


def modality_dim(img: torch.Tensor, modality_texts: torch.Tensor, target: int, scale: float | torch.Tensor
                 ) -> torch.Tensor:
    """Modality consistency. img [B,D], modality_texts [M+distractors, D] -> [B] in [0,1]."""
    return (scale * img @ modality_texts.T).softmax(dim=-1)[:, target]


def knn_distance(emb: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Mean cosine distance from each emb [B,D] to its k nearest rows of bank [N,D] -> [B]."""
    dist = 1.0 - emb @ bank.T
    if exclude_self:
        # leave-one-out among the bank itself: the diagonal is the image's own zero distance
        dist = dist + torch.eye(dist.shape[0], dtype=dist.dtype, device=dist.device) * 4.0
    k = min(k, bank.shape[0] - (1 if exclude_self else 0))
    if k < 1:
        raise UserError("the realism reference bank needs at least 2 real images per label")
    return dist.topk(k, dim=1, largest=False).values.mean(1)


def realism_dim(d: torch.Tensor, median: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Realism from k-NN distances d [B] and the real images' median/spread [B] -> [B] in [0,1]."""
    return torch.sigmoid((median - d) / spread.clamp_min(1e-6))


# --------------------------------------------------------------------------------------------
# Text side: every prompt set embedded once per (evaluator, knowledge)
# --------------------------------------------------------------------------------------------


@dataclass
class CASTexts:
    """Evaluator text embeddings for one modality and label set (all L2-normalised)."""

    labels: list[str]  # label identifiers in class-index order
    label_texts: torch.Tensor  # [L, D] mean of the label's prompt ensemble, re-normalised
    present: torch.Tensor  # [L, K, D] checklist 'present' captions (padded)
    absent: torch.Tensor  # [L, K, D] checklist 'absent' captions (padded)
    item_mask: torch.Tensor  # [L, K] 1 for real items
    item_ids: list[list[str]]  # per label, the checklist item ids
    modality_texts: torch.Tensor  # [4 + distractors, D]
    modality_index: int  # row of this modality in modality_texts

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CASTexts:
        """Move every tensor to ``device`` (and ``dtype``)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return CASTexts(
            labels=self.labels, label_texts=move(self.label_texts), present=move(self.present),
            absent=move(self.absent), item_mask=move(self.item_mask), item_ids=self.item_ids,
            modality_texts=move(self.modality_texts), modality_index=self.modality_index,
        )


def build_texts(evaluator, knowledge, modality: str, dataset: str = "phantom") -> CASTexts:
    """Embed the label ensembles, checklist captions and modality descriptions with ``evaluator``.

    ``evaluator`` needs ``encode_texts(list[str]) -> [N,D]`` (normalised); ``knowledge`` is a
    :class:`craft_ray.knowledge.Knowledge` for (modality, dataset).
    """
    mod = MODALITIES[modality]
    labels = mod.label_names(dataset)
    ensembles = []
    for lab in labels:
        prompts = list(mod.prompts(lab, dataset)) + list(knowledge.prompts(lab))
        ensembles.append(F.normalize(evaluator.encode_texts(prompts).mean(0), dim=-1))
    label_texts = torch.stack(ensembles)

    k_max = max(len(knowledge.checklist(lab)) for lab in labels)
    dim = label_texts.shape[1]
    present = label_texts.new_zeros(len(labels), k_max, dim)
    absent = label_texts.new_zeros(len(labels), k_max, dim)
    mask = label_texts.new_zeros(len(labels), k_max)
    ids: list[list[str]] = []
    for i, lab in enumerate(labels):
        items = knowledge.checklist(lab)
        n = len(items)
        present[i, :n] = evaluator.encode_texts([it.present for it in items])
        absent[i, :n] = evaluator.encode_texts([it.absent for it in items])
        mask[i, :n] = 1.0
        ids.append([it.id for it in items])

    names = list(MODALITIES)
    modality_texts = evaluator.encode_texts([MODALITIES[n].description for n in names] + list(DISTRACTORS))
    return CASTexts(labels, label_texts, present, absent, mask, ids, modality_texts, names.index(modality))


# --------------------------------------------------------------------------------------------
# Realism reference bank
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceBank:
    """Real-image embeddings per label with their leave-one-out k-NN statistics."""

    embeddings: dict[str, torch.Tensor]  # label -> [N_label, D] L2-normalised real embeddings
    median: dict[str, float]  # label -> median leave-one-out k-NN distance d~
    spread: dict[str, float]  # label -> spread q (interquartile range / 1.349, a robust std)
    k: int  # neighbours averaged
    evaluator_id: str  # the evaluator that made the embeddings
    knowledge_version: str  # the knowledge hash the bank was built with

    def save(self, path: str | Path) -> Path:
        """Write embeddings as safetensors and the statistics as JSON metadata inside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"median": self.median, "spread": self.spread, "k": self.k,
                "evaluator_id": self.evaluator_id, "knowledge_version": self.knowledge_version}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({lab: e.contiguous() for lab, e in self.embeddings.items()}, str(tmp),
                  metadata={"craft_ray": json.dumps(meta)})
        os.replace(tmp, path)  # atomic: concurrent workers building the same bank never see half a file
        return path

    @staticmethod
    def load(path: str | Path, *, evaluator_id: str, knowledge_version: str) -> ReferenceBank:
        """Load a bank and refuse one built with another evaluator or knowledge version."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["craft_ray"])
        _check_provenance("reference bank", path, meta, evaluator_id, knowledge_version)
        return ReferenceBank(load_file(str(path)), meta["median"], meta["spread"], meta["k"],
                             meta["evaluator_id"], meta["knowledge_version"])

    def realism(self, emb: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        """Realism dimension for embeddings emb [B,D] whose labels are ``labels`` -> [B]."""
        out = torch.empty(emb.shape[0], dtype=emb.dtype, device=emb.device)
        for lab in set(labels):
            idx = torch.tensor([i for i, y in enumerate(labels) if y == lab], device=emb.device)
            bank = self.embeddings[lab].to(emb.device, emb.dtype)
            d = knn_distance(emb[idx], bank, self.k)
            med = torch.full_like(d, self.median[lab])
            spr = torch.full_like(d, self.spread[lab])
            out = out.index_put((idx,), realism_dim(d, med, spr))
        return out


def build_reference_bank(
    embeddings: torch.Tensor, labels: Sequence[str], *, k: int, evaluator_id: str, knowledge_version: str
) -> ReferenceBank:
    """Group real embeddings [N,D] by label and compute leave-one-out median and spread."""
    banks: dict[str, torch.Tensor] = {}
    med: dict[str, float] = {}
    spr: dict[str, float] = {}
    for lab in sorted(set(labels)):
        e = embeddings[[i for i, y in enumerate(labels) if y == lab]].detach().float().cpu()
        d = knn_distance(e, e, k, exclude_self=True).numpy()
        q25, q50, q75 = np.quantile(d, [0.25, 0.5, 0.75])
        banks[lab] = e
        med[lab] = float(q50)
        spr[lab] = float(max((q75 - q25) / 1.349, 1e-4))
    return ReferenceBank(banks, med, spr, k, evaluator_id, knowledge_version)


def reference_bank(path: str | Path, evaluator, knowledge_version: str, real: Callable[[], tuple[torch.Tensor, list[str]]],
                   *, k: int, batch: int = 128, evaluator_id: str | None = None) -> ReferenceBank:
    """The realism bank stored at ``path``: built once from ``real()`` -> (images [N,3,H,W], labels), then reused.

    ``evaluator_id`` names the evaluator in the bank's provenance (default: ``evaluator.identity()``,
    its id and a digest of its weights). A stored bank of another evaluator, other weights or another
    knowledge version is an error (delete it to rebuild).
    """
    path = Path(path)
    evaluator_id = evaluator_id or evaluator.identity()
    if path.is_file():
        return ReferenceBank.load(path, evaluator_id=evaluator_id, knowledge_version=knowledge_version)
    images, labels = real()
    with torch.no_grad():
        emb = torch.cat([evaluator.encode_images(images[i:i + batch]) for i in range(0, len(images), batch)])
    bank = build_reference_bank(emb, labels, k=k, evaluator_id=evaluator_id, knowledge_version=knowledge_version)
    bank.save(path)
    return bank


def _check_provenance(what: str, path: str | Path, meta: Mapping, evaluator_id: str, knowledge_version: str
                      ) -> None:
    for key, want in (("evaluator_id", evaluator_id), ("knowledge_version", knowledge_version)):
        if meta.get(key) != want:
            raise UserError(
                f"{what} {str(path)!r} was built with {key}={meta.get(key)!r} but the current one is {want!r}; "
                "rebuild it (delete the file) instead of reusing a stale one"
            )


# --------------------------------------------------------------------------------------------
# The scorer: images -> the four dimensions
# --------------------------------------------------------------------------------------------


class CASScorer:
    """Scores images [B,3,H,W] in [-1,1] on the four CAS dimensions with one evaluator (differentiable)."""

    def __init__(self, evaluator, texts: CASTexts, bank: ReferenceBank | None):
        self.evaluator = evaluator
        self.texts = texts
        self.bank = bank

    def dimensions(self, images: torch.Tensor, labels: Sequence[str]) -> dict[str, torch.Tensor]:
        """The four dimensions ([B] each, in [0,1]); realism only when a reference bank is set."""
        emb = self.evaluator.encode_images(images)
        return self.dimensions_from_embeddings(emb, labels)

    def dimensions_from_embeddings(self, emb: torch.Tensor, labels: Sequence[str]) -> dict[str, torch.Tensor]:
        """The dimensions for precomputed image embeddings emb [B,D]."""
        t = self.texts.to(emb.device, emb.dtype)
        unknown = sorted(set(labels) - set(t.labels))
        if unknown:
            raise UserError(f"unknown label(s) {unknown} for CAS; known: {', '.join(t.labels)}")
        target = torch.tensor([t.labels.index(y) for y in labels], device=emb.device)
        scale = self.evaluator.logit_scale
        dims = {
            "label": label_dim(emb, t.label_texts, target, scale),
            "checklist": checklist_dim(emb, t.present[target], t.absent[target], t.item_mask[target], scale),
            "modality": modality_dim(emb, t.modality_texts, t.modality_index, scale),
        }
        if self.bank is not None:
            dims["realism"] = self.bank.realism(emb, labels)
        return dims

    def score(self, images: torch.Tensor, labels: Sequence[str], weights: Mapping[str, float]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(CAS [B], dimensions) under ``weights``."""
        dims = self.dimensions(images, labels)
        return combine(dims, weights), dims


# --------------------------------------------------------------------------------------------
# Threshold tau_q and tail metrics
# --------------------------------------------------------------------------------------------


@dataclass
class Threshold:
    """The real-image reference threshold tau_q of one modality, with its provenance."""

    tau: float  # q-quantile of CAS over held-out real images
    q: float  # the quantile
    n: int  # real images it was computed on
    modality: str
    evaluator_id: str
    knowledge_version: str
    weights: dict[str, float]

    def save(self, path: str | Path) -> Path:
        """Write as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | Path, *, evaluator_id: str, knowledge_version: str, q: float | None = None,
             weights: Mapping[str, float] | None = None) -> Threshold:
        """Load a threshold; a different evaluator, knowledge version, q or weights is an error."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"threshold file {str(path)!r} not found; compute it with compute_threshold()")
        meta = json.loads(path.read_text())
        _check_provenance("threshold", path, meta, evaluator_id, knowledge_version)
        if q is not None and abs(meta["q"] - q) > 1e-12:
            raise UserError(f"threshold {str(path)!r} is for q={meta['q']} but q={q} was asked; recompute it")
        if weights is not None and any(abs(meta["weights"][d] - float(weights[d])) > 1e-9 for d in DIMENSIONS):
            raise UserError(f"threshold {str(path)!r} was computed with CAS weights {meta['weights']}, "
                            f"not {dict(weights)}; recompute it")
        return Threshold(**meta)


def _numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """float64 numpy copy of a tensor or array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.array(values, dtype=np.float64)


def compute_threshold(real_cas: torch.Tensor | np.ndarray, q: float, **provenance) -> Threshold:
    """tau_q = the q-quantile of real-image CAS values [N]."""
    if not 0.0 < q < 1.0:
        raise UserError(f"quantile q must lie in (0, 1), got {q}")
    values = _numpy(real_cas)
    return Threshold(tau=float(np.quantile(values, q)), q=q, n=int(values.size), **provenance)


def tail_rate(cas: torch.Tensor | np.ndarray, tau: float) -> float:
    """Share of images with CAS below tau."""
    values = _numpy(cas)
    return float((values < tau).mean())


def tail_reduction(rate: float, baseline_rate: float) -> dict[str, float]:
    """Absolute (points) and relative reduction of a tail rate against a baseline's."""
    absolute = baseline_rate - rate
    relative = absolute / baseline_rate if baseline_rate > 0 else float("nan")
    return {"absolute": absolute, "relative": relative}


def bootstrap_ci(values: np.ndarray | Sequence[float], stat=np.mean, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): percentile bootstrap confidence interval of ``stat`` over ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise UserError("cannot bootstrap an empty set of values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = np.array([stat(x[i]) for i in idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(stat(x)), float(lo), float(hi)


def tail_rate_ci(cas: np.ndarray | Sequence[float], tau: float, **kw) -> tuple[float, float, float]:
    """Tail rate with its bootstrap confidence interval."""
    below = (np.asarray(cas, dtype=np.float64) < tau).astype(np.float64)
    return bootstrap_ci(below, np.mean, **kw)


def tail_reduction_ci(cas: np.ndarray, baseline_cas: np.ndarray, tau: float, *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Absolute and relative tail-rate reduction vs a baseline with independent bootstrap CIs."""
    a = (np.asarray(cas, dtype=np.float64) < tau).astype(np.float64)
    b = (np.asarray(baseline_cas, dtype=np.float64) < tau).astype(np.float64)
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1)
    rb = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(1)
    absolute = rb - ra
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(rb > 0, absolute / rb, np.nan)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    point = tail_reduction(float(a.mean()), float(b.mean()))
    return {
        "absolute": (point["absolute"], *map(float, np.quantile(absolute, [lo_q, hi_q]))),
        "relative": (point["relative"], *map(float, np.nanquantile(relative, [lo_q, hi_q]))),
    }


# --------------------------------------------------------------------------------------------
# The MLLM twin of the checklist dimension
# --------------------------------------------------------------------------------------------


def judge_checklist(judge, images: Sequence, label: str, knowledge, *, gating: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Ask ``judge`` every checklist question of ``label`` about each image.

    ``judge`` is anything with ``p_yes(images, questions) -> list[float]``: an LLM engine in process,
    or the judges client over Ray Serve. ``images`` are PIL images of label ``label``. Returns
    (checklist twin score [B], P(yes) [B,K], item ids).
    """
    items = knowledge.checklist(label)
    ids = [it.id for it in items]
    pairs_img = [img for img in images for _ in items]
    pairs_q = [it.question for _ in images for it in items]
    p = np.asarray(judge.p_yes(pairs_img, pairs_q), dtype=np.float64).reshape(len(images), len(items))
    parents = {it.id: it.parent for it in items}
    return checklist_judge(p, ids, parents, gating=gating), p, ids
