"""The DDIM / DRaFT-K sampler: parity with diffusers, gradients only through the last K steps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from craft_ray import sampling
from craft_ray.errors import UserError
from craft_ray.models.diffusion import make_tiny_pipeline

T = 6
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPipeline:
    folder = make_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny", seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(pipe: StableDiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    return cond, uncond


def noise(pipe: StableDiffusionPipeline, batch: int, seed: int) -> torch.Tensor:
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.randn((batch, c, s, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_matches_the_diffusers_pipeline(pipe: StableDiffusionPipeline, eta: float) -> None:
    prompts = ["a chest x-ray showing cardiomegaly", "a chest x-ray showing no finding"]
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=T, guidance_scale=GUIDANCE, eta=eta, output_type="latent",
                   generator=torch.Generator().manual_seed(7)).images
        cond, uncond = embeddings(pipe, prompts)
        gen = torch.Generator().manual_seed(7)
        init = torch.randn(ref.shape, generator=gen)  # the pipeline draws the initial noise first
        ours = sampling.sample(pipe.unet, pipe.scheduler, cond, uncond, init, num_steps=T,
                               guidance_scale=GUIDANCE, eta=eta, k=0, generator=gen).latents
    # Same ops in the same order: agreement to float32 round-off (stated tolerance 1e-5).
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("batch", [4, 5])
def test_sampling_in_threads_gives_each_image_what_one_batch_gives(pipe: StableDiffusionPipeline, batch: int) -> None:
    """sample_no_grad with the batch split over 2 Python threads: the same latents as one batch (float32
    round-off where a batch size changes a kernel's blocking), no autograd graph, and eta > 0 (noise
    from one generator, in batch order) keeps the batch whole, bit for bit the one-batch result."""
    prompts = [f"a chest x-ray showing finding {i}" for i in range(batch)]
    cond, uncond = embeddings(pipe, prompts)
    init = noise(pipe, batch, seed=batch)
    kw = {"num_steps": T, "guidance_scale": GUIDANCE}
    with torch.no_grad():
        one = sampling.sample(pipe.unet, pipe.scheduler, cond, uncond, init, k=0, **kw).latents
    two = sampling.sample_no_grad(pipe.unet, pipe.scheduler, cond, uncond, init, threads=2, **kw)
    assert not two.requires_grad and two.shape == one.shape
    assert torch.allclose(two, one, atol=1e-5), (two - one).abs().max()
    with torch.no_grad():
        ref = sampling.sample(pipe.unet, pipe.scheduler, cond, uncond, init, k=0, eta=0.5,
                              generator=torch.Generator().manual_seed(3), **kw).latents
    stochastic = sampling.sample_no_grad(pipe.unet, pipe.scheduler, cond, uncond, init, threads=2, eta=0.5,
                                         generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(stochastic, ref)


def test_timestep_spacing_overrides_the_models_scheduler(pipe: StableDiffusionPipeline) -> None:
    assert pipe.scheduler.config.timestep_spacing == "leading"
    steps = {s: sampling.ddim_scheduler(pipe.scheduler, 10, "cpu", s).timesteps.tolist()
             for s in ("model", "leading", "trailing")}
    assert steps["model"] == steps["leading"] == list(range(901, 0, -100))  # ends at t=1 (steps_offset 1)
    assert steps["trailing"] == list(range(999, 0, -100))  # ends at t=99: the last step still denoises
    assert pipe.scheduler.config.timestep_spacing == "leading"  # the model's own scheduler is untouched
    with pytest.raises(UserError, match="unknown timestep spacing 'last'"):
        sampling.ddim_scheduler(pipe.scheduler, 10, "cpu", "last")
    # sampling with "trailing" is what the diffusers pipeline does with a trailing DDIM scheduler
    prompts = ["a chest x-ray showing cardiomegaly"]
    trailing = StableDiffusionPipeline(**{**pipe.components,
                                          "scheduler": DDIMScheduler.from_config(pipe.scheduler.config,
                                                                                 timestep_spacing="trailing")})
    trailing.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = trailing(prompts, num_inference_steps=T, guidance_scale=GUIDANCE, output_type="latent",
                       generator=torch.Generator().manual_seed(3)).images
        cond, uncond = embeddings(pipe, prompts)
        init = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
        ours = sampling.sample(pipe.unet, pipe.scheduler, cond, uncond, init, num_steps=T, guidance_scale=GUIDANCE,
                               k=0, timestep_spacing="trailing").latents
        leading = sampling.sample(pipe.unet, pipe.scheduler, cond, uncond, init, num_steps=T,
                                  guidance_scale=GUIDANCE, k=0).latents
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert not torch.allclose(ours, leading, atol=1e-3)


def count_grad_calls(pipe: StableDiffusionPipeline, k: int, checkpointing: bool) -> tuple[int, torch.Tensor]:
    calls = {"n": 0}
    lora_like = pipe.unet.conv_out.weight
    lora_like.requires_grad_(True)
    lora_like.grad = None
    hook = pipe.unet.conv_out.register_full_backward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        cond, uncond = embeddings(pipe, ["a chest x-ray"])
        traj = sampling.sample(pipe.unet, pipe.scheduler, cond, uncond, noise(pipe, 1, 0), num_steps=T,
                               guidance_scale=GUIDANCE, k=k, grad_checkpointing=checkpointing)
        if traj.latents.requires_grad:
            traj.latents.square().mean().backward()
        grad = lora_like.grad.clone() if lora_like.grad is not None else torch.zeros(0)
    finally:
        hook.remove()
        lora_like.requires_grad_(False)
        lora_like.grad = None
    return calls["n"], grad


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_flow_only_through_the_last_k_steps(pipe: StableDiffusionPipeline, checkpointing: bool) -> None:
    for k in (0, 1, 3):
        n, grad = count_grad_calls(pipe, k, checkpointing)
        assert n == k, (k, n)  # one backward through the UNet per differentiated step
        assert (grad.numel() > 0 and grad.abs().sum() > 0) == (k > 0)


def test_checkpointing_does_not_change_gradients(pipe: StableDiffusionPipeline) -> None:
    _, plain = count_grad_calls(pipe, 2, False)
    _, ckpt = count_grad_calls(pipe, 2, True)
    assert torch.allclose(plain, ckpt, atol=1e-6)


def test_random_k_as_in_alignprop() -> None:
    gen = torch.Generator().manual_seed(0)
    ks = {sampling.draw_k(1, [1, 3], T, gen) for _ in range(50)}
    assert ks == {1, 2, 3}
    assert sampling.draw_k(2, None, T, gen) == 2
    with pytest.raises(UserError, match="k_range"):
        sampling.draw_k(1, [2, 9], T, gen)
    with pytest.raises(UserError, match="sampling.k=9"):
        sampling.draw_k(9, None, T, gen)


def test_decode_is_differentiable_and_in_range(pipe: StableDiffusionPipeline) -> None:
    latents = noise(pipe, 2, 1).requires_grad_(True)
    images = sampling.decode(pipe.vae, latents, grad_checkpointing=True)
    assert images.shape == (2, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_draft_lv_returns_n_differentiable_copies(pipe: StableDiffusionPipeline) -> None:
    cond, uncond = embeddings(pipe, ["a chest x-ray", "a chest x-ray"])
    final = sampling.sample(pipe.unet, pipe.scheduler, cond, uncond, noise(pipe, 2, 2), num_steps=T,
                            guidance_scale=GUIDANCE, k=0).latents
    pipe.unet.conv_out.weight.requires_grad_(True)
    try:
        out = sampling.draft_lv(pipe.unet, pipe.scheduler, cond, uncond, final, num_steps=T,
                                guidance_scale=GUIDANCE, n=3, generator=torch.Generator().manual_seed(0))
        assert out.shape == (6, *final.shape[1:]) and out.requires_grad
        out.mean().backward()
        assert pipe.unet.conv_out.weight.grad.abs().sum() > 0
    finally:
        pipe.unet.conv_out.weight.requires_grad_(False)
        pipe.unet.conv_out.weight.grad = None


def test_guidance_needs_uncond(pipe: StableDiffusionPipeline) -> None:
    cond, _ = embeddings(pipe, ["a chest x-ray"])
    with pytest.raises(UserError, match="needs unconditional"):
        sampling.sample(pipe.unet, pipe.scheduler, cond, None, noise(pipe, 1, 0), num_steps=T,
                        guidance_scale=GUIDANCE)
