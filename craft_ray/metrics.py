"""Image-set metrics for the evaluation suite: memorization, Fréchet distance, PRDC, downstream classification.

Every function is pure (arrays in, plain Python / numpy out): the caller embeds images with an
evaluator and passes the embeddings, so nothing here knows about models, Ray or MLflow.

- :func:`nearest_real` / :func:`memorization`: cosine similarity of each generated image to its
  nearest real (training) image; an exact copy scores 1.0. By default the cosine is taken after
  whitening with the real images' mean and covariance (:func:`whitening`): evaluator embeddings of
  one modality crowd into a narrow cone (held-out phantom images sit at raw cosine 0.99+ to their
  nearest training image), and whitening spreads that cone so a fixed threshold separates copies.
- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two embedding sets
  (FID when the embeddings are Inception features; here the evaluator's image embeddings).
- :func:`precision_recall_coverage`: k-NN manifold precision and recall (Kynkäänniemi et al. 2019)
  and density and coverage (Naeem et al. 2020), on Euclidean distances.
- :func:`downstream_classification`: train a small CNN on each training set (synthetic, real, both)
  and report accuracy, macro F1 and macro AUROC on held-out real images.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn
from tqdm import tqdm

_ROWS_PER_BLOCK = 1024  # rows of a distance block: 1024 x 50k float64 is 400 MB


# --------------------------------------------------------------------------------------------
# Memorization
# --------------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError(f"{name} has {int((norms == 0).sum())} all-zero row(s); cosine similarity is undefined")
    return x / norms


def nearest_real(query: np.ndarray, reference: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of each query row [N,D] to its nearest reference row [M,D]: (sims [N] float64, indices [N] int64).

    Both sides are L2-normalised here. The similarity matrix is built in ``chunk`` x ``chunk`` tiles,
    so memory stays O(chunk²) whatever N and M; ties go to the lowest reference index.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    q = _unit_rows(query, "query")
    r = _unit_rows(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query has dimension {q.shape[1]} but reference has {r.shape[1]}")
    sims = np.full(len(q), -np.inf)
    indices = np.zeros(len(q), dtype=np.int64)
    for qs in range(0, len(q), chunk):
        best, best_idx = sims[qs : qs + chunk], indices[qs : qs + chunk]  # views: updated in place
        for rs in range(0, len(r), chunk):
            tile = q[qs : qs + chunk] @ r[rs : rs + chunk].T
            arg = tile.argmax(axis=1)
            top = tile[np.arange(len(tile)), arg]
            better = top > best  # strict: an earlier tile keeps a tie
            best[better] = top[better]
            best_idx[better] = arg[better] + rs
    return np.clip(sims, -1.0, 1.0), indices


def whitening(reference: np.ndarray, shrinkage: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], W [D,D]) such that ``(x - mean) @ W`` has identity covariance over ``reference`` [M,D].

    The covariance is shrunk towards its mean eigenvalue by ``shrinkage`` so that directions the
    reference barely spans (M < D, or a collapsed embedding) are not blown up without bound.
    """
    x = np.asarray(reference, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"reference must be a 2-D array [M, D] with M >= 2, got shape {x.shape}")
    mean = x.mean(axis=0)
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    vals, vecs = np.linalg.eigh(cov)
    return mean, vecs / np.sqrt(np.maximum(vals, 1e-12))


