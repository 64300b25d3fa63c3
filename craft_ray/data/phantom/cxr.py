"""Phantom chest x-rays: thorax ellipse, two dark lung fields, bright heart; labels by DESIGN.md.

Grey levels (before a global gain of 0.93–1.05): background 0.02–0.09, lungs 0.17–0.27, soft tissue
0.48–0.58, heart 0.79–0.90, effusion and nodules 0.50–0.75. Lengths are given at 64 px and scale.
"""

from __future__ import annotations

import numpy as np

from craft_ray.data.phantom.raster import F32, ellipse, grid, noisy, paint, soft, stamp_ellipses, waves

CTR_NORMAL = (0.35, 0.45)  # cardiothoracic ratio of every label but cardiomegaly
CTR_ENLARGED = (0.55, 0.70)
EFFUSION_FRACTION = (0.25, 0.40)  # share of the lung field's height filled from below
NODULE_RADIUS = (2.0, 4.0)  # px at 64
_MAX_TRIES = 2000


def _place_nodules(
    rng: np.random.Generator, count: int, s: float, lungs: list[tuple[float, float, float, float]], heart: tuple
) -> list[tuple[float, float, float]]:
    """Nodule centres and radii inside a lung field, clear of its border, the heart and each other."""
    hcx, hcy, hx, hy = heart
    placed: list[tuple[float, float, float]] = []
    for _ in range(_MAX_TRIES):
        if len(placed) == count:
            return placed
        r = rng.uniform(*NODULE_RADIUS) * s
        lcx, lcy, la, lb = lungs[rng.integers(2)]
        # Middle band of the lung: a nodule never touches the lung's outline or its base.
        x = lcx + rng.uniform(-0.5, 0.5) * la
        y = lcy + rng.uniform(-0.55, 0.3) * lb
        margin = r + 2.5 * s
        in_lung = ((x - lcx) / (la - margin)) ** 2 + ((y - lcy) / (lb - margin)) ** 2 < 1.0
        off_heart = ((x - hcx) / (hx + margin)) ** 2 + ((y - hcy) / (hy + margin)) ** 2 > 1.0
        apart = all(np.hypot(x - px, y - py) > r + pr + 3 * s for px, py, pr in placed)
        if in_lung and off_heart and apart:
            placed.append((x, y, r))
    if len(placed) < count:
        raise RuntimeError(f"could not place {count} nodules in {_MAX_TRIES} tries (generator bug)")
    return placed


def generate(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """One grayscale phantom radiograph (float32 [size, size] in ~[0, 1]) and its ground truth."""
    s = size / 64.0
    yy, xx = grid(size)
    c = (size - 1) / 2.0
    cx, cy = c + rng.uniform(-2, 2) * s, c + rng.uniform(-1.5, 1.5) * s
    ax = rng.uniform(24.0, 27.0) * s
    ay = min(ax * rng.uniform(1.0, 1.12), 28.5 * s)
    bg, lung, tissue, heart_level = (rng.uniform(0.02, 0.09), rng.uniform(0.17, 0.27),
                                     rng.uniform(0.48, 0.58), rng.uniform(0.79, 0.90))

    img = np.full((size, size), F32(bg))
    thorax = ellipse(yy, xx, cx, cy, ax, ay)
    paint(img, thorax, tissue)
    # Ribs: faint curved stripes over the thorax, so that no two lungs look alike.
    period = rng.uniform(6.0, 8.0) * s
    bend = rng.uniform(0.01, 0.02) / s
    ribs = np.sin((yy + F32(bend) * (xx - F32(cx)) ** 2) * F32(2 * np.pi / period) + F32(rng.uniform(0, 6.3)))
    img += thorax * ribs * F32(rng.uniform(0.008, 0.02))

    lungs = []
    lung_cov = []
    for side in (-1, 1):
        lcx = cx + side * 0.48 * ax * rng.uniform(0.97, 1.03)
        lcy = cy - 0.06 * ay + rng.uniform(-0.5, 0.5) * s
        la, lb = 0.37 * ax * rng.uniform(0.95, 1.05), 0.70 * ay * rng.uniform(0.97, 1.03)
        lungs.append((lcx, lcy, la, lb))
        cov = ellipse(yy, xx, lcx, lcy, la, lb)
        lung_cov.append(cov)
        paint(img, cov, lung)

    meta: dict = {"effusion_fraction": 0.0, "effusion_side": "", "nodule_count": 0, "nodule_radii": []}
    if label == "pleural_effusion":
        side = int(rng.integers(2))
        lcx, lcy, la, lb = lungs[side]
        fraction = rng.uniform(*EFFUSION_FRACTION)
        level = lcy + lb - fraction * 2 * lb
        # Meniscus: the fluid climbs the lateral wall, so the upper edge is concave (U-shaped).
        surface = F32(level) - F32(rng.uniform(0.06, 0.12) * 2 * lb) * ((xx - F32(lcx)) / F32(la)) ** 2
        fluid = soft(surface - yy) * lung_cov[side]
        paint(img, fluid, tissue + rng.uniform(0.0, 0.08))
        meta["effusion_fraction"] = fraction
        meta["effusion_side"] = "left" if side == 0 else "right"  # image left / right

    ctr = rng.uniform(*(CTR_ENLARGED if label == "cardiomegaly" else CTR_NORMAL))
    hx = ctr * ax
    hy = hx * rng.uniform(0.6, 0.72)
    hcx = cx + rng.uniform(-0.03, 0.03) * ax
    base = min(lcy + lb for _, lcy, _, lb in lungs)
    hcy = base - 0.1 * 2 * lungs[0][3] - hy  # the heart rests just above the lung bases
    paint(img, ellipse(yy, xx, hcx, hcy, hx, hy), heart_level)

    if label == "nodule":
        nodules = _place_nodules(rng, int(rng.integers(1, 3)), s, lungs, (hcx, hcy, hx, hy))
        x, y, r = np.array(nodules).T
        strength = stamp_ellipses(size, x, y, r, r, np.zeros_like(r), np.ones_like(r))
        paint(img, strength, rng.uniform(0.58, 0.75))
        meta["nodule_count"] = len(nodules)
        meta["nodule_radii"] = [float(v) for v in r]

    img += waves(rng, yy, xx, 3, (20 * s, 60 * s)) * F32(rng.uniform(0.005, 0.015))
    img *= F32(rng.uniform(0.93, 1.05))
    img = noisy(rng, img, rng.uniform(0.008, 0.03))
    meta = {
        "ctr": ctr,
        "heart_width_px": 2 * hx,
        "thorax_width_px": 2 * ax,
        **meta,
    }
    return img, meta
