"""Images for training: decoding, the PyTorch ``ImageDataset``, and the dataset a config names.

``load_dataset(cfg)`` returns the :class:`~craft_ray.data.manifest.Manifest` of ``cfg.data.source``:
a real manifest CSV, or the phantom world generated once into ``cfg.data.cache_dir`` and reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from craft_ray.data.manifest import Manifest, Row, read_manifest, write_manifest
from craft_ray.errors import UserError
from craft_ray.modalities import get_modality

CORRUPT_POLICIES = ("fail", "skip")
PromptFn = Callable[[str], str]  # label name -> prompt


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode an image to RGB, resize its shorter side to ``size`` and centre-crop: uint8 [size, size, 3].

    Grayscale images are replicated into three channels; 16-bit images are scaled to 8 bits.
    Raises the decoder's exception (OSError, ValueError, ...) when the file cannot be decoded.
    """
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the image is much larger
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).copy()


def to_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return (image.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def corrupt_message(path: str | Path, exc: BaseException) -> str:
    """The one-line error for an image that cannot be decoded."""
    return (
        f"cannot decode image {str(path)!r} ({type(exc).__name__}: {exc}); replace or remove it from the "
        f"manifest, or set data.corrupt_images=skip to leave such images out"
    )


def check_policy(corrupt_images: str) -> str:
    """Validate a ``data.corrupt_images`` value."""
    if corrupt_images not in CORRUPT_POLICIES:
        raise UserError(f"unknown corrupt_images policy {corrupt_images!r}; known: {', '.join(CORRUPT_POLICIES)}")
    return corrupt_images


def default_prompt_fn(modality: str, dataset: str) -> PromptFn:
    """The canonical label-conditioned prompt of ``modality``/``dataset``."""
    mod = get_modality(modality)
    cache = {lab: mod.prompt(lab, dataset) for lab in mod.label_names(dataset)}
    return cache.__getitem__


class ImageDataset(torch.utils.data.Dataset):
    """One split of a manifest as training items.

    Items: ``pixels`` float32 [3, size, size] in [-1, 1], ``label`` class index, ``label_name``, ``prompt``
    (label-conditioned; ``prompt_fn(label_name)`` overrides the modality's canonical prompt, e.g. to
    sample enriched prompts) and ``path``. With ``corrupt_images="skip"`` every image is decoded once
    here and the undecodable ones are left out with one warning that counts them; with ``"fail"`` the
    first undecodable image raises a UserError naming it when it is loaded.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        size: int,
        *,
        modality: str | None = None,
        dataset: str | None = None,
        corrupt_images: str = "fail",
        prompt_fn: PromptFn | None = None,
    ) -> None:
        for what, given, own in (("modality", modality, manifest.modality), ("dataset", dataset, manifest.dataset)):
            if given is not None and given != own:
                raise UserError(f"{what} {given!r} differs from the manifest's {own!r} ({manifest.csv_path})")
        if size <= 0:
            raise UserError(f"image size must be a positive number of pixels, got {size}")
        self.manifest = manifest
        self.split_name = split
        self.size = size
        self.corrupt_images = check_policy(corrupt_images)
        self.prompt_fn = prompt_fn or default_prompt_fn(manifest.modality, manifest.dataset)
        rows = manifest.split(split)
        if not rows:
            raise UserError(f"manifest {str(manifest.csv_path)!r} has no rows in split {split!r}")
        self.skipped: list[Path] = []
        if self.corrupt_images == "skip":
            rows = self._scan(rows)
        self.rows: list[Row] = rows

    def _scan(self, rows: list[Row]) -> list[Row]:
        good = []
        for row in tqdm(rows, desc=f"checking {self.split_name} images", disable=len(rows) < 2000, leave=False):
            try:
                load_image(row.path, self.size)
            except Exception:  # any decoder failure means the file is unusable
                self.skipped.append(row.path)
            else:
                good.append(row)
        if self.skipped:
            shown = ", ".join(repr(str(p)) for p in self.skipped[:3])
            warnings.warn(
                f"skipped {len(self.skipped)} corrupt image(s) of {len(rows)} in split {self.split_name!r} "
                f"of {str(self.manifest.csv_path)!r} (data.corrupt_images=skip): {shown}",
                stacklevel=3,
            )
        if not good:
            raise UserError(f"no decodable images in split {self.split_name!r} of {str(self.manifest.csv_path)!r}")
        return good

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            image = load_image(row.path, self.size)
        except Exception as exc:  # a file changed after the scan, or policy fail: name the file
            raise UserError(corrupt_message(row.path, exc)) from exc
        return {
            "pixels": torch.from_numpy(to_pixels(image)),
            "label": self.manifest.label_index(row.label),
            "label_name": row.label,
            "prompt": self.prompt_fn(row.label),
            "path": str(row.path),
        }


# ------------------------------------------------------------------------------------------ phantom world


def phantom_cache_dir(cfg: Any) -> Path:
    """Cache folder of the phantom dataset a config names: ``<cache_dir>/<modality>_<size>_<seed>_<n...>``."""
    d = cfg.data
    name = f"{cfg.modality}_{d.size}_{d.phantom_seed}_{d.n_train}-{d.n_val}-{d.n_test}"
    return Path(d.cache_dir).expanduser().absolute() / name


def _generate_phantom(cfg: Any, folder: Path) -> None:
    from craft_ray.data import phantom  # imported here: only the phantom source needs the generator
    from craft_ray.data.phantom.export import meta_columns

    rows = []
    # One generator call per split with its own seed, so splits never share an image.
    for i, (split, n) in enumerate((("train", cfg.data.n_train), ("val", cfg.data.n_val), ("test", cfg.data.n_test))):
        if n <= 0:
            continue
        batch = phantom.generate(cfg.modality, n, size=cfg.data.size, seed=3 * cfg.data.phantom_seed + i)
        (folder / split).mkdir(parents=True)
        for j, (pixels, label, meta) in enumerate(zip(batch.images, batch.labels, batch.meta, strict=True)):
            rel = f"{split}/{j:05d}.png"
            Image.fromarray(pixels).save(folder / rel)
            # Ground-truth feature values become manifest columns, in the same format as the data CLI writes.
            rows.append({**meta_columns(meta), "path": rel, "label": label, "split": split})
    write_manifest(folder / "manifest.csv", rows)


def phantom_dataset(cfg: Any) -> Manifest:
    """The phantom dataset of ``cfg.modality``: generated on first use into ``phantom_cache_dir(cfg)``, then reused."""
    folder = phantom_cache_dir(cfg)
    if not (folder / "manifest.csv").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Write into a temporary sibling and rename: concurrent workers or an interrupted run never
        # leave a half-written cache behind; the first finished copy wins.
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _generate_phantom(cfg, tmp)
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "manifest.csv").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return read_manifest(folder / "manifest.csv", cfg.modality, "phantom")


def load_dataset(cfg: Any) -> Manifest:
    """The manifest a config names: ``data.source`` phantom (generated, cached) or manifest (a CSV)."""
    source = cfg.data.source
    if source == "phantom":
        if cfg.data.dataset != "phantom":
            raise UserError(
                f"data.source=phantom generates the phantom label set, but data.dataset={cfg.data.dataset!r}; "
                f"set data.dataset=phantom, or data.source=manifest with data.manifest=PATH"
            )
        return phantom_dataset(cfg)
    if source == "manifest":
        if not cfg.data.manifest:
            raise UserError(
                "data.source=manifest needs data.manifest=PATH (write one with `python -m craft_ray.data <dataset>`)"
            )
        return read_manifest(cfg.data.manifest, cfg.modality, cfg.data.dataset)
    raise UserError(f"unknown data.source {source!r}; known: phantom, manifest")
