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

``shifts`` > 0 scores that many randomly shifted copies of each image (reflect-padded, each moved by up
to ``max_shift`` of its side in x and y) and averages their dimensions: an expectation over small
translations, which a reward gradient must survive. On the tiny world's cxr both evaluators' pixel
gradients are adversarial; averaging over 2 copies helped on one training seed but not on average over
four (docs/cxr-experiments.md has the measurements).

``grad_sigma`` > 0 leaves the reward's value as it is but blurs its gradient with respect to the image
by a Gaussian of that many pixels, so only the smooth part of the evaluator's pixel gradient reaches
the generator. On the tiny world's cxr, pixel-space ascent on the ViT's label score with the raw
gradient reaches a score of 1.00 without changing the oracle's verdicts; with the gradient blurred by
2-8 px the same ascent raises the oracle's accuracy from 36.7 to 44.5-45.3 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from craft_ray.cas import CASScorer, check_weights, combine
from craft_ray.errors import UserError

RewardFn = Callable[[torch.Tensor, Sequence[str], Sequence[Mapping]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


FORMS = ("cas", "log")
LOG_EPS = 1e-4  # log form: floor inside the log, so a dimension at exactly 0 stays finite


def make_reward(weights: Mapping[str, float], scorer: CASScorer, form: str = "cas", *, shifts: int = 0,
                max_shift: float = 0.0625, grad_sigma: float = 0.0) -> RewardFn:
    """The reward of ``scorer`` (the training evaluator) under simplex ``weights`` in ``form`` (cas | log),
    averaged over ``shifts`` randomly shifted copies of each image (0 = the image as is), with its
    gradient with respect to the image low-passed by a Gaussian of ``grad_sigma`` pixels (0 = as is).

    The returned function takes an optional ``generator`` keyword for the shifts.
    """
    w = check_weights(weights)
    if form not in FORMS:
        raise UserError(f"unknown reward.form {form!r}; known: {', '.join(FORMS)}")
    if w["realism"] > 0 and scorer.bank is None:
        raise UserError("reward weight on 'realism' needs a reference bank of real-image embeddings")
    if shifts < 0 or not 0.0 <= max_shift < 0.5:
        raise UserError(f"reward.shifts must be >= 0 and reward.max_shift in [0, 0.5), got {shifts} and {max_shift}")
    if grad_sigma < 0:
        raise UserError(f"reward.grad_sigma must be >= 0, got {grad_sigma}")

    def reward_fn(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping],
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(metadata) != images.shape[0]:
            raise UserError(f"reward got {images.shape[0]} images but {len(metadata)} metadata entries")
        labels = [m["label"] for m in metadata]
        if grad_sigma > 0:
            images = low_pass_grad(images, grad_sigma)
        views = [images] if shifts == 0 else [shifted(images, max_shift, generator) for _ in range(shifts)]
        copies = [scorer.dimensions(view, labels) for view in views]
        dims = {name: torch.stack([c[name] for c in copies]).mean(dim=0) for name in copies[0]}
        if form == "cas":
            reward = combine(dims, w)
        else:
            reward = combine({name: torch.log(value + LOG_EPS) for name, value in dims.items()}, w)
        return reward, {name: value.detach() for name, value in dims.items()}

    return reward_fn


def shifted(images: torch.Tensor, max_shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` [B,3,H,W] moved by one random offset of up to ``max_shift`` × side in x and y,
    reflect-padded so that no border appears (differentiable)."""
    h, w = images.shape[-2:]
    py, px = int(round(max_shift * h)), int(round(max_shift * w))
    if py == 0 and px == 0:
        return images
    dy, dx = (int(v) for v in (torch.randint(0, 2 * py + 1, (1,), generator=generator),
                               torch.randint(0, 2 * px + 1, (1,), generator=generator)))
    padded = F.pad(images, (px, px, py, py), mode="reflect")
    return padded[..., dy:dy + h, dx:dx + w]


class _LowPassGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, sigma):
        ctx.sigma = sigma
        return images.view_as(images)

    @staticmethod
    def backward(ctx, grad):
        radius = min(math.ceil(3 * ctx.sigma), grad.shape[-1] - 1, grad.shape[-2] - 1)
        return TF.gaussian_blur(grad, [2 * radius + 1] * 2, [ctx.sigma] * 2), None


def low_pass_grad(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``images`` unchanged going forward; the gradient flowing back through it is blurred by a
    Gaussian of ``sigma`` pixels, so only its smooth (layout-scale) part reaches the generator."""
    return _LowPassGrad.apply(images, float(sigma))
