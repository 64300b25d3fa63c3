"""Benchmark: time and peak GPU memory of one DRaFT-K=1 CRAFT step at the ``sd`` profile's sizes.

The step is what ``craft_ray.training._craft_loss`` runs with ``reward.beta = 0``: DDIM sampling (50 steps,
classifier-free guidance 7.5) with gradients through the last step, the differentiable VAE decode at
512 px, the CAS reward (label, checklist, modality at 1/3 each) of an open_clip ViT-B/16 evaluator,
backward, gradient clipping and an AdamW step on the LoRA parameters. Rows with ``beta`` > 0 add the
diffusion loss on a batch of (random) "real" 512 px images, as the ``sd`` profile's default beta=0.5 does.

Every weight is random (no download): a UNet and a VAE of Stable Diffusion 2.1-base's configuration, a
2-layer CLIP text encoder of SD 2.1's width 1024 (the text encoder runs once per step without gradients,
so its depth barely matters), a ViT-B/16 open_clip evaluator (the vision tower of BiomedCLIP, the ``sd``
profile's evaluator). The model is built with the project's own ``DiffusionModel`` (LoRA rank 32 on
to_q/to_k/to_v/to_out.0, bf16 autocast, frozen weights in bf16). Each configuration runs one warm-up step,
then the mean wall time of three steps (``torch.cuda.synchronize`` around each), with the peak of
``torch.cuda.max_memory_allocated`` over them. ``--device cpu --tiny`` runs the same code on shrunken
modules as a smoke test. Writes ``bench/results/train_gpu.json`` (or ``--out``).

    python bench/train_gpu.py                       # on a GPU machine
    python bench/train_gpu.py --device cpu --tiny --out /tmp/train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

OUT = Path(__file__).parent / "results" / "train_gpu.json"
GIB = 2**30
WEIGHTS = {"label": 1 / 3, "checklist": 1 / 3, "modality": 1 / 3, "realism": 0.0}
MODALITY, DATASET = "cxr", "phantom"


@dataclass(frozen=True)
class Sizes:
    """Module sizes of one benchmark scale."""

    resolution: int  # image side in pixels
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]  # CLIPTextConfig keywords besides the tokenizer's ids
    evaluator: str  # "ViT-B-16" (random open_clip architecture) or "tiny" (make_tiny_evaluator)


_SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
# Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base unet/ and vae/ config.json).
SD21_BASE = Sizes(
    resolution=512,
    unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
              cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
              norm_num_groups=32, **_SD_BLOCKS),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16),
    evaluator="ViT-B-16",
)
# The same layout shrunk for a CPU smoke test: 64 px images, 8x8 latents (VAE factor 8 as in SD).
TINY = Sizes(
    resolution=64,
    unet=dict(sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=64,
              attention_head_dim=(1, 2, 2, 2), use_linear_projection=True, norm_num_groups=32, **_SD_BLOCKS),
    vae=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, sample_size=64),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
    evaluator="tiny",
)


def build_components(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Randomly initialised SD components of ``sizes``, created directly on ``device`` (fast init on GPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from craft_ray.models.diffusion import tiny_tokenizer

    tokenizer = tiny_tokenizer(77)  # SD's 77-token context
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **sizes.unet)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * len(sizes.vae["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(sizes.vae["block_out_channels"]), **sizes.vae,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes.text,
        ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def build_evaluator(kind: str, device: torch.device, tmp: Path):
    """A frozen random open_clip evaluator: ViT-B/16 at 224 px, or the tiny world's tiny ViT."""
    import open_clip

    from craft_ray.config import EvaluatorConfig
    from craft_ray.models.evaluators import Evaluator, load_evaluator, make_tiny_evaluator

    if kind == "tiny":
        folder = make_tiny_evaluator(tmp / "evaluator", "vit", seed=0)
        return load_evaluator(EvaluatorConfig(model=f"local-dir:{folder}", family="vit"), device)
    # load_evaluator refuses a named architecture without weights (it would score nothing in training);
    # for timing, random weights of the same architecture do the same arithmetic.
    model = open_clip.create_model(kind, pretrained=None, device=device)
    return Evaluator(model, open_clip.get_tokenizer(kind), f"{kind}:random", "vit", open_clip.get_model_config(kind))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Step:
    """One CRAFT training step (sampling, decode, reward, backward, AdamW) as in ``training._craft_loss``."""

    def __init__(self, model, reward_fn, pool: dict[str, list[str]], labels: list[str], resolution: int,
                 num_steps: int, guidance_scale: float, lr: float = 3e-5, max_grad_norm: float = 1.0) -> None:
        self.model, self.reward_fn, self.pool, self.labels = model, reward_fn, pool, labels
        self.resolution, self.num_steps, self.guidance_scale = resolution, num_steps, guidance_scale
        self.max_grad_norm = max_grad_norm
        self.params = model.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-2)

    def __call__(self, batch: int, beta: float, seed: int) -> dict[str, float]:
        """Run one step; returns the seconds of each phase (synchronised) and the reward."""
        from craft_ray.sampling import sample

        model, device = self.model, self.model.device
        g = torch.Generator().manual_seed(seed)
        labels = [self.labels[(seed * batch + i) % len(self.labels)] for i in range(batch)]
        prompts = [self.pool[y][int(torch.randint(len(self.pool[y]), (1,), generator=g))] for y in labels]
        side = self.resolution // model.latent_scale
        times: dict[str, float] = {}
        _sync(device)
        t0 = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal t0
            _sync(device)
            now = time.perf_counter()
            times[name] = now - t0
            t0 = now

        noise = torch.randn((batch, model.latent_channels, side, side), generator=g).to(device)
        cond = model.encode_prompts(prompts)
        uncond = model.encode_prompts([""]).expand(batch, -1, -1)
        mark("text_s")
        with model.autocast():
            traj = sample(model.unet, model.scheduler, cond, uncond, noise, num_steps=self.num_steps,
                          guidance_scale=self.guidance_scale, eta=0.0, k=1, generator=g,
                          grad_checkpointing=model.gradient_checkpointing)
        mark("sample_s")
        images = model.decode_latents(traj.latents.float())
        mark("decode_s")
        reward, _ = self.reward_fn(images, prompts, [{"label": y} for y in labels])
        loss = -reward.mean()
        mark("reward_s")
        if beta > 0:
            from craft_ray.training import COND_DROPOUT  # the SFT/CRAFT prompt dropout of the real batch

            real = torch.rand((batch, 3, self.resolution, self.resolution), generator=g).to(device) * 2 - 1
            loss = loss + beta * model.diffusion_loss(real, prompts, generator=g, cond_dropout=COND_DROPOUT)
            mark("diffusion_loss_forward_s")
        loss.backward()
        mark("backward_s")
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        mark("optimizer_s")
        times["reward"] = float(reward.detach().mean())
        return times


