"""Distributed loading: one manifest split as a Ray Data dataset, decoded with PIL in Ray tasks.

Pass the result to ``TorchTrainer(datasets={"train": ds})`` and read it in each worker with
``ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=..., collate_fn=TorchCollate(device))``
(the default collate cannot turn the prompt strings into tensors).
"""

from __future__ import annotations

import logging

import numpy as np
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from craft_ray.data.dataset import (
    PromptFn,
    check_policy,
    corrupt_message,
    default_prompt_fn,
    load_image,
    to_pixels,
)
from craft_ray.data.manifest import Manifest
from craft_ray.errors import UserError

logger = logging.getLogger(__name__)


def decode_batch(batch: dict[str, np.ndarray], size: int, corrupt_images: str) -> dict[str, np.ndarray]:
    """map_batches body: paths -> pixels float32 [B, 3, size, size] in [-1, 1]; labels and prompts pass through."""
    pixels, keep, skipped = [], [], []
    for i, path in enumerate(batch["path"]):
        try:
            pixels.append(to_pixels(load_image(str(path), size)))
        except Exception as exc:  # any decoder failure means the file is unusable
            if corrupt_images == "fail":
                raise UserError(corrupt_message(path, exc)) from exc
            skipped.append(str(path))
        else:
            keep.append(i)
    if skipped:
        logger.warning("skipped %d corrupt image(s) (data.corrupt_images=skip): %s", len(skipped), skipped[:3])
    return {
        "pixels": np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.float32),
        "label": np.asarray(batch["label"])[keep].astype(np.int64),
        "prompt": np.asarray(batch["prompt"])[keep],
    }


class TorchCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: pixels float32 [B, 3, H, W] and label int64 [B] on ``device``, prompt list[str]."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor | list[str]]:
        return {
            "pixels": torch.tensor(batch["pixels"], device=self.device),  # copy: Ray hands read-only arrays
            "label": torch.tensor(batch["label"], device=self.device),
            "prompt": [str(p) for p in batch["prompt"]],
        }


def ray_dataset(
    manifest: Manifest,
    split: str,
    size: int,
    *,
    corrupt_images: str = "fail",
    prompt_fn: PromptFn | None = None,
    batch_size: int = 32,
) -> ray.data.Dataset:
    """Rows ``{"pixels": float32 [3, size, size] in [-1, 1], "label": int64, "prompt": str}`` of one split.

    Prompts are fixed per row when the dataset is built (``prompt_fn(label_name)``, default the
    canonical prompt). Corrupt images raise a UserError naming the file (``fail``) or are dropped with
    a logged warning per decoded batch (``skip``). ``batch_size`` is the decoding batch, not the training one.
    """
    check_policy(corrupt_images)
    rows = manifest.split(split)
    if not rows:
        raise UserError(f"manifest {str(manifest.csv_path)!r} has no rows in split {split!r}")
    prompt = prompt_fn or default_prompt_fn(manifest.modality, manifest.dataset)
    items = [{"path": str(r.path), "label": manifest.label_index(r.label), "prompt": prompt(r.label)} for r in rows]
    return ray.data.from_items(items).map_batches(
        decode_batch,
        fn_kwargs={"size": size, "corrupt_images": corrupt_images},
        batch_size=batch_size,
        batch_format="numpy",
    )
