"""Image-set metrics on synthetic data with known answers: copies, Gaussians, clustered modes, easy images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from craft_ray.metrics import (
    downstream_classification,
    frechet_distance,
    memorization,
    nearest_real,
    precision_recall_coverage,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# nearest_real / memorization
# --------------------------------------------------------------------------------------------


def test_nearest_real_finds_exact_copies_and_scaled_copies() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 32))
    picks = np.array([5, 0, 199, 77, 5])
    query = reference[picks] * np.array([[1.0], [3.0], [0.5], [1.0], [10.0]])  # cosine ignores scale
    sims, idx = nearest_real(query, reference)
    assert sims.dtype == np.float64 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, picks)
    np.testing.assert_allclose(sims, 1.0, atol=1e-12)


def test_nearest_real_chunked_equals_unchunked() -> None:
    rng = np.random.default_rng(1)
    query, reference = rng.normal(size=(53, 16)), rng.normal(size=(71, 16))
    sims_full, idx_full = nearest_real(query, reference, chunk=1000)
    sims_tiled, idx_tiled = nearest_real(query, reference, chunk=7)
    np.testing.assert_array_equal(idx_tiled, idx_full)
    np.testing.assert_allclose(sims_tiled, sims_full, atol=1e-12)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    brute = q @ r.T
    np.testing.assert_array_equal(idx_full, brute.argmax(axis=1))
    np.testing.assert_allclose(sims_full, brute.max(axis=1), atol=1e-12)


def test_nearest_real_rejects_mismatched_dimensions() -> None:
    with pytest.raises(ValueError, match="dimension 8 but reference has 9"):
        nearest_real(np.ones((3, 8)), np.ones((3, 9)))


def test_memorization_copies_versus_independent_samples() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 64))
    copies = real[rng.integers(0, 300, size=40)]
    out = memorization(copies, real, threshold=0.95)
    assert out["share_above"] == 1.0
    assert out["mean_nn_sim"] == pytest.approx(1.0, abs=1e-12)
    assert out["threshold"] == 0.95
    assert out["nn_sim"].shape == (40,) and out["nn_index"].shape == (40,)
    np.testing.assert_array_equal(real[out["nn_index"]], copies)

    independent = memorization(rng.normal(size=(100, 64)), real, threshold=0.95)
    assert independent["share_above"] == 0.0
    # Random directions in 64-D: nearest of 300 has cosine around 0.3-0.5, nowhere near a copy.
    assert 0.2 < independent["mean_nn_sim"] < 0.6


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    x = np.random.default_rng(3).normal(scale=2.0, size=(500, 8))
    scale = np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, x) / scale < 1e-6


def test_frechet_distance_mean_shift() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(20000, 4))
    shift = np.array([3.0, 0.0, -4.0, 0.0])  # |shift|² = 25
    b = rng.normal(size=(20000, 4)) + shift
    # Both covariances estimate I; the sampling error of the covariance term is ~0.01 here.
    assert frechet_distance(a, b) == pytest.approx(25.0, abs=0.15)


def test_frechet_distance_isotropic_covariances_analytic() -> None:
    # N(mu1, sigma² I) vs N(mu2, tau² I): FD = D (sigma - tau)² + |mu1 - mu2|².
    rng = np.random.default_rng(5)
    d, sigma, tau = 6, 1.0, 2.0
    mu2 = np.full(d, 0.5)  # |dmu|² = 1.5
    a = rng.normal(scale=sigma, size=(40000, d))
    b = rng.normal(scale=tau, size=(40000, d)) + mu2
    expected = d * (sigma - tau) ** 2 + float(mu2 @ mu2)  # 7.5
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_uses_exact_sample_moments() -> None:
    # Whitened samples have sample mean mu and sample covariance exactly diag(var): the formula is exact.
    rng = np.random.default_rng(6)

    def with_moments(mu: np.ndarray, var: np.ndarray, n: int) -> np.ndarray:
        z = rng.normal(size=(n, len(mu)))
        z -= z.mean(axis=0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
        return z * np.sqrt(var) + mu

    a = with_moments(np.zeros(3), np.array([1.0, 4.0, 9.0]), 50)
    b = with_moments(np.array([1.0, 2.0, 0.0]), np.array([4.0, 4.0, 1.0]), 60)
    # Diagonal covariances: tr term = sum (sqrt(v_a) - sqrt(v_b))² = 1 + 0 + 4; |dmu|² = 5.
    assert frechet_distance(a, b) == pytest.approx(10.0, abs=1e-8)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 32.0  # at least the mean shift |dmu|² ≈ 32
    assert frechet_distance(a, a) < 1e-3


def test_frechet_distance_rejects_a_single_sample() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.ones((1, 4)), np.ones((5, 4)))


# --------------------------------------------------------------------------------------------
# Precision / recall / density / coverage
# --------------------------------------------------------------------------------------------


def _modes(rng: np.random.Generator, centres: np.ndarray, per_mode: int) -> np.ndarray:
    """Tight clusters (std 0.05) around each centre [K,D]: [K*per_mode, D]."""
    return np.concatenate([c + 0.05 * rng.normal(size=(per_mode, centres.shape[1])) for c in centres])


def test_prc_identical_sets_are_perfect() -> None:
    x = np.random.default_rng(8).normal(size=(120, 10))
    out = precision_recall_coverage(x, x.copy(), k=5)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0
    # Each real ball holds its centre and its k nearest neighbours, so density = (k + 1) / k exactly.
    assert out["density"] == pytest.approx(6 / 5, abs=1e-12)


def test_prc_disjoint_far_apart_sets_score_zero() -> None:
    rng = np.random.default_rng(9)
    real = rng.normal(size=(80, 5))
    fake = rng.normal(size=(80, 5)) + 100.0
    assert precision_recall_coverage(real, fake, k=3) == {
        "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0,
    }


def test_prc_fake_covering_half_the_modes() -> None:
    rng = np.random.default_rng(10)
    angles = np.arange(8) * np.pi / 4
    centres = 10.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # eight well-separated 2-D modes
    real = _modes(rng, centres, per_mode=100)
    fake = _modes(rng, centres[:4], per_mode=100)
    out = precision_recall_coverage(real, fake, k=5)
    # A few fake samples fall in the tails outside every real k-NN ball, so precision is just below 1.
    assert out["precision"] == pytest.approx(1.0, abs=0.05)
    assert out["recall"] == pytest.approx(0.5, abs=0.05)
    assert out["coverage"] == pytest.approx(0.5, abs=0.05)
    # Where fake and real share a distribution, a fake sample lies in about k real balls.
    assert out["density"] == pytest.approx(1.0, abs=0.1)


def test_prc_rejects_k_not_below_set_sizes() -> None:
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="k=5 needs more than k samples.*5 real and 10 fake"):
        precision_recall_coverage(x, np.zeros((10, 2)), k=5)
    with pytest.raises(ValueError, match="3 fake"):
        precision_recall_coverage(np.zeros((10, 2)), np.zeros((3, 2)), k=3)


# --------------------------------------------------------------------------------------------
# Downstream classification
# --------------------------------------------------------------------------------------------

LABELS = ("circle", "square", "blank")


def _shapes(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, list[str]]:
    """Noisy grey images [n,size,size,3] with a bright disc, a bright square or nothing, at random places."""
    labels = [LABELS[i] for i in rng.integers(0, len(LABELS), size=n)]
    images = rng.normal(90.0, 20.0, size=(n, size, size, 1))
    yy, xx = np.mgrid[:size, :size]
    r = size // 6
    for img, lab in zip(images, labels, strict=True):
        cy, cx = rng.integers(r, size - r, size=2)
        if lab == "circle":
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 120.0
        elif lab == "square":
            img[(abs(yy - cy) <= r) & (abs(xx - cx) <= r)] += 120.0
    return np.repeat(images.clip(0, 255).astype(np.uint8), 3, axis=3), labels


def test_downstream_classification_separable_vs_shuffled_labels() -> None:
    rng = np.random.default_rng(11)
    train_x, train_y = _shapes(rng, 300, 32)
    test = _shapes(rng, 150, 32)
    shuffled = list(np.random.default_rng(12).permutation(train_y))
    sets = {"informative": (train_x, train_y), "shuffled": (train_x, shuffled)}
    out = downstream_classification(sets, test, LABELS, epochs=15)
    good, bad = out["informative"], out["shuffled"]
    assert good["accuracy"] > 0.9 and good["macro_auroc"] > 0.95 and good["macro_f1"] > 0.9
    assert good["n_train"] == 300
    # Chance is 1/3 for accuracy and 0.5 for AUROC.
    assert bad["accuracy"] < 0.5 and 0.35 < bad["macro_auroc"] < 0.65


def test_downstream_classification_is_deterministic_at_64px() -> None:
    rng = np.random.default_rng(13)
    train, test = _shapes(rng, 64, 64), _shapes(rng, 30, 64)
    first = downstream_classification({"real": train}, test, LABELS, epochs=2, seed=3)
    second = downstream_classification({"real": train}, test, LABELS, epochs=2, seed=3)
    other = downstream_classification({"real": train}, test, LABELS, epochs=2, seed=4)
    assert first == second
    assert set(first["real"]) == {"accuracy", "macro_f1", "macro_auroc", "n_train"}
    assert other != first


def test_downstream_classification_auroc_nan_with_one_test_class() -> None:
    rng = np.random.default_rng(14)
    train = _shapes(rng, 40, 32)
    test_x, _ = _shapes(rng, 10, 32)
    out = downstream_classification({"real": train}, (test_x, ["blank"] * 10), LABELS, epochs=1)
    assert math.isnan(out["real"]["macro_auroc"])
    assert 0.0 <= out["real"]["accuracy"] <= 1.0


def test_downstream_classification_unknown_label_raises() -> None:
    rng = np.random.default_rng(15)
    x, y = _shapes(rng, 20, 32)
    y[3] = "triangle"
    with pytest.raises(ValueError, match="unknown label 'triangle' in train set 'synthetic'; known: circle"):
        downstream_classification({"synthetic": (x, y)}, _shapes(rng, 10, 32), LABELS, epochs=1)
