"""The text-to-image diffusion model: a Stable-Diffusion-family pipeline with LoRA adapters on the UNet.

Components load with diffusers ``from_pretrained(dir_or_id)``, the same code path for a local folder
(the tiny world, a downloaded snapshot) and a Hugging Face Hub id. Only the LoRA adapters on the UNet
attention projections train; the VAE, the text encoder and the UNet's own weights stay frozen. LoRA
files are safetensors in the diffusers LoRA format, so plain diffusers reads them::

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights("lora.safetensors")

:func:`make_tiny_pipeline` builds a tiny randomly initialised pipeline of the same layout for tests
and for the bootstrap that trains the shipped tiny world.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from craft_ray.errors import UserError
from craft_ray.sampling import decode
from craft_ray.stages import LORA_WEIGHT_NAME  # noqa: F401 (diffusers' default LoRA file name; re-exported)

SUBFOLDERS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
ADAPTER = "default"  # the one peft adapter this project trains
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_OFFLINE_HINT = (
    "on machines without internet access download the weights beforehand "
    "(`huggingface-cli download {id}`) and set HF_HUB_OFFLINE=1"
)


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is a folder."""
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 or Path(source).exists()


def _check_folder(folder: Path) -> None:
    """Raise a UserError naming what a diffusers Stable Diffusion folder must contain."""
    expected = "model_index.json and the subfolders " + ", ".join(f"{s}/" for s in SUBFOLDERS)
    if not folder.is_dir():
        raise UserError(
            f"diffusion model folder '{folder}' not found; expected a diffusers Stable Diffusion folder with "
            f"{expected} (the tiny world is made by `python -m craft_ray.bootstrap`; a hub id like "
            "stabilityai/stable-diffusion-2-1-base also works)"
        )
    missing = [name for name in ("model_index.json", *SUBFOLDERS) if not (folder / name).exists()]
    if missing:
        raise UserError(
            f"'{folder}' is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}; "
            f"expected {expected} (as written by StableDiffusionPipeline.save_pretrained)"
        )


