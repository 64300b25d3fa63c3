"""Phantom dermoscopy: textured skin with one lesion (nevus, melanoma or basal cell carcinoma).

The lesion outline is a polar-modulated ellipse ``r(phi) = R * (1 + sum_k a_k cos(k phi + p_k))``;
its border irregularity is ``(max r - min r) / (2 mean r)`` of the modulation. Colours come from
the palette below (scaled per image by a gain of 0.92–1.06); the oracle uses the same names.
"""

from __future__ import annotations

import numpy as np

from craft_ray.data.phantom.raster import F32, grid, noisy, paint, segments, soft, waves, window

PALETTE = {
    "light_brown": (0.68, 0.47, 0.31),
    "brown": (0.48, 0.30, 0.19),
    "dark": (0.20, 0.12, 0.09),
    "blue_grey": (0.42, 0.48, 0.58),
    "pink": (0.95, 0.77, 0.80),
    "red": (0.72, 0.10, 0.14),
}
DIAMETER = {"nevus": (0.25, 0.40), "melanoma": (0.35, 0.55), "bcc": (0.28, 0.45)}  # share of the side
IRREGULARITY = {"nevus": (0.0, 0.04), "melanoma": (0.20, 0.32), "bcc": (0.0, 0.06)}
AXIS_RATIO = {"nevus": (0.82, 1.0), "melanoma": (0.75, 1.0), "bcc": (0.75, 1.0)}
_HARMONICS = np.array([2, 3, 5])
_ANGLES = np.linspace(0, 2 * np.pi, 256, endpoint=False)


