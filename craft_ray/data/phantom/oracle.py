"""Classical image analysis that measures the phantom world's label features from pixels.

FOR EVALUATION ONLY: the oracle checks generated images against DESIGN.md's label definitions
(how often a generated "cardiomegaly" really has a cardiothoracic ratio above 0.5). It must never
feed a reward, a loss or any other training signal: a model optimised against it would learn to
satisfy these hand-written thresholds rather than the clinical look the project is about.

It uses thresholds, connected components, hole filling and colour distances only (numpy + scipy).
Thresholds sit between the grey levels and colours of :mod:`craft_ray.data.phantom`'s generators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

from craft_ray.data.phantom.derm import PALETTE
from craft_ray.errors import UserError, one_of
from craft_ray.modalities import MODALITY_NAMES


def _float(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W]) -> float32 in [0, 1]."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise UserError(f"expected an image [H, W, 3] or [H, W], got shape {tuple(image.shape)}")
    return image.astype(np.float32) / 255.0


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the spatial axes only."""
    return ndi.gaussian_filter(image, (sigma, sigma, 0) if image.ndim == 3 else sigma)


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a mask (empty if there is none)."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def _components(mask: np.ndarray, min_area: float) -> list[np.ndarray]:
    """Pixel areas and bounding-box extents ``[area, height, width]`` of components at least ``min_area``."""
    lab, n = ndi.label(mask)
    out = []
    for k, box in enumerate(ndi.find_objects(lab), start=1):
        area = int((lab[box] == k).sum())
        if area >= min_area:
            out.append(np.array([area, box[0].stop - box[0].start, box[1].stop - box[1].start]))
    return out