def load_components(source: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Load unet, vae, text_encoder, tokenizer and scheduler from a diffusers folder or hub id."""
    source = str(source)
    local = _looks_like_path(source)
    if local:
        source = str(Path(source).expanduser())
        _check_folder(Path(source))
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
            "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
        }
    except (OSError, ValueError, HfHubHTTPError, EntryNotFoundError) as exc:
        reason = " ".join(str(exc).split())[:300]
        if local:
            raise UserError(f"cannot load the diffusion model from folder '{source}': {reason}") from exc
        rev = f" at revision {revision!r}" if revision else ""
        raise UserError(
            f"cannot load the diffusion model {source!r}{rev} from the Hugging Face Hub (no local folder of that "
            f"name exists either): {reason}; check the id "
            f"(a Stable Diffusion repo with {', '.join(SUBFOLDERS)}) and revision; "
            + _OFFLINE_HINT.format(id=source)
        ) from exc


def _short_name(module_name: str) -> str:
    """The name LoRA target_modules match: the last path part, two for ModuleList members (to_out.0)."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(module, "module", module)


class DiffusionModel:
    """VAE + text encoder + UNet (with trainable LoRA) + DDIM scheduler of a Stable-Diffusion-family model.

    ``unet`` may be replaced by a DDP wrapper of itself (``model.unet = prepare_model(model.unet)``);
    every method unwraps it where it needs the plain module.
    """

    def __init__(
        self,
        components: dict[str, Any],
        lora: Any,
        mixed_precision: str = "no",
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        self.vae: AutoencoderKL = components["vae"]
        self.text_encoder: CLIPTextModel = components["text_encoder"]
        self.tokenizer: CLIPTokenizer = components["tokenizer"]
        self.scheduler: DDIMScheduler = components["scheduler"]
        self.unet: torch.nn.Module = components["unet"]
        if mixed_precision not in ("no", *_DTYPES):
            raise UserError(f"bad value {mixed_precision!r} for model.mixed_precision; valid choices: no, fp16, bf16")
        self.mixed_precision = mixed_precision
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type not in _PREDICTION_TYPES:
            raise UserError(
                f"unsupported scheduler prediction_type {prediction_type!r}; known: {', '.join(_PREDICTION_TYPES)}"
            )
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.eval()
        self.unet.set_attn_processor(AttnProcessor2_0())  # fused SDPA kernels (flash / memory-efficient)
        self._add_lora(lora, seed)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_config(cls, model_cfg: Any, device: str | torch.device = "cpu", seed: int = 0) -> DiffusionModel:
        """Load ``cfg.model.pretrained`` (folder or hub id), add LoRA per ``cfg.model.lora``, move to device."""
        components = load_components(model_cfg.pretrained, model_cfg.revision)
        model = cls(
            components,
            model_cfg.lora,
            mixed_precision=model_cfg.mixed_precision,
            gradient_checkpointing=model_cfg.gradient_checkpointing,
            seed=seed,
        )
        return model.to(device)

    # ----- LoRA -------------------------------------------------------------------------------------------

    def _add_lora(self, lora: Any, seed: int) -> None:
        unet = _unwrap(self.unet)
        config = PeftLoraConfig(
            r=int(lora.rank),
            lora_alpha=int(lora.alpha),
            lora_dropout=float(lora.dropout),
            target_modules=list(lora.target_modules),
            init_lora_weights="gaussian",  # A ~ N(0, std 1/r), B = 0: the adapted model starts equal to the base
        )
        # Seeded so that every DDP rank (and every rerun) starts from the same adapter weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                unet.add_adapter(config, adapter_name=ADAPTER)
            except ValueError as exc:
                linear = sorted({_short_name(n) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)})
                raise UserError(
                    f"model.lora.target_modules={list(lora.target_modules)} match no UNet layer ({exc}); "
                    f"UNet linear layers are named: {', '.join(linear)}"
                ) from exc

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters (the only ones with ``requires_grad``)."""
        return [p for p in _unwrap(self.unet).parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights in the diffusers format (``unet.<module>.lora.down.weight`` ...), on CPU."""
        peft_sd = get_peft_model_state_dict(_unwrap(self.unet), adapter_name=ADAPTER)
        diffusers_sd = convert_state_dict_to_diffusers(peft_sd)
        return {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in diffusers_sd.items()}

    def save_lora(self, path: str | Path) -> Path:
        """Write the LoRA as a diffusers-format safetensors file (a folder gets pytorch_lora_weights.safetensors)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / LORA_WEIGHT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        unet = _unwrap(self.unet)
        state = {k.removeprefix("unet."): v for k, v in self.lora_state_dict().items()}
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(path.parent),
            unet_lora_layers=state,
            weight_name=path.name,
            # Carries rank and alpha, so plain diffusers rebuilds the same scale alpha / rank.
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        )
        return path

    def load_lora_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy diffusers-format (or peft-format) UNet LoRA weights into the adapter; keys must match exactly."""
        unet = _unwrap(self.unet)
        others = sorted(k for k in state if not k.startswith("unet."))
        if others:
            raise UserError(
                f"LoRA {source} has {len(others)} keys outside the UNet (e.g. {others[0]!r}); only UNet LoRA "
                "(keys starting with 'unet.') is supported"
            )
        given = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
        expected = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
        unexpected = sorted(set(given) - set(expected))
        missing = sorted(set(expected) - set(given))
        if unexpected or missing:
            raise UserError(
                f"LoRA {source} does not match this UNet and model.lora.target_modules: "
                f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3]) or '-'}), "
                f"{len(missing)} missing keys (first: {', '.join(missing[:3]) or '-'}); load it into the base "
                "model it was trained on, with the same target modules"
            )
        for key, value in given.items():
            if value.shape != expected[key].shape:
                raise UserError(
                    f"LoRA {source}: {key} has shape {tuple(value.shape)} but this model's adapter has "
                    f"{tuple(expected[key].shape)}; set model.lora.rank to the file's rank"
                )
        result = set_peft_model_state_dict(unet, given, adapter_name=ADAPTER)
        leftover = [k for k in result.unexpected_keys if "lora_" in k]
        if leftover:  # defensive: the key check above should make this impossible
            raise UserError(f"LoRA {source}: keys not taken by the UNet: {', '.join(leftover[:3])}")

    def load_lora(self, path: str | Path) -> None:
        """Load a diffusers-format LoRA safetensors file (or a folder holding pytorch_lora_weights.safetensors)."""
        path = Path(path)
        if path.is_dir():
            path = path / LORA_WEIGHT_NAME
        if not path.is_file():
            raise UserError(f"LoRA file '{path}' not found; pass a .safetensors file written by save_lora")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            raise UserError(f"LoRA file '{path}' is not a readable safetensors file: {exc}") from exc
        self._check_lora_scale(metadata, path)
        self.load_lora_state_dict(state, source=f"file '{path}'")

    def _check_lora_scale(self, metadata: dict[str, str], path: Path) -> None:
        """Refuse a file whose stored rank/alpha would give another LoRA scale than this model's."""
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return
        stored = json.loads(raw)
        ours = _unwrap(self.unet).peft_config[ADAPTER]
        r, alpha = stored.get("unet.r"), stored.get("unet.lora_alpha")
        if (r is not None and r != ours.r) or (alpha is not None and alpha != ours.lora_alpha):
            raise UserError(
                f"LoRA file '{path}' was trained with rank {r}, alpha {alpha}; this model has rank {ours.r}, "
                f"alpha {ours.lora_alpha}; set model.lora.rank={r} model.lora.alpha={alpha}"
            )

    # ----- devices, precision, modes ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the UNet weights."""
        return next(_unwrap(self.unet).parameters()).device

    def to(self, device: str | torch.device) -> DiffusionModel:
        """Move to ``device``; on GPU with mixed precision the frozen UNet/text weights become half precision."""
        device = torch.device(device)
        for module in (self.vae, self.text_encoder, _unwrap(self.unet)):
            module.to(device)
        dtype = _DTYPES.get(self.mixed_precision)
        if device.type == "cuda" and dtype is not None:
            # Half-precision frozen weights halve memory; LoRA weights stay float32 for the optimizer.
            # The VAE stays float32: SD VAEs overflow in fp16.
            for module in (self.text_encoder, _unwrap(self.unet)):
                module.to(dtype)
            for param in self.trainable_parameters():
                param.data = param.data.float()
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast in bf16/fp16 on GPU per ``model.mixed_precision``; a no-op on CPU or with 'no'."""
        dtype = _DTYPES.get(self.mixed_precision)
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet and VAE activations in the backward pass (less memory, about 30 % more compute)."""
        for module in (_unwrap(self.unet), self.vae):
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether UNet activations are recomputed in the backward pass."""
        return bool(_unwrap(self.unet).is_gradient_checkpointing)

    def train(self, mode: bool = True) -> DiffusionModel:
        """Train mode for the UNet (LoRA dropout); the frozen VAE and text encoder always stay in eval mode."""
        self.unet.train(mode)
        return self

    def eval(self) -> DiffusionModel:
        """Eval mode for every component."""
        return self.train(False)

    # ----- encoders, decoder, denoiser --------------------------------------------------------------------

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion, 4 for the tiny world)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent (4 for Stable Diffusion)."""
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) for B prompts, padded/truncated to the tokenizer's model_max_length."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with self.autocast():
            hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return hidden.float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (B, C, H/s, W/s), scaled by vae.config.scaling_factor, of images (B, 3, H, W) in [-1, 1]."""
        images = images.to(self.device, torch.float32)
        with self.autocast():
            posterior = self.vae.encode(images).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        noise = _randn(mean.shape, generator, self.device)
        return (mean + std * noise) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from scaled latents (B, C, h, w); differentiable in the latents."""
        with self.autocast():
            images = decode(self.vae, latents)
        return images.float()

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """UNet output (B, C, h, w) in float32: noise, velocity or sample per scheduler.config.prediction_type."""
        with self.autocast():
            out = self.unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
        return out.float()

    def diffusion_loss(
        self,
        images: torch.Tensor,
        prompts: list[str],
        generator: torch.Generator | None = None,
        cond_dropout: float = 0.0,
    ) -> torch.Tensor:
        """Mean squared error of the UNet's prediction (epsilon or v) on noised latents of images (B, 3, H, W).

        ``cond_dropout`` replaces that share of prompts by "" so that classifier-free guidance has an
        unconditional model to contrast with.
        """
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        latents = self.encode_images(images, generator)
        batch = latents.shape[0]
        noise = _randn(latents.shape, generator, self.device)
        num_steps = self.scheduler.config.num_train_timesteps
        gen_device = generator.device if generator is not None else self.device
        timesteps = torch.randint(0, num_steps, (batch,), generator=generator, device=gen_device).to(self.device)
        if cond_dropout > 0:
            drop = torch.rand(batch, generator=generator, device=gen_device) < cond_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        pred = self.predict(noisy, timesteps, self.encode_prompts(prompts))
        return F.mse_loss(pred, target.float())