def _outline(rng: np.random.Generator, irregularity: float) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic amplitudes and phases whose radius modulation has exactly ``irregularity``."""
    amp = rng.uniform(0.3, 1.0, size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    r = (amp[:, None] * np.cos(_HARMONICS[:, None] * _ANGLES + phase[:, None])).sum(0)
    amp *= 2 * irregularity / max(r.max() - r.min(), 1e-6)
    return amp, phase


def _vessels(rng: np.random.Generator, count: int, cx: float, cy: float, radius: float) -> tuple[np.ndarray, ...]:
    """Segments of ``count`` branching vessels (a bent trunk and one side branch each) inside the lesion."""
    p0, p1 = [], []
    for k in range(count):
        # Spread the vessels around the lesion so that they rarely cross.
        angle = 2 * np.pi * (k + rng.uniform(-0.25, 0.25)) / count
        start = np.array([cx, cy]) + rng.uniform(0.1, 0.35) * radius * np.array([np.cos(angle), np.sin(angle)])
        heading = angle + rng.uniform(-0.5, 0.5)
        length = rng.uniform(0.3, 0.45) * radius
        mid = start + length * np.array([np.cos(heading), np.sin(heading)])
        heading2 = heading + rng.uniform(-0.5, 0.5)
        end = mid + length * np.array([np.cos(heading2), np.sin(heading2)])
        fork = heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.0)
        branch = mid + rng.uniform(0.5, 0.8) * length * np.array([np.cos(fork), np.sin(fork)])
        p0 += [start, mid, mid]
        p1 += [mid, end, branch]
    return np.array(p0), np.array(p1)


def generate(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """One RGB phantom dermoscopy image (float32 [size, size, 3]) and its ground truth."""
    s = size / 64.0
    yy, xx = grid(size)
    tone = rng.uniform(0.80, 0.92)
    skin = np.array([tone, tone * rng.uniform(0.74, 0.82), tone * rng.uniform(0.60, 0.70)], F32)
    img = np.empty((size, size, 3), F32)
    img[:] = skin
    img *= (1.0 + waves(rng, yy, xx, 3, (12 * s, 40 * s)) * F32(rng.uniform(0.02, 0.04)))[..., None]

    c = (size - 1) / 2.0
    cx, cy = c + rng.uniform(-4, 4) * s, c + rng.uniform(-4, 4) * s
    radius = rng.uniform(*DIAMETER[label]) * size / 2
    ratio = rng.uniform(*AXIS_RATIO[label])
    irregularity = rng.uniform(*IRREGULARITY[label])
    amp, phase = _outline(rng, irregularity)
    tilt = rng.uniform(0, np.pi)
    gain = F32(rng.uniform(0.92, 1.06))

    # Everything about the lesion is computed inside its bounding window only (speed).
    rows, cols = window(size, cx, cy, radius * (1 + 2 * irregularity))
    yy, xx, sub = yy[rows, cols], xx[rows, cols], img[rows, cols]
    dx, dy = xx - F32(cx), yy - F32(cy)
    c_t, s_t = F32(np.cos(tilt)), F32(np.sin(tilt))
    u, v = dx * c_t + dy * s_t, (dy * c_t - dx * s_t) / F32(ratio)
    phi = np.arctan2(v, u)
    modulation = np.ones_like(phi)
    for k, a, p in zip(_HARMONICS, amp, phase, strict=True):
        modulation += F32(a) * np.cos(F32(k) * phi + F32(p))
    dist = np.sqrt(u * u + v * v)
    lesion = soft((dist - F32(radius) * modulation) * F32(np.sqrt(ratio)))

    fractions: dict[str, float] = {}
    vessel_count = 0
    if label == "nevus":
        paint(sub, lesion, np.array(PALETTE["brown"], F32) * gain * F32(rng.uniform(0.93, 1.07)))
        fractions["brown"] = 1.0
    elif label == "melanoma":
        paint(sub, lesion, np.array(PALETTE["light_brown"], F32) * gain)
        # Asymmetric colour: a dark blotch on one side, a blue-grey veil on the other.
        side = rng.uniform(0, 2 * np.pi)
        regions = {}
        for name, angle, offset, size_r in (
            ("dark", side, rng.uniform(0.3, 0.4), rng.uniform(0.42, 0.52)),
            ("blue_grey", side + np.pi + rng.uniform(-0.7, 0.7), rng.uniform(0.35, 0.45), rng.uniform(0.32, 0.42)),
        ):
            bx = cx + offset * radius * np.cos(angle)
            by = cy + offset * radius * np.sin(angle)
            blob_mod = 1.0 + 0.15 * np.cos(3 * np.arctan2(yy - F32(by), xx - F32(bx)) + F32(rng.uniform(0, 6.3)))
            blob = soft(np.sqrt((xx - F32(bx)) ** 2 + (yy - F32(by)) ** 2) - F32(size_r * radius) * blob_mod) * lesion
            regions[name] = blob
            paint(sub, blob, np.array(PALETTE[name], F32) * gain)
        area = float(lesion.sum())
        fractions["blue_grey"] = float(regions["blue_grey"].sum()) / area
        fractions["dark"] = float((regions["dark"] * (1 - regions["blue_grey"])).sum()) / area
        fractions["light_brown"] = 1.0 - fractions["dark"] - fractions["blue_grey"]
    else:
        pink = np.array(PALETTE["pink"], F32) * gain
        paint(sub, lesion, pink)
        # Pearly sheen: a whiter highlight on one side of the lesion.
        sheen = soft(np.sqrt((xx - F32(cx + 0.3 * radius)) ** 2 + (yy - F32(cy - 0.3 * radius)) ** 2)
                     - F32(0.45 * radius)) * lesion * F32(rng.uniform(0.2, 0.45))
        paint(sub, sheen, np.array([1.0, 0.93, 0.94], F32))
        vessel_count = int(rng.integers(3, 6))
        p0, p1 = _vessels(rng, vessel_count, cx, cy, radius)
        vessels = segments(yy, xx, p0, p1, rng.uniform(0.45, 0.65) * s) * lesion
        paint(sub, vessels, np.array(PALETTE["red"], F32) * F32(rng.uniform(0.92, 1.05)))
        fractions["pink"] = 1.0

    # Axis ratio of the painted lesion from its second moments.
    w = lesion / lesion.sum()
    mx, my = float((w * xx).sum()), float((w * yy).sum())
    sxx = float((w * (xx - mx) ** 2).sum())
    syy = float((w * (yy - my) ** 2).sum())
    sxy = float((w * (xx - mx) * (yy - my)).sum())
    spread = np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    lo, hi = (sxx + syy) / 2 - spread, (sxx + syy) / 2 + spread
    img = noisy(rng, img, rng.uniform(0.008, 0.025))
    meta = {
        "diameter_frac": 2 * radius / size,  # major axis before modulation
        "axis_ratio": float(np.sqrt(max(lo, 0.0) / hi)),
        "border_irregularity": irregularity,
        "colour_count": sum(1 for f in fractions.values() if f >= 0.05),
        "colours": [name for name, f in fractions.items() if f >= 0.05],
        "vessel_count": vessel_count,
    }
    return img, meta