def memorization(gen_emb: np.ndarray, real_emb: np.ndarray, threshold: float, *, whiten: bool = True
                 ) -> dict[str, Any]:
    """Nearest-training-image similarity of generated embeddings [N,D] against real ones [M,D].

    With ``whiten`` both sides are whitened with the real set's statistics (:func:`whitening`) before
    the cosine. Returns ``nn_sim`` [N] (cosine), ``nn_index`` [N] (row of ``real_emb``), ``share_above``
    (fraction of generated images with ``nn_sim >= threshold``), ``threshold`` and ``mean_nn_sim``.
    """
    if whiten:
        mean, w = whitening(real_emb)
        gen_emb, real_emb = (np.asarray(gen_emb, np.float64) - mean) @ w, (np.asarray(real_emb, np.float64) - mean) @ w
    sims, idx = nearest_real(gen_emb, real_emb)
    return {
        "nn_sim": sims,
        "nn_index": idx,
        "share_above": float(np.mean(sims >= threshold)),
        "threshold": float(threshold),
        "mean_nn_sim": float(sims.mean()),
    }


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def _gaussian(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be a 2-D array [N, D] with N >= 2 to fit a covariance, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm_or_none(m: np.ndarray) -> np.ndarray | None:
    """Principal square root of ``m``, or None when ``m`` is singular or the root is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(m)
        except scipy.linalg.LinAlgWarning:
            return None
    return root if np.all(np.isfinite(root)) else None


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to embeddings a [N,D] and b [M,D] (squared units of a, b).

    FD = |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^½). When S_a S_b is singular (e.g. fewer
    samples than dimensions) ``eps``·I is added to both covariances first, as in pytorch-fid.
    """
    mu_a, cov_a = _gaussian(a, "a")
    mu_b, cov_b = _gaussian(b, "b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"a has dimension {mu_a.shape[0]} but b has {mu_b.shape[0]}")
    root = _sqrtm_or_none(cov_a @ cov_b)
    if root is None:
        offset = eps * np.eye(len(mu_a))
        root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # The root of a product of PSD matrices is real up to round-off; drop the imaginary residue.
    root = np.real(root)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))
    return max(fd, 0.0)  # round-off makes identical sets come out slightly negative


# --------------------------------------------------------------------------------------------
# Precision, recall, density, coverage
# --------------------------------------------------------------------------------------------


def _distance_blocks(x: np.ndarray, y: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Euclidean distances from x [N,D] to y [M,D] in row blocks: (rows of x, block [rows, M])."""
    y_sq = np.einsum("ij,ij->i", y, y)
    for start in range(0, len(x), _ROWS_PER_BLOCK):
        rows = slice(start, start + _ROWS_PER_BLOCK)
        xb = x[rows]
        sq = np.einsum("ij,ij->i", xb, xb)[:, None] + y_sq[None, :] - 2.0 * (xb @ y.T)
        yield rows, np.sqrt(np.maximum(sq, 0.0))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x [N,D] to its k-th nearest other row: [N]."""
    radii = np.empty(len(x))
    for rows, block in _distance_blocks(x, x):
        # Column 0 of the sorted row is the point itself (distance 0), so the k-th neighbour is index k.
        radii[rows] = np.partition(block, k, axis=1)[:, k]
    return radii


def precision_recall_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """k-NN precision/recall (Kynkäänniemi 2019) and density/coverage (Naeem 2020) of fake [M,D] vs real [N,D].

    Distances are Euclidean on the features as given (the evaluation passes L2-normalised embeddings,
    where Euclidean distance is a monotone function of cosine similarity). A sample's manifold ball
    is closed, with radius the distance to its k-th nearest neighbour in its own set.

    - precision: share of fake samples inside at least one real ball.
    - recall: share of real samples inside at least one fake ball.
    - density: mean number of real balls containing a fake sample, divided by k (can exceed 1).
    - coverage: share of real samples whose ball contains at least one fake sample.
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be 2-D arrays with the same dimension, got {real.shape} and {fake.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= len(real) or k >= len(fake):
        raise ValueError(
            f"k={k} needs more than k samples in each set, got {len(real)} real and {len(fake)} fake; "
            f"lower k or pass more samples"
        )
    real_radii = _knn_radii(real, k)
    fake_radii = _knn_radii(fake, k)
    fake_in_real = np.zeros(len(fake), dtype=bool)
    real_balls_per_fake = np.zeros(len(fake), dtype=np.int64)
    real_in_fake = np.empty(len(real), dtype=bool)
    real_covered = np.empty(len(real), dtype=bool)
    for rows, block in _distance_blocks(real, fake):  # block [real rows, fake]
        inside_real_ball = block <= real_radii[rows, None]
        fake_in_real |= inside_real_ball.any(axis=0)
        real_balls_per_fake += inside_real_ball.sum(axis=0)
        real_in_fake[rows] = (block <= fake_radii[None, :]).any(axis=1)
        real_covered[rows] = inside_real_ball.any(axis=1)
    return {
        "precision": float(fake_in_real.mean()),
        "recall": float(real_in_fake.mean()),
        "density": float(real_balls_per_fake.mean() / k),
        "coverage": float(real_covered.mean()),
    }


# --------------------------------------------------------------------------------------------
# Downstream classification
# --------------------------------------------------------------------------------------------


def _classifier(num_classes: int) -> nn.Module:
    """Three stride-2 3x3 convs (16/32/64 channels) with BatchNorm and ReLU, global average pool, linear."""
    layers: list[nn.Module] = []
    channels = (3, 16, 32, 64)
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes))


def _as_tensors(
    images: np.ndarray, labels: Sequence[str], index: Mapping[str, int], label_names: Sequence[str], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,H,W,3] and label names -> (float32 [N,3,H,W] in [-1,1], int64 class indices [N])."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{name} has {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{name} has no images")
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise ValueError(f"unknown label {unknown[0]!r} in {name}; known: {', '.join(label_names)}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    y = torch.tensor([index[lab] for lab in labels], dtype=torch.int64)
    return x, y


def _train(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int, batch_size: int, lr: float, seed: int,
    device: str, desc: str, progress: bool,
) -> nn.Module:
    # Seed initialisation without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _classifier(num_classes)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:
                continue  # BatchNorm cannot normalise a single sample in training mode
            logits = model(x[batch].to(device))
            loss = F.cross_entropy(logits, y[batch].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _probabilities(model: nn.Module, x: torch.Tensor, batch_size: int, device: str) -> np.ndarray:
    """Class probabilities [N, C] of a trained classifier."""
    parts = [model(x[s : s + batch_size].to(device)).softmax(dim=1).cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(parts).double().numpy()


def _macro_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over classes present in y_true; NaN unless every such class has negatives."""
    present = np.unique(y_true)
    if len(present) < 2:
        return math.nan  # a single class in the test set: no negatives for it
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))


