"""DDIM sampling with truncated backpropagation (DRaFT-K, AlignProp's random K, DRaFT-LV).

The sampler runs the diffusers UNet and a DDIM scheduler directly, exactly as diffusers'
``StableDiffusionPipeline`` does (classifier-free guidance on a [uncond, cond] batch, then
``scheduler.step``), so without gradients it reproduces the pipeline's output for the same seed.
Only the last K denoising steps are recorded by autograd (optionally with gradient checkpointing,
which keeps peak memory nearly flat in K); the VAE decode is differentiable too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch.utils.checkpoint import checkpoint

from craft_ray.config import CHOICES
from craft_ray.errors import UserError


@dataclass
class Trajectory:
    """What one sampling call produced."""

    latents: torch.Tensor  # [B, C, h, w] final latents (with grad through the last k steps)
    k: int  # steps that were differentiated


SPACINGS = CHOICES["sampling.timestep_spacing"]  # model, leading, trailing, linspace


def ddim_scheduler(scheduler, num_steps: int, device: torch.device | str, timestep_spacing: str = "model"
                   ) -> DDIMScheduler:
    """A fresh DDIM scheduler with the model's noise schedule, set to ``num_steps`` (the model's is untouched).

    ``timestep_spacing`` picks the ``num_steps`` timesteps: ``model`` keeps the model's scheduler config;
    ``leading`` (Stable Diffusion's) ends at t=1; ``trailing`` starts at the last training timestep and
    ends at t=1000/num_steps - 1, so the last step still removes real noise (Lin et al., 2024).
    """
    if timestep_spacing not in SPACINGS:
        raise UserError(f"unknown timestep spacing {timestep_spacing!r}; known: {', '.join(SPACINGS)}")
    extra = {} if timestep_spacing == "model" else {"timestep_spacing": timestep_spacing}
    sched = DDIMScheduler.from_config(scheduler.config, **extra)
    sched.set_timesteps(num_steps, device=device)
    return sched


def draw_k(k: int, k_range: list[int] | tuple[int, int] | None, num_steps: int, generator: torch.Generator | None
           ) -> int:
    """K for this batch: fixed ``k`` or, as in AlignProp, uniform in [lo, hi] from ``generator``."""
    if k_range is not None:
        lo, hi = int(k_range[0]), int(k_range[1])
        if not 0 <= lo <= hi <= num_steps:
            raise UserError(f"sampling.k_range {list(k_range)} must satisfy 0 <= lo <= hi <= num_steps={num_steps}")
        return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
    if not 0 <= k <= num_steps:
        raise UserError(f"sampling.k={k} must lie in [0, num_steps={num_steps}]")
    return k


def _eps(unet, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Guided model output; ``text`` is [2B,S,D] ([uncond; cond]) when guidance is on, else [B,S,D]."""
    if guidance_scale > 1.0:
        out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=text).sample
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)
    return unet(latents, t, encoder_hidden_states=text).sample


def sample(
    unet,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    latents: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    k: int = 1,
    generator: torch.Generator | None = None,
    grad_checkpointing: bool = True,
    timestep_spacing: str = "model",
) -> Trajectory:
    """Denoise ``latents`` [B,C,h,w] (initial noise) with DDIM; gradients only through the last ``k`` steps.

    cond/uncond: text embeddings [B,S,D] for the prompts and the empty prompt (uncond may be None
    when ``guidance_scale <= 1``). ``generator`` drives the DDIM noise when ``eta > 0``.
    ``timestep_spacing``: see ``ddim_scheduler``.
    """
    if guidance_scale > 1.0 and uncond is None:
        raise UserError("classifier-free guidance (guidance_scale > 1) needs unconditional embeddings")
    sched = ddim_scheduler(scheduler, num_steps, latents.device, timestep_spacing)
    text = torch.cat([uncond, cond]) if guidance_scale > 1.0 else cond
    latents = latents * sched.init_noise_sigma
    timesteps = sched.timesteps
    first_grad = len(timesteps) - k
    for i, t in enumerate(timesteps):
        x = sched.scale_model_input(latents, t)
        if i < first_grad:
            with torch.no_grad():
                eps = _eps(unet, x, t, text, guidance_scale)
        elif grad_checkpointing:
            eps = checkpoint(_eps, unet, x, t, text, guidance_scale, use_reentrant=False)
        else:
            eps = _eps(unet, x, t, text, guidance_scale)
        latents = sched.step(eps, t, latents, eta=eta, generator=generator).prev_sample
        if i < first_grad:
            latents = latents.detach()
    return Trajectory(latents=latents, k=k)


def sample_no_grad(
    unet,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    latents: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    timestep_spacing: str = "model",
    threads: int = 1,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Final latents [B,C,h,w] of DDIM without gradients, the batch split into ``threads`` parts that
    run at once in Python threads (torch's operators release the GIL).

    With one torch thread per process (OpenMP workers that sleep between operators cost more than they
    give on small CPUs), a second Python thread puts a second core to work on whole UNet passes of its
    part; each image's computation is the same as in one batch. With ``eta`` > 0 the DDIM noise comes
    from ``generator`` in batch order, so the batch stays whole. ``context`` (e.g. the model's
    autocast) is entered in each thread, since autocast and grad mode are per thread.
    """
    parts = 1 if eta > 0 else max(1, min(int(threads), latents.shape[0]))

    def run(sl: slice) -> torch.Tensor:
        with torch.no_grad(), context():
            return sample(unet, scheduler, cond[sl], None if uncond is None else uncond[sl], latents[sl],
                          num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, k=0, generator=generator,
                          grad_checkpointing=False, timestep_spacing=timestep_spacing).latents

    b = latents.shape[0]
    slices = [slice(b * i // parts, b * (i + 1) // parts) for i in range(parts)]
    if parts == 1:
        return run(slices[0])
    with ThreadPoolExecutor(parts, thread_name_prefix="sample") as pool:
        return torch.cat(list(pool.map(run, slices)))


def draft_lv(
    unet,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    final_latents: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    n: int,
    generator: torch.Generator | None = None,
    timestep_spacing: str = "model",
) -> torch.Tensor:
    """DRaFT-LV: re-noise the (detached) final latents to the last timestep ``n`` times and denoise once
    with gradients; returns [n*B, C, h, w] latents (repeat prompts/metadata n times for the reward)."""
    if n < 1:
        raise UserError(f"sampling.draft_lv_n must be >= 1, got {n}")
    sched = ddim_scheduler(scheduler, num_steps, final_latents.device, timestep_spacing)
    t = sched.timesteps[-1]
    x0 = final_latents.detach()
    outs = []
    for _ in range(n):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        noisy = sched.add_noise(x0, noise, t.reshape(1))
        eps = _eps(unet, sched.scale_model_input(noisy, t), t, torch.cat([uncond, cond]) if guidance_scale > 1
                   else cond, guidance_scale)
        outs.append(sched.step(eps, t, noisy).prev_sample)
    return torch.cat(outs)


def decode(vae, latents: torch.Tensor, *, grad_checkpointing: bool = False) -> torch.Tensor:
    """Differentiable VAE decode: latents [B,C,h,w] (scaled) -> images [B,3,H,W] clamped to [-1,1]."""
    scaled = latents / vae.config.scaling_factor
    if grad_checkpointing and torch.is_grad_enabled():
        image = checkpoint(lambda z: vae.decode(z).sample, scaled, use_reentrant=False)
    else:
        image = vae.decode(scaled).sample
    return image.clamp(-1.0, 1.0)