def _randn(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible across devices), moved to device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


# ----- the tiny pipeline ------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2/CLIP) uses for the bytes 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer(max_length: int = 128) -> CLIPTokenizer:
    """A CLIPTokenizer with a byte-level character vocabulary (514 tokens, no merges): every text maps."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = _byte_alphabet()
    for suffix in ("", "</w>"):  # CLIP's BPE marks the last character of a word with </w>
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_components(
    *,
    sample_size: int = 16,
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    text_layers: int = 2,
    max_text_length: int = 128,
    vae_channels: tuple[int, ...] = (16, 32, 32),
    prediction_type: str = "epsilon",
    scaling_factor: float = 0.18215,
    tokenizer: CLIPTokenizer | None = None,
) -> dict[str, Any]:
    """Randomly initialised tiny SD components (VAE factor 2**(len(vae_channels)-1); latents sample_size²×4).

    ``tokenizer`` defaults to a character-level one; the text encoder's vocabulary and length follow it.
    ``attention_head_dim`` is diffusers' legacy name for the UNet's number of attention heads.
    """
    tokenizer = tokenizer or tiny_tokenizer(max_text_length)
    max_text_length = tokenizer.model_max_length
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=sample_size * 2 ** (len(vae_channels) - 1),
            scaling_factor=scaling_factor,
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(block_out_channels) - 1),
            up_block_types=("UpBlock2D",) * (len(block_out_channels) - 1) + ("CrossAttnUpBlock2D",),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=2 * cross_attention_dim,
                num_hidden_layers=text_layers,
                num_attention_heads=4,
                max_position_embeddings=max_text_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # Stable Diffusion's training schedule, so that DDIM sampling code behaves as with the real models.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_pipeline(components: dict[str, Any], out_dir: str | Path) -> Path:
    """Write components as a diffusers StableDiffusionPipeline folder (safetensors, no safety checker)."""
    out_dir = Path(out_dir)
    pipe = StableDiffusionPipeline(
        unet=_unwrap(components["unet"]),
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_bpe_files(components["tokenizer"], out_dir / "tokenizer")
    return out_dir


def _write_bpe_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Also write vocab.json + merges.txt, which the slow CLIPTokenizer of transformers 4.x reads."""
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(line + "\n" for line in lines))


def make_tiny_pipeline(out_dir: str | Path, *, sample_size: int = 16, seed: int = 0, **kwargs: Any) -> Path:
    """Build a tiny random SD pipeline (64 px images -> 16×16×4 latents by default) and save it to out_dir."""
    return save_pipeline(tiny_components(sample_size=sample_size, seed=seed, **kwargs), out_dir)

