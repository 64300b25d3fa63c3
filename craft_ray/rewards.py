"""Differentiable rewards from the CAS dimensions, as small factories in the style of ddpo-pytorch.

``make_reward(weights, scorer)`` returns ``fn(images, prompts, metadata) -> (reward [B], info)``:
images [B,3,H,W] in [-1,1] (with gradients), prompts the B conditioning strings, metadata one dict
per image with at least ``label``. The reward is sum_i w_i · dim_i of the training evaluator's
CAS dimensions and is differentiable end to end; ``info`` holds each dimension, detached.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from craft_ray.cas import CASScorer, check_weights, combine
from craft_ray.errors import UserError

RewardFn = Callable[[torch.Tensor, Sequence[str], Sequence[Mapping]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def make_reward(weights: Mapping[str, float], scorer: CASScorer) -> RewardFn:
    """The weighted CAS reward of ``scorer`` (the training evaluator) under simplex ``weights``."""
    w = check_weights(weights)
    if w["realism"] > 0 and scorer.bank is None:
        raise UserError("reward weight on 'realism' needs a reference bank of real-image embeddings")

    def reward_fn(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(metadata) != images.shape[0]:
            raise UserError(f"reward got {images.shape[0]} images but {len(metadata)} metadata entries")
        labels = [m["label"] for m in metadata]
        dims = scorer.dimensions(images, labels)
        reward = combine(dims, w)
        return reward, {name: value.detach() for name, value in dims.items()}

    return reward_fn
