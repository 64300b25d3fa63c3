"""Phantom fundus photographs: circular field, orange-red retina, yellow disc with a brighter cup, vessels.

Vessels are parabolic arcs that leave the optic disc (drawn under it); diabetic retinopathy adds dark-red
dots and yellow exudates kept apart from the disc, the vessels and each other so that each one is a
separate, countable spot. Lengths are given at 64 px and scale with the image.
"""

from __future__ import annotations

import numpy as np

from craft_ray.data.phantom.raster import (
    F32,
    ellipse,
    grid,
    noisy,
    paint,
    paint_ellipse,
    soft,
    stamp_ellipses,
    waves,
)

CDR = {"normal": (0.15, 0.40), "diabetic_retinopathy": (0.15, 0.40), "glaucoma": (0.70, 0.85)}
DOTS = (5, 10)  # dark-red dots of diabetic retinopathy (inclusive range)
EXUDATES = (2, 5)
DOT_RADIUS = (1.2, 1.8)  # px at 64
EXUDATE_RADIUS = (1.1, 1.8)
_MAX_TRIES = 2000


def _vessel_coverage(
    yy: np.ndarray, xx: np.ndarray, origin: tuple[float, float], vessel: tuple[float, float, float, float]
) -> np.ndarray:
    """Coverage of one tapered parabolic vessel ``(angle, bend, length, half_width)`` from ``origin``."""
    angle, bend, length, half_width = vessel
    c, s = F32(np.cos(angle)), F32(np.sin(angle))
    dx, dy = xx - F32(origin[0]), yy - F32(origin[1])
    u, w = dx * c + dy * s, dy * c - dx * s
    slope = F32(2 * bend) * u
    dist = np.abs(w - F32(bend) * u * u) / np.sqrt(1 + slope * slope)
    width = F32(half_width) * (1 - F32(0.5 / length) * u)
    return soft(dist - width) * np.clip(u + 1, 0, 1) * np.clip(F32(length) - u, 0, 1)


