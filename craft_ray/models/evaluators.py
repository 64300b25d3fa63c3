"""Evaluator VLMs: frozen open_clip models that embed images differentiably and prompts once.

An evaluator E = (image encoder f, text encoder g, scale s) scores images for the CAS dimensions
(DESIGN.md, "The Clinical Alignment Score"). Every evaluator loads through one code path,
:func:`load_evaluator`, whatever its source:

- ``local-dir:PATH``: a folder with ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and a
  weights file (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``); the tiny models of
  the embedded default are such folders (:func:`make_tiny_evaluator`, then trained by the bootstrap);
- ``hf-hub:ORG/NAME``: an open_clip model on the Hugging Face Hub (BiomedCLIP in the ``sd`` profile);
- an open_clip architecture name (``convnext_base_w``) plus ``pretrained`` (a tag or a weights file).

Image preprocessing is done on tensors (resize, crop, normalise), never through PIL, so that the
reward's gradient reaches the generated pixels.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from safetensors.torch import save_file
from torch import nn

from craft_ray.config import EvaluatorConfig, check_out_of_family  # noqa: F401 (re-exported)
from craft_ray.errors import UserError, one_of

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# open_clip picks the first weights file it finds in a local-dir folder with one of these suffixes.
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth")
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
LOCAL_DIR_LAYOUT = (
    f"a local-dir: evaluator is a folder holding {CONFIG_FILE} (keys model_cfg and preprocess_cfg) "
    f"and a weights file ({WEIGHTS_FILE} or open_clip_pytorch_model.bin)"
)

# Vision-tower class names (open_clip's own towers and timm trunks) -> architecture family.
_FAMILY_OF_CLASS: dict[str, str] = {
    "VisionTransformer": "vit",
    "Eva": "vit",
    "VisionTransformerDistilled": "vit",
    "ModifiedResNet": "convnet",
    "ResNet": "convnet",
    "ConvNeXt": "convnet",
    "EfficientNet": "convnet",
    "RegNet": "convnet",
}

# Tiny architectures for the embedded default: "vit" is open_clip's own ViT; "convnet" is timm's ConvNeXt
# test model (LayerNorm, no BatchNorm, so eval and train mode agree), a different architecture family.
_TINY_VISION: dict[str, dict[str, Any]] = {
    "vit": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "convnet": {"timm_model_name": "test_convnext", "timm_pool": "avg", "timm_proj": "linear"},
}
# 49408 is the vocabulary of open_clip's SimpleTokenizer (the full CLIP BPE); the token embedding
# (vocab x width) then dominates a tiny model's size. make_tiny_evaluator(bpe_merges=N) shrinks it.
_TINY_TEXT: dict[str, Any] = {"vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
# The CLIP BPE merges file: one header line, then merges in rank order (open_clip reads 48894 of them).
_CLIP_MERGES = 49152 - 256 - 2


def preprocess_images(
    images: torch.Tensor,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill: float = 0.0,
) -> torch.Tensor:
    """Differentiable open_clip preprocessing: [B,3|1,H,W] in [-1,1] -> [B,3,h,w] normalised.

    ``resize_mode`` follows open_clip: ``shortest`` (resize the short side, centre-crop), ``squash``
    (resize both sides), ``longest`` (resize the long side, centre-pad with ``fill`` in [0,1]).
    ``mean``/``std`` have 3 entries (per channel, in [0,1] pixel units).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B,3,H,W] or [B,1,H,W], got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    # No clamp: generated pixels slightly outside [-1,1] keep their gradient.
    x = (images + 1) / 2
    h, w = x.shape[-2:]
    th, tw = size
    if resize_mode == "squash":
        x = _resize(x, (th, tw), interpolation)
    elif resize_mode in ("shortest", "longest"):
        pick = max if resize_mode == "shortest" else min
        scale = pick(th / h, tw / w)
        x = _resize(x, (round(h * scale), round(w * scale)), interpolation)
        x = _center_crop_or_pad(x, (th, tw), fill)
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; known: shortest, longest, squash")
    mean = mean.to(device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = std.to(device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"unknown interpolation {interpolation!r}; known: bicubic, bilinear, nearest")
    # Antialiasing matches PIL's downscaling, which the evaluators saw in training.
    return F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)


