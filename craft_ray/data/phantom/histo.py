"""Phantom H&E patches: pink eosin background with purple nuclei (normal glands, tumour, stroma).

Normal mucosa has white gland lumens ringed by small round nuclei; tumour has large pleomorphic
nuclei packed densely and no lumens; stroma has wavy darker-pink fibres with a few elongated nuclei.
Lengths are given at 64 px and scale with the image.
"""

from __future__ import annotations

import numpy as np

from craft_ray.data.phantom.raster import F32, grid, noisy, paint, paint_ellipse, stamp_ellipses, waves

NORMAL_RADIUS = (1.5, 2.5)  # nuclear radius, px at 64
TUMOR_RADIUS = (3.0, 5.0)
TUMOR_DENSITY = (0.35, 0.50)  # target share of the patch covered by nuclei
STROMA_NUCLEI = (3, 8)
_MAX_TRIES = 200


def _glands(rng: np.random.Generator, size: int, s: float) -> list[tuple[float, ...]]:
    """Non-overlapping glands ``(x, y, lumen_a, lumen_b, tilt, ring)`` with their lumen inside the patch."""
    wanted = int(rng.integers(2, 4))
    glands: list[tuple[float, ...]] = []
    for _ in range(_MAX_TRIES):
        if len(glands) == wanted:
            break
        a = rng.uniform(5.0, 7.0) * s
        b = a * rng.uniform(0.75, 1.0)
        ring = rng.uniform(2.0, 2.6) * s  # gap from the lumen's edge to the nuclear ring
        x, y = rng.uniform(a + s, size - 1 - a - s, size=2)
        outer = a + ring + 3.0 * s
        if all(np.hypot(x - g[0], y - g[1]) > outer + g[2] + g[5] + 3.0 * s for g in glands):
            glands.append((x, y, a, b, rng.uniform(0, np.pi), ring))
    return glands


def generate(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """One RGB phantom H&E patch (float32 [size, size, 3]) and its ground truth."""
    s = size / 64.0
    yy, xx = grid(size)
    pink = np.array([rng.uniform(0.90, 0.97), rng.uniform(0.62, 0.75), rng.uniform(0.78, 0.88)], F32)
    img = np.empty((size, size, 3), F32)
    img[:] = pink
    img *= (1.0 + waves(rng, yy, xx, 3, (8 * s, 30 * s)) * F32(rng.uniform(0.02, 0.04)))[..., None]
    nucleus = np.array([rng.uniform(0.30, 0.45), rng.uniform(0.16, 0.26), rng.uniform(0.48, 0.62)], F32)

    glands: list[tuple[float, ...]] = []
    if label == "normal":
        glands = _glands(rng, size, s)
        cx, cy, a, b, theta = [], [], [], [], []
        for x, y, la, lb, tilt, ring in glands:
            # Epithelium: a slightly darker band that carries the nuclear ring.
            paint_ellipse(img, x, y, la + ring + 2.5 * s, lb + ring + 2.5 * s, tilt, pink * F32(rng.uniform(0.88, 0.94)))
            paint_ellipse(img, x, y, la, lb, tilt, np.full(3, rng.uniform(0.95, 0.99), F32))
            r = rng.uniform(*NORMAL_RADIUS) * s
            spacing = 2 * r + rng.uniform(0.8, 1.4) * s
            n = max(int(2 * np.pi * (la + ring + r) / spacing), 6)
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            t += rng.uniform(-0.05, 0.05, n)
            rad = ring + r + rng.uniform(-0.3, 0.3, n) * s
            ex, ey = (la + rad) * np.cos(t), (lb + rad) * np.sin(t)
            cx.append(x + ex * np.cos(tilt) - ey * np.sin(tilt))
            cy.append(y + ex * np.sin(tilt) + ey * np.cos(tilt))
            radii = np.clip(r * rng.uniform(0.9, 1.1, n), NORMAL_RADIUS[0] * s, NORMAL_RADIUS[1] * s)
            a.append(radii)
            b.append(radii)
            theta.append(t)
        cx, cy, a, b, theta = (np.concatenate(v) for v in (cx, cy, a, b, theta))
        strength = rng.uniform(0.85, 1.0, len(cx))
    elif label == "tumor":
        density = rng.uniform(*TUMOR_DENSITY)
        mean_area = np.pi * (np.mean(TUMOR_RADIUS) * s) ** 2 * 0.8
        n = int(round(-np.log(1 - density) * size * size / mean_area))
        r = rng.uniform(*TUMOR_RADIUS, n) * s
        ratio = rng.uniform(0.6, 1.0, n)  # pleomorphism: shape, size and stain vary per nucleus
        a, b = r / np.sqrt(ratio), r * np.sqrt(ratio)
        cx, cy = rng.uniform(-2 * s, size - 1 + 2 * s, (2, n))
        theta = rng.uniform(0, np.pi, n)
        strength = rng.uniform(0.75, 1.0, n)
    else:
        angle = rng.uniform(0, np.pi)
        u = xx * F32(np.cos(angle)) + yy * F32(np.sin(angle))
        v = yy * F32(np.cos(angle)) - xx * F32(np.sin(angle))
        wave = F32(rng.uniform(1.0, 2.5)) * np.sin(u * F32(2 * np.pi / (rng.uniform(14, 24) * s)) + F32(rng.uniform(0, 6.3)))
        fibres = np.sin(v * F32(2 * np.pi / (rng.uniform(4.5, 6.5) * s)) + wave)
        paint(img, np.clip((fibres - 0.2) * 1.5, 0, 1) * F32(rng.uniform(0.5, 0.8)), np.array([0.80, 0.42, 0.60], F32))
        n = int(rng.integers(STROMA_NUCLEI[0], STROMA_NUCLEI[1] + 1))
        a = rng.uniform(2.5, 4.0, n) * s
        b = rng.uniform(0.9, 1.3, n) * s
        cx, cy = rng.uniform(3 * s, size - 1 - 3 * s, (2, n))
        theta = angle + rng.uniform(-0.25, 0.25, n)
        strength = rng.uniform(0.8, 1.0, n)

    stain = stamp_ellipses(size, cx, cy, a, b, theta, strength)
    paint(img, stain, nucleus)
    img = noisy(rng, img, rng.uniform(0.008, 0.025))
    meta = {
        "nuclear_radius_px": float(np.mean(np.sqrt(a * b))),
        "nuclear_density": float((stain >= 0.5 * strength.min()).mean()),
        "nucleus_count": len(cx),
        "lumen_count": len(glands),
    }
    return img, meta