def measure(step: Step, batch: int, checkpointing: bool, beta: float, repeats: int) -> dict[str, Any]:
    """One warm-up step, then ``repeats`` timed steps: mean step time, phase times and peak memory."""
    model = step.model
    device = model.device
    model.set_gradient_checkpointing(checkpointing)
    row: dict[str, Any] = {"batch": batch, "gradient_checkpointing": checkpointing, "beta": beta}
    try:
        step(batch, beta, seed=0)  # warm-up: kernels, allocator, AdamW state
        if device.type == "cuda":
            torch.cuda.empty_cache()
            row["resident_gib"] = torch.cuda.memory_allocated(device) / GIB  # weights + LoRA + AdamW state
            torch.cuda.reset_peak_memory_stats(device)
        steps, phases = [], []
        for i in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            phase = step(batch, beta, seed=i + 1)
            _sync(device)
            steps.append(time.perf_counter() - t0)
            phases.append(phase)
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"out of memory: {' '.join(str(exc).split())[:200]}"
        return row
    finally:
        step.opt.zero_grad(set_to_none=True)
    row["step_s"] = sum(steps) / len(steps)
    row["step_s_each"] = steps
    row["images_per_s"] = batch / row["step_s"]
    keys = [k for k in phases[0] if k.endswith("_s")]
    row["phases_s"] = {k.removesuffix("_s"): sum(p[k] for p in phases) / len(phases) for k in keys}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="shrunken modules (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT})")
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM steps (sd profile: 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (sd profile: 7.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; run with --device cpu --tiny for the CPU smoke test")
    sizes = TINY if args.tiny else SD21_BASE

    from omegaconf import OmegaConf

    from craft_ray import cas
    from craft_ray.config import LoraConfig
    from craft_ray.knowledge import load_shipped
    from craft_ray.modalities import get_modality
    from craft_ray.models.diffusion import DiffusionModel
    from craft_ray.rewards import make_reward

    torch.manual_seed(0)
    t0 = time.perf_counter()
    lora = OmegaConf.structured(LoraConfig(rank=32, alpha=32))
    components = build_components(sizes, device)
    model = DiffusionModel(components, lora, mixed_precision="bf16", gradient_checkpointing=True).to(device)
    model.train()
    knowledge = load_shipped(MODALITY, DATASET)
    mod = get_modality(MODALITY)
    labels = mod.label_names(DATASET)
    pool = {y: list(dict.fromkeys(list(knowledge.prompts(y)) + mod.prompts(y, DATASET))) for y in labels}
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = build_evaluator(sizes.evaluator, device, Path(tmp))
    texts = cas.build_texts(evaluator, knowledge, MODALITY, DATASET)
    reward_fn = make_reward(WEIGHTS, cas.CASScorer(evaluator, texts, None))
    step = Step(model, reward_fn, pool, labels, sizes.resolution, args.num_steps, args.guidance)
    build_s = time.perf_counter() - t0

    import diffusers
    import open_clip

    result: dict[str, Any] = {
        "what": ("one DRaFT-K=1 CRAFT training step (DDIM sampling with CFG, grad through the last step, VAE "
                 "decode, CAS reward label/checklist/modality 1/3 each, backward, AdamW on LoRA); random weights"),
        "scale": "tiny (CPU smoke test)" if args.tiny else "sd profile: SD 2.1-base UNet/VAE at 512 px",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "open_clip": open_clip.__version__,
        "settings": {"resolution": sizes.resolution, "num_steps": args.num_steps, "guidance_scale": args.guidance,
                     "k": 1, "eta": 0.0, "mixed_precision": "bf16", "lora_rank": 32, "lora_alpha": 32,
                     "lora_targets": list(lora.target_modules), "evaluator": sizes.evaluator,
                     "reward_weights": WEIGHTS, "repeats": args.repeats, "warmup_steps": 1},
        "parameters": {"unet": _params(model.unet), "vae": _params(model.vae),
                       "text_encoder": _params(model.text_encoder), "evaluator": _params(evaluator.model),
                       "lora": sum(p.numel() for p in model.trainable_parameters())},
        "build_s": build_s,
        "notes": ["tiny modules: a smoke test of the code path, not a measurement"] if args.tiny else [
            "text encoder: 2 layers of SD 2.1's width 1024 (SD 2.1 has 23); it runs once per step without grad",
            "evaluator: random open_clip ViT-B-16 (BiomedCLIP's vision tower); its prompt embeddings are cached",
            "peak_gib: torch.cuda.max_memory_allocated over the timed steps, including resident weights",
            "gradient_checkpointing toggles UNet and VAE checkpointing together (DiffusionModel)",
        ],
        "rows": [],
    }
    configs = [(1, True, 0.0), (4, True, 0.0), (1, False, 0.0), (4, False, 0.0), (1, True, 0.5), (4, True, 0.5)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for batch, ckpt, beta in configs:
        row = measure(step, batch, ckpt, beta, args.repeats)
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each row: partial results survive
        mem = f" peak {row['peak_gib']:.2f} GiB" if "peak_gib" in row else ""
        what = row.get("error") or f"step {row['step_s']:.3f} s{mem} phases " + " ".join(
            f"{k} {v:.3f}" for k, v in row["phases_s"].items())
        print(f"batch {batch} checkpointing {ckpt!s:<5} beta {beta}: {what}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