def _width(mask: np.ndarray) -> int:
    """Horizontal extent in pixels of a mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[-1] - cols[0] + 1) if len(cols) else 0


# --- cxr ---------------------------------------------------------------------------------------


def _heart_width(sm: np.ndarray, heart: np.ndarray, lungs: np.ndarray) -> int:
    """Widest row of the heart, its edges taken halfway between heart and lung grey levels.

    The heart's sides lie over the lungs, so the tissue-heart threshold that finds the heart
    would cut its sides short; each row's run is extended against the lung level instead, by at
    most the blur width (an effusion next to the heart is as bright as the blurred edge).
    """
    if not heart.any() or not lungs.any():
        return _width(heart)
    mid = (np.median(sm[heart]) + np.median(sm[lungs])) / 2
    reach = max(int(round(2 * sm.shape[0] / 64)), 1)
    widest = 0
    for r in np.flatnonzero(heart.any(axis=1)):
        inside = np.flatnonzero(heart[r])
        above = sm[r] > mid
        left, right = inside[0], inside[-1]
        for _ in range(reach):
            left -= int(left > 0 and above[left - 1])
            right += int(right < len(above) - 1 and above[right + 1])
        widest = max(widest, right - left + 1)
    return int(widest)


def measure_cxr(image: np.ndarray) -> dict:
    """CTR, nodule count/radii and lung-base asymmetry (effusion) of a phantom radiograph."""
    gray = _float(image)
    gray = gray.mean(axis=2) if gray.ndim == 3 else gray
    s = gray.shape[0] / 64.0
    sm = _smooth(gray, 0.7 * s)
    thorax = ndi.binary_fill_holes(_largest(sm > 0.135))
    heart = _largest((sm > 0.695) & thorax)
    # The thorax's blurred rim is as dark as the lungs: erode it away before looking for lung fields.
    dark = (sm < 0.40) & ndi.binary_erosion(thorax, iterations=max(int(round(2 * s)), 1))
    lab, _ = ndi.label(dark)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    lungs = (sizes >= 30 * s * s)[lab]  # lung fields only, not dark noise specks along the rim
    thorax_w, heart_w = _width(thorax), _heart_width(sm, heart, lungs)
    nodules = _components(ndi.binary_fill_holes(lungs) & ~lungs, 0.4 * np.pi * (2 * s) ** 2)
    # Effusion raises one lung's base: compare the lowest dark row of the two halves.
    cols = np.flatnonzero(thorax.any(axis=0))
    mid = int(round((cols[0] + cols[-1]) / 2)) if len(cols) else gray.shape[1] // 2
    bases, tops = [], []
    for half in (lungs[:, :mid], lungs[:, mid:]):
        rows = np.flatnonzero(half.sum(axis=1) >= 2)
        bases.append(rows[-1] if len(rows) else 0)
        tops.append(rows[0] if len(rows) else 0)
    height = max(max(bases) - min(tops), 1)
    return {
        "ctr": heart_w / max(thorax_w, 1),
        "thorax_width_px": thorax_w,
        "heart_width_px": heart_w,
        "nodule_count": len(nodules),
        "nodule_radii": [float(np.sqrt(c[0] / np.pi)) for c in nodules],
        "base_asymmetry": abs(bases[0] - bases[1]) / height,
    }


def classify_cxr(f: dict) -> str:
    """Label from cxr features: nodule > effusion > cardiomegaly > no finding."""
    if f["nodule_count"] >= 1:
        return "nodule"
    if f["base_asymmetry"] >= 0.12:
        return "pleural_effusion"
    return "cardiomegaly" if f["ctr"] >= 0.5 else "no_finding"


# --- derm --------------------------------------------------------------------------------------

_LESION_COLOURS = ("light_brown", "brown", "dark", "blue_grey", "pink")
_REFS = np.array([PALETTE[c] for c in _LESION_COLOURS], np.float32)


def measure_derm(image: np.ndarray) -> dict:
    """Lesion diameter, axis ratio, border irregularity, colour count and red vessel pixels."""
    img = _float(image)
    size = img.shape[0]
    s = size / 64.0
    sm = _smooth(img, 0.5 * s)
    frame = np.concatenate([sm[:2].reshape(-1, 3), sm[-2:].reshape(-1, 3), sm[:, :2].reshape(-1, 3),
                            sm[:, -2:].reshape(-1, 3)])
    skin = np.median(frame, axis=0)
    lesion = ndi.binary_fill_holes(_largest(np.linalg.norm(sm - skin, axis=2) > 0.1))
    area = max(int(lesion.sum()), 1)
    ys, xs = np.nonzero(lesion)
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([xs, ys])) if len(xs) > 2 else np.eye(2)
    ev = np.linalg.eigvalsh(cov)
    # Border irregularity: spread of the outline's radius over 64 angular bins, beyond the ellipse.
    edge = lesion & ~ndi.binary_erosion(lesion)
    ey, ex = np.nonzero(edge)
    ang = ((np.arctan2(ey - cy, ex - cx) + np.pi) / (2 * np.pi) * 64).astype(int) % 64
    radius = np.zeros(64)
    np.maximum.at(radius, ang, np.hypot(ey - cy, ex - cx))
    radius = radius[radius > 0]
    irregularity = float((radius.max() - radius.min()) / (2 * radius.mean())) if len(radius) else 0.0
    red = (sm[..., 0] - sm[..., 1] > 0.3) & (sm[..., 0] > 0.4) & lesion
    vessels = _components(red, 2 * s * s)
    inner = ndi.binary_erosion(lesion, iterations=max(int(round(2 * s)), 1)) & ~ndi.binary_dilation(red)
    pixels = sm[inner]
    if len(pixels):
        nearest = np.argmin(((pixels[:, None, :] - _REFS[None]) ** 2).sum(-1), axis=1)
        share = np.bincount(nearest, minlength=len(_REFS)) / len(pixels)
    else:
        share = np.zeros(len(_REFS))
    colours = [c for c, f in zip(_LESION_COLOURS, share, strict=True) if f >= 0.05]
    return {
        "diameter_frac": float(2 * np.sqrt(area / np.pi) / size),
        "axis_ratio": float(np.sqrt(max(ev[0], 0) / max(ev[1], 1e-6))),
        "border_irregularity": irregularity,
        "colour_count": len(colours),
        "colours": colours,
        "vessel_count": len(vessels),
        "red_fraction": float(red.sum() / area),
    }


def classify_derm(f: dict) -> str:
    """Label from derm features: red branching vessels -> bcc; three colours or ragged border -> melanoma."""
    if f["vessel_count"] >= 2 or f["red_fraction"] >= 0.02:
        return "bcc"
    if f["colour_count"] >= 3 or (f["colour_count"] >= 2 and f["border_irregularity"] >= 0.3):
        return "melanoma"
    return "nevus"


# --- fundus ------------------------------------------------------------------------------------


def measure_fundus(image: np.ndarray) -> dict:
    """Cup-to-disc ratio, small dark-red dot count and yellow exudate count of a phantom fundus."""
    img = _float(image)
    s = img.shape[0] / 64.0
    sm = _smooth(img, 0.5 * s)
    field = ndi.binary_fill_holes(_largest(sm.mean(axis=2) > 0.08))
    inner = ndi.binary_erosion(field, iterations=max(int(round(2 * s)), 1))
    yellow = (sm[..., 1] > 0.6) & field
    lab, n = ndi.label(yellow)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    disc = ndi.binary_fill_holes(lab == sizes.argmax()) if n else np.zeros_like(yellow)
    cup = (sm[..., 2] > 0.69) & disc
    cdr = float(np.sqrt(cup.sum() / max(disc.sum(), 1)))
    exudates = _components(yellow & ~ndi.binary_dilation(disc, iterations=2), 2 * s * s)
    # Dots: red-channel darkness against the local retina (normalised blur that ignores the black rim).
    red = sm[..., 0] * inner
    w = ndi.gaussian_filter(inner.astype(np.float32), 3 * s)
    local = ndi.gaussian_filter(red, 3 * s) / np.maximum(w, 1e-3)
    dark = (red < 0.6 * local) & inner & ~ndi.binary_dilation(disc, iterations=max(int(round(2 * s)), 1))
    small = [c for c in _components(dark, 1.5 * s * s) if c[0] <= 20 * s * s and max(c[1], c[2]) <= 6 * s]
    return {"cup_to_disc": cdr, "dot_count": len(small), "exudate_count": len(exudates)}


def classify_fundus(f: dict) -> str:
    """Label from fundus features: dots and exudates -> DR; large cup -> glaucoma; else normal."""
    if f["dot_count"] >= 3 or f["exudate_count"] >= 2:
        return "diabetic_retinopathy"
    return "glaucoma" if f["cup_to_disc"] >= 0.55 else "normal"


# --- histo -------------------------------------------------------------------------------------


def measure_histo(image: np.ndarray) -> dict:
    """Lumen count, nuclear density, nucleus count and median nuclear radius of a phantom H&E patch."""
    img = _float(image)
    s = img.shape[0] / 64.0
    sm = _smooth(img, 0.5 * s)
    nuclei = sm[..., 0] < 0.65
    lumens = _components(sm.min(axis=2) > 0.88, np.pi * (3 * s) ** 2)
    parts = _components(nuclei, 2 * s * s)
    radii = [float(np.sqrt(c[0] / np.pi)) for c in parts]
    return {
        "lumen_count": len(lumens),
        "nuclear_density": float(nuclei.mean()),
        "nucleus_count": len(parts),
        "nuclear_radius_px": float(np.median(radii)) if radii else 0.0,
    }


def classify_histo(f: dict) -> str:
    """Label from histo features: lumens -> normal; dense nuclei -> tumour; else stroma."""
    if f["lumen_count"] >= 1:
        return "normal"
    return "tumor" if f["nuclear_density"] >= 0.15 else "stroma"


# --- which modality ----------------------------------------------------------------------------


def modality_of(image: np.ndarray) -> str:
    """Which phantom modality a uint8 image [H, W, 3] looks like (evaluation only, never a reward)."""
    # Grey -> cxr; black corners around a bright field -> fundus; blue above green (eosin pink,
    # haematoxylin purple) -> histo; otherwise skin tones (blue below green) -> derm.
    img = _float(image)
    if img.ndim == 2 or np.abs(img - img.mean(axis=2, keepdims=True)).mean() < 0.03:
        return "cxr"
    size = img.shape[0]
    k = max(size // 10, 1)
    corners = np.concatenate([img[:k, :k], img[:k, -k:], img[-k:, :k], img[-k:, -k:]]).mean()
    centre = img[size // 4 : -size // 4, size // 4 : -size // 4].mean()
    if corners < 0.12 and centre > 2 * corners + 0.1:
        return "fundus"
    return "histo" if np.median(img[..., 2] - img[..., 1]) > 0.0 else "derm"


_MEASURE: dict[str, Callable[[np.ndarray], dict]] = {
    "cxr": measure_cxr, "derm": measure_derm, "fundus": measure_fundus, "histo": measure_histo,
}
_CLASSIFY: dict[str, Callable[[dict], str]] = {
    "cxr": classify_cxr, "derm": classify_derm, "fundus": classify_fundus, "histo": classify_histo,
}


def _check(modality: str) -> None:
    if modality not in _MEASURE:
        raise one_of("modality", modality, MODALITY_NAMES)


def measure(modality: str, image: np.ndarray) -> dict:
    """Feature values measured from one uint8 image [H, W, 3] (evaluation only, never a reward)."""
    _check(modality)
    return _MEASURE[modality](image)


def classify(modality: str, image: np.ndarray) -> str:
    """The phantom label that the measured features imply (evaluation only, never a reward)."""
    _check(modality)
    return _CLASSIFY[modality](_MEASURE[modality](image))


def accuracy(modality: str, images: np.ndarray | Sequence[np.ndarray], labels: Sequence[str]) -> float:
    """Share of images whose oracle label equals the given label (images uint8 [N, H, W, 3])."""
    if len(images) != len(labels) or len(labels) == 0:
        raise UserError(f"need as many labels as images (and at least one): got {len(images)} and {len(labels)}")
    return float(np.mean([classify(modality, img) == lab for img, lab in zip(images, labels, strict=True)]))
