"""Differentiable rewards from the CAS dimensions, as small factories in the style of ddpo-pytorch.

``make_reward(weights, scorer, form)`` returns ``fn(images, prompts, metadata) -> (reward [B], info)``:
images [B,3,H,W] in [-1,1] (with gradients), prompts the B conditioning strings, metadata one dict
per image with at least ``label``. The reward is differentiable end to end; ``info`` holds each
dimension, detached. Two forms (``reward.form``):

- ``cas`` (default): sum_i w_i · dim_i of the training evaluator's CAS dimensions, the CAS itself.
- ``log``: sum_i w_i · log(dim_i + 1e-4), the log of a weighted geometric mean. Same maximiser per
  dimension, but a dimension near 0 keeps its gradient: realism is a sigmoid of a k-NN distance, and
  for generated images far from every real one it sits at 0.01-0.05, where the sigmoid's slope is
  4-19 % of its slope at 0.5, so the ``cas`` form barely moves it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from craft_ray.cas import CASScorer, check_weights, combine
from craft_ray.errors import UserError

RewardFn = Callable[[torch.Tensor, Sequence[str], Sequence[Mapping]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


FORMS = ("cas", "log")
LOG_EPS = 1e-4  # log form: floor inside the log, so a dimension at exactly 0 stays finite


def make_reward(weights: Mapping[str, float], scorer: CASScorer, form: str = "cas") -> RewardFn:
    """The reward of ``scorer`` (the training evaluator) under simplex ``weights`` in ``form`` (cas | log)."""
    w = check_weights(weights)
    if form not in FORMS:
        raise UserError(f"unknown reward.form {form!r}; known: {', '.join(FORMS)}")
    if w["realism"] > 0 and scorer.bank is None:
        raise UserError("reward weight on 'realism' needs a reference bank of real-image embeddings")

    def reward_fn(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(metadata) != images.shape[0]:
            raise UserError(f"reward got {images.shape[0]} images but {len(metadata)} metadata entries")
        labels = [m["label"] for m in metadata]
        dims = scorer.dimensions(images, labels)
        if form == "cas":
            reward = combine(dims, w)
        else:
            reward = combine({name: torch.log(value + LOG_EPS) for name, value in dims.items()}, w)
        return reward, {name: value.detach() for name, value in dims.items()}

    return reward_fn