def _center_crop_or_pad(x: torch.Tensor, size: tuple[int, int], fill: float) -> torch.Tensor:
    th, tw = size
    h, w = x.shape[-2:]
    if h < th or w < tw:
        top, left = max(th - h, 0) // 2, max(tw - w, 0) // 2
        x = F.pad(x, (left, max(tw - w, 0) - left, top, max(th - h, 0) - top), value=fill)
        h, w = x.shape[-2:]
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]


def infer_family(model: nn.Module) -> str | None:
    """Architecture family of an open_clip model's vision tower (``vit``, ``convnet``), None if unknown."""
    visual = getattr(model, "visual", None)
    tower = getattr(visual, "trunk", visual)  # open_clip's TimmModel wraps a timm trunk
    for cls in type(tower).__mro__:
        if cls.__name__ in _FAMILY_OF_CLASS:
            return _FAMILY_OF_CLASS[cls.__name__]
    return None


class Evaluator:
    """A frozen open_clip model: differentiable image embeddings, cached prompt embeddings, scale s.

    ``model`` and ``tokenizer`` are the underlying open_clip objects (for contrastive training by the
    bootstrap, together with :meth:`set_trainable` and :meth:`save`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        model_id: str,
        family: str,
        model_cfg: dict[str, Any],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.id = model_id
        self.family = family
        self.model_cfg = model_cfg  # open_clip model_cfg, written back by save()
        pp = dict(model.visual.preprocess_cfg)
        self.preprocess_cfg = pp
        size = pp["size"]
        self.image_size: tuple[int, int] = (
            (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )
        self.mean = torch.tensor(pp["mean"], dtype=torch.float32)
        self.std = torch.tensor(pp["std"], dtype=torch.float32)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.trainable = False
        self.set_trainable(False)

    def __repr__(self) -> str:
        return f"Evaluator(id={self.id!r}, family={self.family!r}, image_size={self.image_size})"

    def weights_digest(self) -> str:
        """SHA-256 (16 hex digits) of the model's weights: names, dtypes, shapes and values.

        Caches of evaluator outputs (realism banks, tail thresholds) are keyed by it as well as by
        :attr:`id`, because an id such as ``local-dir:PATH`` or a hub name can point at new weights
        (a regenerated tiny world, a moved hub revision). One pass over the weights (~1 s per GB).
        """
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            flat = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (logit_scale) cannot be viewed as bytes
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        return h.hexdigest()[:16]

    def identity(self) -> str:
        """``id@digest``: what a cached bank or threshold must have been built with to be reused."""
        return f"{self.id}@{self.weights_digest()}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> float:
        """The model's learned similarity scale s = exp(logit_scale) (about 100 for CLIP models)."""
        return float(self.model.logit_scale.detach().exp())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Evaluator:
        """Move the model (and drop cached prompt embeddings); returns self."""
        self.model.to(device=device, dtype=dtype)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        self._text_cache.clear()
        return self

    def set_trainable(self, trainable: bool) -> Evaluator:
        """Unfreeze (train mode, grads on) or freeze (eval mode, no parameter grads); returns self."""
        self.model.train(trainable)
        self.model.requires_grad_(trainable)
        self.trainable = trainable
        self._text_cache.clear()  # embeddings of a model being trained go stale
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3|1,H,W] in [-1,1] -> model input [B,3,h,w], differentiable."""
        pp = self.preprocess_cfg
        x = images.to(device=self.device, dtype=self.dtype)
        return preprocess_images(
            x,
            self.image_size,
            self.mean,
            self.std,
            resize_mode=pp.get("resize_mode", "shortest"),
            interpolation=pp.get("interpolation", "bicubic"),
            fill=pp.get("fill_color", 0) / 255.0,
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings f(x): [B,3|1,H,W] in [-1,1] -> [B,D], differentiable in pixels."""
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def encode_texts(self, prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
        """L2-normalised prompt embeddings g(t): N prompts -> [N,D].

        Frozen: computed once per prompt tuple without grad and cached (the same tensor is returned).
        Trainable: computed afresh, with grad.
        """
        key = tuple(prompts)
        if not key or not all(isinstance(p, str) for p in key):
            raise ValueError(f"expected a non-empty list of prompt strings, got {prompts!r}")
        if self.trainable:
            return self._encode_tokens(key)
        if key not in self._text_cache:
            with torch.no_grad():
                self._text_cache[key] = self._encode_tokens(key)
        return self._text_cache[key]

    def _encode_tokens(self, prompts: tuple[str, ...]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)

    def save(self, out_dir: str | Path) -> Path:
        """Write the model as a ``local-dir:`` folder (config JSON + safetensors weights); returns it."""
        return save_open_clip(self.model, self.model_cfg, out_dir, tokenizer=self.tokenizer)


def save_open_clip(
    model: nn.Module, model_cfg: dict[str, Any], out_dir: str | Path, tokenizer: Any = None
) -> Path:
    """Write an open_clip model as a ``local-dir:`` folder loadable by :func:`load_evaluator`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pp = dict(model.visual.preprocess_cfg)
    pp["size"] = list(pp["size"]) if isinstance(pp["size"], (tuple, list)) else pp["size"]
    pp["mean"], pp["std"] = list(pp["mean"]), list(pp["std"])
    config = {"model_cfg": model_cfg, "preprocess_cfg": pp}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    # An HF tokenizer named in the config is read from the folder itself by open_clip.get_tokenizer.
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    return out


def _check_local_dir(path: Path, model_id: str) -> None:
    if not path.is_dir():
        raise UserError(f"evaluator folder {str(path)!r} (from {model_id!r}) not found; {LOCAL_DIR_LAYOUT}")
    config = path / CONFIG_FILE
    if not config.is_file():
        present = sorted(p.name for p in path.iterdir())
        raise UserError(
            f"evaluator folder {str(path)!r} has no {CONFIG_FILE} (found: {', '.join(present) or 'nothing'}); "
            f"{LOCAL_DIR_LAYOUT}"
        )
    try:
        loaded = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{str(config)!r} is not valid JSON: {exc}; {LOCAL_DIR_LAYOUT}") from exc
    if not isinstance(loaded, dict) or "model_cfg" not in loaded:
        raise UserError(f"{str(config)!r} has no 'model_cfg' key; {LOCAL_DIR_LAYOUT}")
    if not any(p.suffix in WEIGHTS_SUFFIXES for p in path.iterdir()):
        raise UserError(f"evaluator folder {str(path)!r} has no weights file; {LOCAL_DIR_LAYOUT}")


def _check_named(name: str, pretrained: str | None) -> None:
    arch = name.replace("/", "-")  # open_clip's own cleaning of architecture names
    if arch not in open_clip.list_models():
        raise one_of(
            "open_clip architecture",
            name,
            open_clip.list_models(),
            "(use local-dir:PATH or hf-hub:ORG/NAME for other models)",
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained is None:
        raise UserError(
            f"evaluator {name!r} needs evaluator.pretrained: a weights file or one of the tags "
            f"{', '.join(tags) or '(none shipped)'}; a randomly initialised evaluator scores nothing"
        )
    if not open_clip.is_pretrained_cfg(arch, pretrained) and not os.path.isfile(pretrained):
        raise UserError(
            f"evaluator.pretrained {pretrained!r} is neither a weights file nor a tag of {name!r}; "
            f"known tags: {', '.join(tags) or '(none)'}"
        )


def _offline_hint(model_id: str, pretrained: str | None) -> str:
    if model_id.startswith(HF_HUB):
        repo = model_id[len(HF_HUB) :]
    else:
        tag_cfg = open_clip.get_pretrained_cfg(model_id.replace("/", "-"), pretrained or "")
        repo = tag_cfg.get("hf_hub", "").strip("/") or "<repo of the weights>"
    return (
        f"on machines without network download it beforehand (`hf download {repo}`, plus any HF text "
        "model its config names, e.g. BiomedCLIP's PubMedBERT; or load it once on a connected machine "
        "sharing HF_HOME) and set HF_HUB_OFFLINE=1"
    )


def _evaluator_id(model: str, pretrained: str | None) -> str:
    return f"{model}:{pretrained}" if pretrained and not model.startswith((LOCAL_DIR, HF_HUB)) else model


def load_evaluator(cfg: EvaluatorConfig | Any, device: torch.device | str = "cpu") -> Evaluator:
    """Load a frozen evaluator from ``cfg.model`` (local-dir:PATH | hf-hub:ORG/NAME | name + pretrained)."""
    model_id, pretrained, family = str(cfg.model), cfg.pretrained, str(cfg.family or "")
    if not family:
        raise UserError(f"evaluator {model_id!r} has no family; set evaluator.family (e.g. vit, convnet)")
    if model_id.startswith(LOCAL_DIR):
        path = Path(model_id[len(LOCAL_DIR) :]).expanduser()
        _check_local_dir(path, model_id)
        model_id = f"{LOCAL_DIR}{path}"
        pretrained = None  # open_clip ignores it for schema ids; say so by dropping it
    elif model_id.startswith(HF_HUB):
        pretrained = None
    else:
        _check_named(model_id, pretrained)
    try:
        model = open_clip.create_model(model_id, pretrained, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model_id)
        schema_id = model_id.startswith((LOCAL_DIR, HF_HUB))
        model_cfg = open_clip.get_model_config(model_id if schema_id else model_id.replace("/", "-"))
    except Exception as exc:  # hub, network, file and format errors all end here: say which model and why
        reason = " ".join(str(exc).split())
        hint = LOCAL_DIR_LAYOUT if model_id.startswith(LOCAL_DIR) else _offline_hint(model_id, pretrained)
        raise UserError(
            f"cannot load evaluator {_evaluator_id(model_id, pretrained)!r}: {reason}; {hint}"
        ) from exc
    inferred = infer_family(model)
    if inferred is not None and inferred != family:
        raise UserError(
            f"evaluator {model_id!r} is declared family {family!r} but its vision tower "
            f"({type(getattr(model.visual, 'trunk', model.visual)).__name__}) is a {inferred}; "
            f"set evaluator.family={inferred}"
        )
    return Evaluator(model, tokenizer, _evaluator_id(str(cfg.model), pretrained), family, model_cfg or {})


def write_clip_bpe_tokenizer(out_dir: str | Path, merges: int) -> int:
    """Write the CLIP BPE cut to its first ``merges`` merges as HF tokenizer files; returns the vocab size.

    The ids keep CLIP's layout (256 bytes, 256 word-final bytes, merges, start, end), so the end-of-text
    id is the largest, as open_clip's argmax pooling of the text tower expects.
    """
    if not 0 <= merges <= _CLIP_MERGES:
        raise UserError(
            f"bpe_merges={merges} out of range; choose 0..{_CLIP_MERGES} (None = the full CLIP BPE)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as f:
        kept = f.read().decode("utf-8").split("\n")[1 : merges + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [b + "</w>" for b in byte_symbols] + ["".join(m.split()) for m in kept]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(kept) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "do_lower_case": True,
        "pad_token": "<|endoftext|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, **special}, indent=2))
    return len(vocab)


def make_tiny_evaluator(
    out_dir: str | Path,
    family: str,
    *,
    image_size: int = 64,
    embed_dim: int = 64,
    context_length: int = 32,
    bpe_merges: int | None = None,
    seed: int = 0,
    vision: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny randomly initialised open_clip model of ``family`` (vit | convnet) as a local-dir folder.

    ``vision`` overrides entries of the family's tiny vision config (e.g. another timm model name).

    ``bpe_merges=None`` keeps the full CLIP vocabulary (open_clip's SimpleTokenizer, 49408 tokens); an
    integer N writes a CLIP BPE cut to its first N merges into the folder (vocab N + 514), which makes
    the token embedding, most of the folder's size, about 49408 / (N + 514) times smaller.
    """
    if family not in _TINY_VISION:
        raise one_of("tiny evaluator family", family, sorted(_TINY_VISION))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_cfg = {**_TINY_TEXT, "context_length": context_length}
    if bpe_merges is not None:
        text_cfg["vocab_size"] = write_clip_bpe_tokenizer(out, bpe_merges)
        # Any non-empty name: for local-dir models open_clip reads the tokenizer files from the folder.
        text_cfg["hf_tokenizer_name"] = f"clip-bpe-{bpe_merges}"
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, **_TINY_VISION[family], **(vision or {})},
        "text_cfg": text_cfg,
    }
    preprocess_cfg = {
        "size": image_size,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "squash",  # phantom images are square; squash never crops a lesion away
    }
    (out / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    for stale in out.iterdir():  # a stale weights file would shadow the new one in open_clip's lookup
        if stale.suffix in WEIGHTS_SUFFIXES:
            stale.unlink()
    # Build through open_clip's own local-dir code path so the saved model is exactly what loads back.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"{LOCAL_DIR}{out}", load_weights=False)
    return save_open_clip(model, model_cfg, out)
