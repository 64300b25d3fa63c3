"""Statistics of a reader study: Wilson intervals, the sign test, Bradley-Terry scores and kappas.

Pure functions on counts; :mod:`craft_ray.study.results` turns the stored votes into these counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 % standard-normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for a proportion successes / n; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test p-value of wins vs losses under p = 0.5; ties are not passed in."""
    from scipy.stats import binomtest

    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5).pvalue)


def bradley_terry(wins: np.ndarray, tol: float = 1e-10, max_iter: int = 10_000) -> np.ndarray:
    """Bradley-Terry strengths [K] (sum 1) from a win matrix [K,K] (wins[i, j]: times i beat j), by MM (Hunter 2004).

    Ties are not part of the model and must be left out of ``wins``. When the win graph is not strongly
    connected (see :func:`bradley_terry_identifiable`) the maximum-likelihood estimate lies on the boundary
    (an arm that never wins goes to 0) and MM approaches it slowly, so it stops after ``max_iter`` steps.
    """
    w = np.asarray(wins, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"wins must be a square [K,K] matrix, got shape {w.shape}")
    n = w + w.T  # comparisons between i and j
    total_wins = w.sum(axis=1)
    p = np.full(len(w), 1.0 / len(w))
    for _ in range(max_iter):
        pair = p[:, None] + p[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = np.where(n > 0, n / pair, 0.0).sum(axis=1)
        new = np.where(denom > 0, total_wins / np.where(denom > 0, denom, 1.0), p)
        new /= new.sum()
        if np.abs(new - p).max() < tol:
            return new
        p = new
    return p


def bradley_terry_identifiable(wins: np.ndarray) -> bool:
    """True when every arm can reach every other through a chain of wins (Hunter 2004's condition for a finite MLE)."""
    reach = np.asarray(wins) > 0
    np.fill_diagonal(reach, True)
    for k in range(len(reach)):  # transitive closure (Warshall)
        reach = reach | (reach[:, [k]] & reach[[k], :])
    return bool(reach.all())


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two readers' answers on the same items (nan when chance agreement is 1)."""
    if len(a) != len(b):
        raise ValueError(f"both readers must answer the same items, got {len(a)} and {len(b)} answers")
    if not a:
        return float("nan")
    cats = sorted(set(a) | set(b))
    po = float(np.mean([x == y for x, y in zip(a, b, strict=True)]))
    pe = sum((list(a).count(c) / len(a)) * (list(b).count(c) / len(b)) for c in cats)
    return float("nan") if pe == 1 else (po - pe) / (1 - pe)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a count table [items, categories]: how many readers put each item in each category.

    Every item must have the same number of readers (at least two); nan when chance agreement is 1.
    """
    c = np.asarray(counts, dtype=float)
    raters = c.sum(axis=1)
    if len(c) == 0 or raters[0] < 2 or not np.all(raters == raters[0]):
        raise ValueError(f"every item needs the same number (>= 2) of readers, got {sorted(set(raters.tolist()))}")
    m = raters[0]
    p_item = ((c * c).sum(axis=1) - m) / (m * (m - 1))
    p_cat = c.sum(axis=0) / c.sum()
    pe = float((p_cat**2).sum())
    return float("nan") if pe == 1 else (float(p_item.mean()) - pe) / (1 - pe)