def _vessel_distance(x: float, y: float, origin: tuple[float, float], vessel: tuple[float, float, float, float]) -> float:
    """Approximate distance in px from a point to the centre line of one vessel."""
    angle, bend, length, _ = vessel
    dx, dy = x - origin[0], y - origin[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    w = dy * np.cos(angle) - dx * np.sin(angle)
    if u < 0 or u > length:
        return float(np.hypot(dx, dy)) if u < 0 else float("inf")
    return abs(w - bend * u * u) / np.sqrt(1 + (2 * bend * u) ** 2)


def generate(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """One RGB phantom fundus photograph (float32 [size, size, 3]) and its ground truth."""
    s = size / 64.0
    yy, xx = grid(size)
    c = (size - 1) / 2.0
    fcx, fcy = c + rng.uniform(-1, 1) * s, c + rng.uniform(-1, 1) * s
    field_r = rng.uniform(0.44, 0.47) * size
    field = ellipse(yy, xx, fcx, fcy, field_r, field_r)

    retina = np.array([rng.uniform(0.72, 0.85), rng.uniform(0.30, 0.40), rng.uniform(0.10, 0.18)], F32)
    r2 = ((xx - F32(fcx)) ** 2 + (yy - F32(fcy)) ** 2) / F32(field_r**2)
    shade = 1 - F32(rng.uniform(0.15, 0.3)) * r2 + waves(rng, yy, xx, 3, (10 * s, 30 * s)) * F32(rng.uniform(0.02, 0.04))
    side = 1 if rng.integers(2) else -1  # +1: disc on the image's right
    disc_x = fcx + side * rng.uniform(0.22, 0.30) * size
    disc_y = fcy + rng.uniform(-0.06, 0.06) * size
    macula_x = disc_x - side * rng.uniform(0.3, 0.36) * size
    shade -= F32(rng.uniform(0.06, 0.12)) * np.exp(-((xx - F32(macula_x)) ** 2 + (yy - F32(disc_y)) ** 2) / F32(2 * (4 * s) ** 2))
    img = (shade * field)[..., None] * retina

    temporal = np.pi if side > 0 else 0.0
    vessels = []
    for up in (-1, 1):
        for direction, reach in ((temporal, (0.45, 0.6)), (temporal + np.pi, (0.15, 0.22))):
            angle = direction + up * rng.uniform(0.55, 0.9)
            # The arc bends back towards the horizontal through the disc, as the arcades do.
            bend = -np.sign(np.sin(2 * angle)) * rng.uniform(0.008, 0.02) / s
            vessels.append((angle, bend, rng.uniform(*reach) * size, rng.uniform(0.55, 0.8) * s))
    vessel_cov = np.zeros_like(field)
    for vessel in vessels:
        # Rasterise each vessel inside the bounding box of its centre line only (speed).
        angle, bend, length, half_width = vessel
        u = np.linspace(0, length, 6)
        px = disc_x + u * np.cos(angle) - bend * u * u * np.sin(angle)
        py = disc_y + u * np.sin(angle) + bend * u * u * np.cos(angle)
        r0, r1 = max(int(py.min() - half_width) - 2, 0), min(int(py.max() + half_width) + 3, size)
        c0, c1 = max(int(px.min() - half_width) - 2, 0), min(int(px.max() + half_width) + 3, size)
        if r0 < r1 and c0 < c1:
            cov = _vessel_coverage(yy[r0:r1, c0:c1], xx[r0:r1, c0:c1], (disc_x, disc_y), vessel)
            np.maximum(vessel_cov[r0:r1, c0:c1], cov, out=vessel_cov[r0:r1, c0:c1])
    # Vessels and dots are shaded like the retina around them: their contrast is what the eye sees.
    vessel_colour = np.array([0.62, 0.14, 0.10], F32) * F32(rng.uniform(0.95, 1.05))
    paint(img, vessel_cov * field, shade[..., None] * vessel_colour)

    disc_r = rng.uniform(5.0, 6.5) * s
    cdr = rng.uniform(*CDR[label])
    paint_ellipse(img, disc_x, disc_y, disc_r, disc_r, 0.0,
                  np.array([rng.uniform(0.92, 1.0), rng.uniform(0.78, 0.88), rng.uniform(0.45, 0.60)], F32))
    shift = (1 - cdr) * disc_r * 0.3
    cup_x, cup_y = disc_x + rng.uniform(-shift, shift), disc_y + rng.uniform(-shift, shift)
    paint_ellipse(img, cup_x, cup_y, cdr * disc_r, cdr * disc_r, 0.0,
                  np.array([rng.uniform(0.97, 1.0), rng.uniform(0.93, 0.99), rng.uniform(0.78, 0.90)], F32))

    dots: list[tuple[float, float, float]] = []
    exudates: list[tuple[float, float, float]] = []
    if label == "diabetic_retinopathy":
        spots: list[tuple[float, float, float]] = []
        for count, radii, out in (
            (int(rng.integers(DOTS[0], DOTS[1] + 1)), DOT_RADIUS, dots),
            (int(rng.integers(EXUDATES[0], EXUDATES[1] + 1)), EXUDATE_RADIUS, exudates),
        ):
            for _ in range(_MAX_TRIES):
                if len(out) == count:
                    break
                r = rng.uniform(*radii) * s
                rho, t = field_r * 0.8 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
                x, y = fcx + rho * np.cos(t), fcy + rho * np.sin(t)
                clear = (
                    np.hypot(x - disc_x, y - disc_y) > disc_r + r + 4 * s
                    and all(_vessel_distance(x, y, (disc_x, disc_y), v) > r + v[3] + 2.5 * s for v in vessels)
                    and all(np.hypot(x - px, y - py) > r + pr + 3 * s for px, py, pr in spots)
                )
                if clear:
                    out.append((x, y, r))
                    spots.append((x, y, r))
        x, y, r = np.array(dots).reshape(-1, 3).T
        dark = stamp_ellipses(size, x, y, r, r, np.zeros_like(r), np.ones_like(r))
        paint(img, dark, shade[..., None] * (np.array([0.24, 0.04, 0.03], F32) * F32(rng.uniform(0.92, 1.05))))
        x, y, r = np.array(exudates).reshape(-1, 3).T
        bright = stamp_ellipses(size, x, y, r, r, np.zeros_like(r), np.ones_like(r))
        paint(img, bright, np.array([0.96, 0.88, 0.40], F32) * F32(rng.uniform(0.95, 1.04)))

    img = noisy(rng, img, rng.uniform(0.008, 0.025)) * field[..., None]
    meta = {
        "cup_to_disc": cdr,
        "disc_radius_px": disc_r,
        "disc_side": "right" if side > 0 else "left",
        "vessel_count": len(vessels),
        "dot_count": len(dots),
        "exudate_count": len(exudates),
    }
    return img, meta