def downstream_classification(
    train_sets: Mapping[str, tuple[np.ndarray, Sequence[str]]],
    test: tuple[np.ndarray, Sequence[str]],
    label_names: Sequence[str],
    *,
    epochs: int = 15,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Train a fresh small CNN on each training set and evaluate it on held-out real images.

    ``train_sets`` maps a set name (e.g. "synthetic", "real", "real+synthetic") to (uint8 images
    [N,H,W,3], label names [N]); ``test`` is (uint8 images [T,H,W,3], label names [T]). Every set gets
    the same seed (initialisation and shuffling), so the sets differ only in their data; on CPU the
    result is bit-for-bit reproducible. Returns per set ``accuracy``, ``macro_f1`` and ``macro_auroc``
    (one-vs-rest, averaged over the classes present in ``test``) and ``n_train``.
    """
    if len(set(label_names)) != len(label_names) or len(label_names) < 2:
        raise ValueError(f"label_names must hold at least two distinct names, got {list(label_names)}")
    index = {lab: i for i, lab in enumerate(label_names)}
    x_test, y_test = _as_tensors(*test, index, label_names, "the test set")
    y_true = y_test.numpy()
    present = np.unique(y_true)
    results: dict[str, dict[str, float]] = {}
    for name, (images, labels) in train_sets.items():
        x, y = _as_tensors(images, labels, index, label_names, f"train set {name!r}")
        model = _train(x, y, len(label_names), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       device=device, desc=f"classifier [{name}]", progress=progress)
        probs = _probabilities(model, x_test, batch_size=256, device=device)
        y_pred = probs.argmax(axis=1)
        results[name] = {
            "accuracy": float(np.mean(y_pred == y_true)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "macro_auroc": _macro_auroc(y_true, probs),
            "n_train": len(x),
        }
    return results
