"""Raster primitives of the phantom world: coordinate grids, anti-aliased shapes, texture and noise.

Every shape returns a float32 coverage map in [0, 1] (1 inside, a one-pixel soft edge), so that
painting is ``canvas += coverage * (colour - canvas)``. Pixel ``(row, col)`` has its centre at
coordinates ``(y, x) = (row, col)``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

F32 = np.float32


@lru_cache(maxsize=16)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only coordinate grids ``(yy, xx)``, each float32 [size, size], cached per size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(F32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def soft(signed_distance: np.ndarray) -> np.ndarray:
    """Coverage from a signed distance in pixels (negative inside): a one-pixel linear edge."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def ellipse(
    yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float = 0.0
) -> np.ndarray:
    """Coverage of an ellipse with semi-axes ``a`` (along ``theta``, radians) and ``b``, in pixels."""
    dx = xx - F32(cx)
    dy = yy - F32(cy)
    if theta:
        c, s = F32(np.cos(theta)), F32(np.sin(theta))
        dx, dy = dx * c + dy * s, dy * c - dx * s
    rho = np.sqrt((dx / F32(a)) ** 2 + (dy / F32(b)) ** 2)
    # (rho - 1) * r is the exact distance on a circle and a close one on a mild ellipse;
    # the 0.5-coverage contour is exactly the ellipse whatever the scale.
    return soft((rho - 1.0) * F32(np.sqrt(a * b)))


def window(size: int, cx: float, cy: float, half: float) -> tuple[slice, slice]:
    """Row and column slices of the square of half-side ``half`` px around ``(cx, cy)``, clipped to the image."""
    h = int(np.ceil(half)) + 2
    r0, c0 = max(int(cy) - h, 0), max(int(cx) - h, 0)
    return slice(r0, min(int(cy) + h + 1, size)), slice(c0, min(int(cx) + h + 1, size))


def paint_ellipse(
    canvas: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float, colour: np.ndarray | float
) -> None:
    """In place: paint an ellipse (see :func:`ellipse`) computed only inside its bounding window."""
    yy, xx = grid(canvas.shape[0])
    rows, cols = window(canvas.shape[0], cx, cy, max(a, b))
    paint(canvas[rows, cols], ellipse(yy[rows, cols], xx[rows, cols], cx, cy, a, b, theta), colour)


def stamp_ellipses(
    size: int,
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    value: np.ndarray,
) -> np.ndarray:
    """Max over K small ellipses of ``value * coverage``, each drawn in its own patch: [size, size]."""
    out = np.zeros(size * size, F32)
    if len(cx) == 0:
        return out.reshape(size, size)
    cx, cy, a, b, theta, value = (np.asarray(v, F32) for v in (cx, cy, a, b, theta, value))
    half = int(np.ceil(max(a.max(), b.max()))) + 2
    off = np.arange(-half, half + 1)
    px = np.floor(cx).astype(np.int64)[:, None] + off  # [K, P] columns
    py = np.floor(cy).astype(np.int64)[:, None] + off  # [K, P] rows
    dx = (px - cx[:, None]).astype(F32)[:, None, :]
    dy = (py - cy[:, None]).astype(F32)[:, :, None]
    c = np.cos(theta)[:, None, None]
    s = np.sin(theta)[:, None, None]
    u = dx * c + dy * s
    v = dy * c - dx * s
    rho = np.sqrt((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2)
    cov = soft((rho - 1.0) * np.sqrt(a * b)[:, None, None]) * value[:, None, None]
    inside = ((px >= 0) & (px < size))[:, None, :] & ((py >= 0) & (py < size))[:, :, None]
    idx = py[:, :, None] * size + px[:, None, :]
    np.maximum.at(out, idx[inside], cov[inside])
    return out.reshape(size, size)


def segments(
    yy: np.ndarray,
    xx: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    half_width: np.ndarray | float,
) -> np.ndarray:
    """Max coverage of K thick line segments ``p0[k] -> p1[k]`` (each [K, 2] as x, y) on a grid."""
    p0 = np.asarray(p0, F32)
    p1 = np.asarray(p1, F32)
    x0, y0 = p0[:, 0, None, None], p0[:, 1, None, None]
    dx, dy = (p1[:, 0] - p0[:, 0])[:, None, None], (p1[:, 1] - p0[:, 1])[:, None, None]
    rx, ry = xx - x0, yy - y0
    t = np.clip((rx * dx + ry * dy) / np.maximum(dx * dx + dy * dy, F32(1e-6)), 0.0, 1.0)
    dist = np.sqrt((rx - t * dx) ** 2 + (ry - t * dy) ** 2)
    hw = np.broadcast_to(np.asarray(half_width, F32), (len(p0),))[:, None, None]
    return soft(dist - hw).max(axis=0)


def waves(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, n: int, period: tuple[float, float]) -> np.ndarray:
    """Smooth texture: the mean of ``n`` random plane waves with periods in ``period`` px; values in [-1, 1]."""
    out = np.zeros(yy.shape, F32)
    for _ in range(n):
        angle = rng.uniform(0.0, np.pi)
        k = 2.0 * np.pi / rng.uniform(*period)
        out += np.sin(xx * F32(k * np.cos(angle)) + yy * F32(k * np.sin(angle)) + F32(rng.uniform(0, 2 * np.pi)))
    return out / F32(n)


def paint(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray | float) -> None:
    """In place: blend ``colour`` (a value or an RGB triple) over ``canvas`` [H, W(, 3)] by ``coverage`` [H, W]."""
    if canvas.ndim == 3:
        canvas += coverage[..., None] * (np.asarray(colour, F32) - canvas)
    else:
        canvas += coverage * (F32(colour) - canvas)


def noisy(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` plus gaussian luminance noise of standard deviation ``sigma`` (intensity units)."""
    # One noise plane shared by the channels: sensor-like grain at a third of the cost of RGB noise.
    noise = rng.standard_normal(image.shape[:2], dtype=F32) * F32(sigma)
    return image + (noise[..., None] if image.ndim == 3 else noise)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (values outside are clipped) -> uint8 RGB [H, W, 3]."""
    img = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img
