"""Write a phantom dataset to disk: PNG files plus a ``manifest.csv`` with ground-truth columns.

Layout: ``DIR/images/<label>/<index>.png`` and ``DIR/manifest.csv`` (``path,label,split`` and one
column per metadata key; lists are ``;``-joined), readable by
:func:`craft_ray.data.manifest.read_manifest` with dataset ``phantom``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from craft_ray.data.adapters import assign_splits
from craft_ray.data.manifest import write_manifest
from craft_ray.data.phantom import check, iter_phantoms
from craft_ray.errors import UserError


def meta_columns(meta: dict) -> dict[str, object]:
    """Flatten one image's metadata into manifest columns: lists become ``;``-joined strings."""
    out: dict[str, object] = {}
    for key, value in meta.items():
        if isinstance(value, (list, tuple, np.ndarray)):
            out[key] = ";".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out


def write_dataset(
    out: str | Path,
    modality: str,
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    split: dict[str, float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate ``n`` phantoms into folder ``out`` with a stratified split; returns the manifest path."""
    check(modality, n, size, seed)
    out = Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise UserError(f"{str(manifest)!r} already exists; choose another --out or pass --overwrite")
    rows: list[dict[str, object]] = []
    for index, (label, image, meta) in enumerate(
        tqdm(iter_phantoms(modality, n, size=size, seed=seed), total=n, unit="img",
             desc=f"phantom {modality}", disable=None if progress else True)
    ):
        rel = Path("images") / label / f"{index:06d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / rel)
        rows.append({"path": rel.as_posix(), "label": label, "index": index, **meta_columns(meta)})
    if split:
        # Stratified by label so that every split keeps the class balance.
        names = assign_splits([str(r["index"]) for r in rows], [str(r["label"]) for r in rows], split, seed)
        for row, name in zip(rows, names, strict=True):
            row["split"] = name
    return write_manifest(manifest, rows)
