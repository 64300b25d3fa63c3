"""The phantom world: procedurally generated stand-ins for the four modalities (DESIGN.md).

Each label is defined by measurable image features (cardiothoracic ratio, lesion colours, cup-to-disc
ratio, nuclear size...), returned as per-image ground-truth metadata. Generation is deterministic:
image ``i`` of ``seed`` is drawn from its own PCG64 stream seeded by ``(seed, i)``, so it does not
depend on how many images are generated. Labels cycle through the modality's phantom label set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from craft_ray.data.phantom import cxr, derm, fundus, histo
from craft_ray.data.phantom.raster import to_uint8
from craft_ray.errors import UserError, one_of
from craft_ray.modalities import MODALITY_NAMES, get_modality

GENERATORS: dict[str, Callable[[str, np.random.Generator, int], tuple[np.ndarray, dict]]] = {
    "cxr": cxr.generate,
    "derm": derm.generate,
    "fundus": fundus.generate,
    "histo": histo.generate,
}
MIN_SIZE = 16  # below this the smallest features (1 px dots) vanish


@dataclass
class PhantomBatch:
    """Generated images with their labels and ground-truth feature values."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: list[str]
    meta: list[dict]


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of dataset ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def check(modality: str, n: int = 1, size: int = 64, seed: int = 0) -> list[str]:
    """Validate generation arguments; returns the modality's phantom labels (class-index order)."""
    if modality not in GENERATORS:
        raise one_of("modality", modality, MODALITY_NAMES)
    if n <= 0:
        raise UserError(f"number of images must be positive, got {n}; pass e.g. --n 1000")
    if size < MIN_SIZE:
        raise UserError(f"image size must be at least {MIN_SIZE} px, got {size}; the default is 64")
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    return get_modality(modality).label_names("phantom")


def generate_one(modality: str, label: str, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, dict]:
    """One phantom image (uint8 [size, size, 3]) of ``label`` and its ground-truth metadata."""
    get_modality(modality).label(label, "phantom")
    image, meta = GENERATORS[modality](label, rng, size)
    return to_uint8(image), meta


def iter_phantoms(
    modality: str, n: int, *, size: int = 64, seed: int = 0, labels: Sequence[str] | str | None = None
) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yield ``(label, image uint8 [size, size, 3], meta)`` for images 0..n-1 of ``seed``."""
    names = check(modality, n, size, seed)
    if labels is None:
        chosen = [names[i % len(names)] for i in range(n)]
    elif isinstance(labels, str):
        chosen = [labels] * n
    else:
        chosen = list(labels)
        if len(chosen) != n:
            raise UserError(f"got {len(chosen)} labels for {n} images; pass one label per image or a single label")
    for i, label in enumerate(chosen):
        image, meta = generate_one(modality, label, image_rng(seed, i), size)
        yield label, image, meta


def generate(
    modality: str, n: int, *, size: int = 64, seed: int = 0, labels: Sequence[str] | str | None = None
) -> PhantomBatch:
    """Generate ``n`` phantom images of ``modality``; labels cycle unless given (one per image, or one for all)."""
    out = list(iter_phantoms(modality, n, size=size, seed=seed, labels=labels))
    return PhantomBatch(
        images=np.stack([image for _, image, _ in out]),
        labels=[label for label, _, _ in out],
        meta=[meta for _, _, meta in out],
    )
