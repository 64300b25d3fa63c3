"""``python -m craft_ray.bootstrap``: train the tiny models of the embedded default on the phantom world.

Writes, seeded and reproducibly, the models that ``profile=tiny`` loads, each in its real on-disk
format, through the same loading code that hub ids use:

- ``diffusion/``      a diffusers Stable Diffusion folder: tiny VAE (factor 4: 64 px -> 16x16x4
                      latents); a tiny CLIP text encoder on CLIP's BPE (cut to 8192 merges), pretrained
                      contrastively against VAE latents as a stand-in for the web-scale pretraining of
                      SD's encoder, so it tells label words apart; and a **base** UNet, trained with that
                      encoder frozen on modality-level captions only ("a chest x-ray", label words drawn
                      independently of the image), so pathology must come from adaptation, as with a
                      natural-image foundation model adapted to medicine;
- ``evaluator_vit/``  an open_clip ``local-dir:`` ViT evaluator (the training evaluator);
- ``evaluator_conv/`` an open_clip ``local-dir:`` ConvNeXt evaluator (the out-of-family one);
- ``judge/``          a transformers Llava-style judge VLM answering checklist questions yes/no;
- ``report.json``     what was measured on fresh held-out phantoms (see the README).

The evaluators learn from captions built from labels and knowledge-file statements, and the judge
from yes/no answers computed from the generator's ground-truth metadata (``truth`` expressions in
the phantom knowledge files). The phantom oracle is used only to *measure* the base UNet's samples.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from craft_ray.cli import Parser, add_common_flags, run
from craft_ray.config import PACKAGE_ROOT, EvaluatorConfig
from craft_ray.data.phantom import generate, oracle
from craft_ray.data.phantom.truth import answers
from craft_ray.errors import UserError
from craft_ray.knowledge import Knowledge, load_shipped
from craft_ray.modalities import DISTRACTORS, MODALITIES, MODALITY_NAMES

PARTS: tuple[str, ...] = ("diffusion", "evaluator_vit", "evaluator_conv", "judge")
# The shipped ConvNeXt has a wider stem than the tests' test_convnext (32 vs 24 channels): with the
# narrower one the 1-2 px dots of diabetic retinopathy stayed near 0.8 zero-shot accuracy.
TINY_WORLD_VISION: dict[str, dict] = {"convnet": {"timm_model_name": "test_convnext2"}}


@dataclass
class BootstrapConfig:
    """Sizes and budgets of the tiny world (defaults: about 20 minutes on 2 CPU cores)."""

    out: Path  # output folder (the shipped one is craft_ray/tiny_world)
    seed: int = 0  # every random choice derives from it
    size: int = 64  # image side in pixels
    n_per_modality: int = 1200  # phantom training images per modality
    n_eval: int = 240  # fresh held-out phantoms per modality for the report
    vae_steps: int = 600  # VAE optimizer steps
    text_steps: int = 1000  # contrastive steps of the diffusion text encoder
    unet_steps: int = 2000  # base UNet optimizer steps (text encoder frozen); 1,000 left cxr samples unrealistic
    unet_heads: int = 2  # attention heads of the UNet (head dim 16): CPU attention with 8 heads of 4 was half a step
    evaluator_steps: int = 2500  # contrastive steps per evaluator
    judge_steps: int = 1500  # judge optimizer steps
    judge_lr: float = 1.5e-3  # judge peak learning rate (3e-3 left derm and histo near AUROC 0.74)
    batch: int = 32  # images per step (VAE, UNet, judge)
    evaluator_batch: int = 96  # images per contrastive step
    threads: int = 2  # torch intra-op threads


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Phantom images of all modalities with labels and metadata."""

    pixels: torch.Tensor  # float [N, 3, H, W] in [-1, 1]
    modality: list[str]
    label: list[str]
    meta: list[dict]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float [N,3,H,W] in [-1, 1] -> uint8 images [N,H,W,3]."""
    return ((pixels.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def embed_prompts(tokenizer, text_encoder, texts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings [B,L,D], padded to the tokenizer's length (as DiffusionModel.encode_prompts)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def phantom_corpus(n_per_modality: int, size: int, seed: int) -> Corpus:
    """Generate ``n_per_modality`` phantoms of each modality (seeded; labels balanced)."""
    images, mods, labels, metas = [], [], [], []
    for j, m in enumerate(MODALITY_NAMES):
        batch = generate(m, n_per_modality, size=size, seed=seed * 100 + j)
        images.append(batch.images)
        mods += [m] * n_per_modality
        labels += batch.labels
        metas += batch.meta
    pixels = to_tensor(np.concatenate(images))
    return Corpus(pixels, mods, labels, metas)


def distractor_images(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Images for the CAS modality distractors: natural-photo-like scenes, blank images, noise, diagrams."""
    out, captions = [], []
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    for i in range(n):
        kind = DISTRACTORS[i % len(DISTRACTORS)]
        r = torch.rand(8, generator=generator)
        if kind == "a natural photograph":  # sky-to-ground gradient with a few soft coloured blobs
            sky = torch.stack([0.2 + 0.3 * r[0], 0.5 + 0.3 * r[1], 0.9 * torch.ones(())])[:, None, None]
            ground = torch.stack([0.2 + 0.4 * r[2], 0.5 * r[3] + 0.3, 0.1 * torch.ones(())])[:, None, None]
            horizon = (yy > (r[4] - 0.5) * 0.6).float()
            img = sky * (1 - horizon) + ground * horizon
            for _ in range(3):
                c = torch.rand(5, generator=generator)
                blob = torch.exp(-(((xx - (c[0] * 2 - 1)) ** 2 + (yy - (c[1] * 2 - 1)) ** 2) / (0.02 + 0.1 * c[2])))
                img = img * (1 - blob) + c[2:5, None, None] * blob
            img = img + 0.05 * torch.randn(img.shape, generator=generator)
        elif kind == "a blank image":
            img = torch.ones(3, size, size) * r[:3, None, None]
        elif kind == "random noise":
            img = torch.rand(3, size, size, generator=generator)
        else:  # a diagram: dark lines and boxes on white
            img = torch.ones(3, size, size)
            for _ in range(4):
                c = (torch.rand(4, generator=generator) * (size - 8)).long()
                x0, y0, w, h = int(c[0]), int(c[1]), 4 + int(c[2]) // 3, 4 + int(c[3]) // 3
                img[:, y0:y0 + h, x0:x0 + 1] = 0.1
                img[:, y0:y0 + h, min(x0 + w, size - 1)] = 0.1
                img[:, y0, x0:x0 + w] = 0.1
                img[:, min(y0 + h, size - 1), x0:x0 + w] = 0.1
        out.append(img.clamp(0, 1) * 2 - 1)
        captions.append(kind)
    return torch.stack(out), captions


# ---------------------------------------------------------------------------------------------------------
# Diffusion: VAE, then base UNet + text encoder
# ---------------------------------------------------------------------------------------------------------


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 50) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr


def train_vae(vae, pixels: torch.Tensor, *, steps: int, batch: int, seed: int, lr: float = 2e-3) -> dict:
    """Reconstruction (L1 + MSE) plus a small KL term; then sets scaling_factor to 1/std of the latents."""
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae", file=sys.stdout, mininterval=5)
    for step in bar:
        _cosine_lr(opt, lr, step, steps)
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        rec = vae.decode(mean[:256]).sample
    std = float(mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"vae_recon_mae": float((rec - pixels[:256]).abs().mean()), "latent_std": std}


def latent_stats(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and std of the VAE latents of ``pixels`` (computed once, sampled per step)."""
    with torch.no_grad():
        post = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, len(pixels), 256)]
        mean = torch.cat([p.mean for p in post]) * vae.config.scaling_factor
        std = torch.cat([p.std for p in post]) * vae.config.scaling_factor
    return mean, std


def bpe_tokenizer(merges: int = 8192, max_length: int = 77):
    """A CLIPTokenizer on CLIP's BPE cut to its first ``merges`` merges (the evaluators use the same cut)."""
    import tempfile

    from transformers import CLIPTokenizer

    from craft_ray.models.evaluators import write_clip_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_bpe_tokenizer(tmp, merges)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def pretrain_text_encoder(tokenizer, text_encoder, latents: torch.Tensor, captions: Captions, *, steps: int,
                          batch: int, seed: int, lr: float = 2e-3, prompt_share: float = 0.5) -> dict:
    """CLIP-style contrastive pretraining of the diffusion text encoder against a small latent-image encoder.

    This stands in for the web-scale CLIP pretraining of Stable Diffusion's text encoder: afterwards the
    encoder maps label words and statements to distinct, image-grounded features, while the base UNet,
    trained next with a frozen encoder and modality-level captions, never learns what they look like.
    ``captions`` holds the true captions of each latent's image; each step draws a prompt for
    ``prompt_share`` of the images and a statement for the rest. The image side is discarded.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    width = text_encoder.config.hidden_size
    c = latents.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_encoder = torch.nn.Sequential(
            torch.nn.Conv2d(c, 64, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(64, 96, 4, 2, 1), torch.nn.GELU(),
            torch.nn.Conv2d(96, 128, 4, 2, 1), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(128, 64))
        projection = torch.nn.Linear(width, 64, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    text_encoder.train().requires_grad_(True)
    params = [*text_encoder.parameters(), *image_encoder.parameters(), *projection.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    bar = tqdm(range(steps), desc="text encoder", file=sys.stdout, mininterval=5)
    ema = None
    for step in bar:
        _cosine_lr(opt, lr, step, steps)
        idx = torch.randint(0, len(latents), (batch,), generator=gen).tolist()
        texts = captions.draw(idx, rng, prompt_share)
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        txt = F.normalize(projection(text_encoder(ids).pooler_output), dim=-1)
        img = F.normalize(image_encoder(latents[idx]), dim=-1)
        truths = [captions.truths[i] for i in idx]
        loss = _soft_clip_loss(img, txt, truths, texts, log_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    text_encoder.eval().requires_grad_(False)
    return {"final_loss_ema": ema}


def base_captions(m: str) -> list[str]:
    """Modality-level captions of the base UNet: the modality's caption and description, and its label
    templates each filled with a label drawn independently of the image. The UNet so meets the words of
    the prompts it will be adapted on, but they carry no information about the image: it learns no pathology.
    """
    mod = MODALITIES[m]
    return [mod.caption, mod.description] + [p for lab in mod.label_names() for p in mod.prompts(lab)]


def train_base_unet(components: dict, latents: tuple[torch.Tensor, torch.Tensor], modality: Sequence[str], *,
                    steps: int, batch: int, seed: int, lr: float = 1e-3, cond_dropout: float = 0.1,
                    min_snr_gamma: float | None = 5.0) -> dict:
    """Noise-prediction training of the UNet (text encoder frozen) on modality-level captions only.

    ``min_snr_gamma`` weights each timestep's loss by min(SNR, gamma) / SNR (Hang et al., 2023, who report
    faster convergence; not ablated here); None trains with the plain loss.
    """
    unet, text_encoder = components["unet"], components["text_encoder"]
    tokenizer, scheduler = components["tokenizer"], components["scheduler"]
    gen = torch.Generator().manual_seed(seed)
    mean, std = latents
    texts: list[str] = []
    rows_of: dict[str, list[int]] = {}  # modality -> its captions' rows in ``texts``
    for m in sorted(set(modality)):
        rows_of[m] = list(range(len(texts), len(texts) + len(base_captions(m))))
        texts += base_captions(m)
    texts.append("")  # the unconditional row, last
    with torch.no_grad():  # the frozen encoder's embeddings of every caption, computed once
        table = torch.cat([embed_prompts(tokenizer, text_encoder, texts[i:i + 64]) for i in range(0, len(texts), 64)])
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    ema = None
    bar = tqdm(range(steps), desc="base unet", file=sys.stdout, mininterval=5)
    for step in bar:
        _cosine_lr(opt, lr, step, steps)
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        latent = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(latent.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pick = torch.randint(0, 1 << 30, (batch,), generator=gen).tolist()
        rows = [rows_of[modality[i]][p % len(rows_of[modality[i]])] for i, p in zip(idx.tolist(), pick, strict=True)]
        drop = torch.rand(batch, generator=gen) < cond_dropout
        cond = table[torch.where(drop, len(texts) - 1, torch.tensor(rows))]
        pred = unet(scheduler.add_noise(latent, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma is not None:
            loss = loss * snr[t].clamp(max=min_snr_gamma) / snr[t]
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
    unet.eval().requires_grad_(False)
    return {"unet_final_loss_ema": ema, "captions": len(texts) - 1}


def base_modality_accuracy(folder: Path, n_per_modality: int, seed: int, steps: int = 20, guidance: float = 7.5
                           ) -> dict:
    """Share of the base UNet's samples that the phantom oracle assigns to the prompted modality."""
    from craft_ray import sampling
    from craft_ray.models.diffusion import load_components

    comp = load_components(str(folder))
    unet, vae = comp["unet"], comp["vae"]

    def embed(texts: list[str]) -> torch.Tensor:
        return embed_prompts(comp["tokenizer"], comp["text_encoder"], texts)

    out = {}
    gen = torch.Generator().manual_seed(seed)
    for m in MODALITY_NAMES:
        with torch.no_grad():
            cond = embed([MODALITIES[m].caption] * n_per_modality)
            uncond = embed([""] * n_per_modality)
            shape = (n_per_modality, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            lat = sampling.sample(unet, comp["scheduler"], cond, uncond, torch.randn(shape, generator=gen),
                                  num_steps=steps, guidance_scale=guidance, k=0).latents
            images = sampling.decode(vae, lat)
        arr = to_uint8(images)
        out[m] = float(np.mean([oracle.modality_of(a) == m for a in arr]))
    return out


# ---------------------------------------------------------------------------------------------------------
# Evaluators: contrastive training on captions from labels and knowledge statements
# ---------------------------------------------------------------------------------------------------------


def caption_pools(m: str, label: str, meta: dict, knowledge: Knowledge) -> tuple[list[str], list[str]]:
    """True captions for one phantom image: (label prompts + enriched prompts, item statements + modality)."""
    mod = MODALITIES[m]
    prompts = list(mod.prompts(label)) + list(knowledge.prompts(label))
    statements = [mod.description]
    truth = answers(knowledge, label, meta)
    for lab in knowledge.labels():
        for item in knowledge.checklist(lab):
            statements.append(item.present if truth[(lab, item.id)] else item.absent)
    return prompts, statements


@dataclass
class Captions:
    """Every image's true captions: (prompts, statements) pools, and their union for the loss's positives."""

    pools: list[tuple[list[str], list[str]]]
    truths: list[frozenset[str]]

    @classmethod
    def of(cls, corpus: Corpus, knowledge: dict[str, Knowledge]) -> Captions:
        pools = [caption_pools(m, y, meta, knowledge[m])
                 for m, y, meta in zip(corpus.modality, corpus.label, corpus.meta, strict=True)]
        return cls(pools, [frozenset(prompts) | frozenset(statements) for prompts, statements in pools])

    def draw(self, idx: Sequence[int], rng: np.random.Generator, prompt_share: float) -> list[str]:
        """One caption per image: a label prompt with probability ``prompt_share``, else a statement."""
        chosen = [self.pools[i][0] if rng.random() < prompt_share else self.pools[i][1] for i in idx]
        return [pool[rng.integers(len(pool))] for pool in chosen]


def _soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, truths: Sequence[set[str] | frozenset[str]],
                    captions: Sequence[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with every caption in the batch that is true of an image as a positive.

    ``captions[i]`` was drawn for image i from ``truths[i]``, its true captions. Counting only the drawn
    pair as positive would push apart two images with the same label described in other words.
    """
    positive = torch.tensor([[c in truth for c in captions] for truth in truths], dtype=img.dtype)
    logits = scale * img @ txt.T
    image_to_text = -((positive / positive.sum(1, keepdim=True)) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -((positive / positive.sum(0, keepdim=True)) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


def train_evaluator(evaluator, corpus: Corpus, captions: Captions, *, steps: int, batch: int, seed: int,
                    lr: float = 2e-3, prompt_share: float = 0.5) -> dict:
    """Contrastive training of an open_clip evaluator on phantom images + distractor images."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    evaluator.set_trainable(True)
    model = evaluator.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    n_distract = max(batch // 12, len(DISTRACTORS))
    bar = tqdm(range(steps), desc=f"evaluator {evaluator.family}", file=sys.stdout, mininterval=5)
    ema = None
    for step in bar:
        _cosine_lr(opt, lr, step, steps)
        idx = torch.randint(0, len(corpus.pixels), (batch - n_distract,), generator=gen).tolist()
        d_img, d_cap = distractor_images(n_distract, corpus.pixels.shape[-1], gen)
        x = torch.cat([corpus.pixels[idx], d_img])
        # light augmentation: flips keep every phantom label (features are left/right symmetric in meaning)
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        # Half label prompts (what the CAS label dimension asks), half checklist statements.
        texts = captions.draw(idx, rng, prompt_share) + d_cap
        img = evaluator.encode_images(x)
        txt = evaluator.encode_texts(texts)
        truths = [captions.truths[i] for i in idx] + [{c} for c in d_cap]
        loss = _soft_clip_loss(img, txt, truths, texts, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    evaluator.set_trainable(False)
    return {"final_loss_ema": ema}


def zero_shot_accuracy(evaluator, knowledge: dict[str, Knowledge], n: int, seed: int) -> dict[str, float]:
    """Per modality: argmax over labels of the CAS label-ensemble similarity, on fresh phantoms."""
    from craft_ray.cas import build_texts

    acc = {}
    for j, m in enumerate(MODALITY_NAMES):
        batch = generate(m, n, seed=seed + j)
        x = to_tensor(batch.images)
        texts = build_texts(evaluator, knowledge[m], m)
        with torch.no_grad():
            emb = torch.cat([evaluator.encode_images(x[i:i + 128]) for i in range(0, n, 128)])
        pred = (emb @ texts.label_texts.T).argmax(1).tolist()
        acc[m] = float(np.mean([texts.labels[p] == y for p, y in zip(pred, batch.labels, strict=True)]))
    return acc


# ---------------------------------------------------------------------------------------------------------
# Judge: yes/no checklist answers from ground-truth metadata
# ---------------------------------------------------------------------------------------------------------


def judge_pairs(corpus_images: np.ndarray, modality: Sequence[str], label: Sequence[str], meta: Sequence[dict],
                knowledge: dict[str, Knowledge], per_image: int, seed: int
                ) -> tuple[list[int], list[str], list[bool]]:
    """(image index, question, answer) triples: ``per_image`` items of the image's modality, balanced yes/no."""
    rng = np.random.default_rng(seed)
    idx, questions, labels = [], [], []
    for i, (m, y, md) in enumerate(zip(modality, label, meta, strict=True)):
        truth = answers(knowledge[m], y, md)
        items = {(lab, it.id): it.question for lab in knowledge[m].labels() for it in knowledge[m].checklist(lab)}
        yes = [k for k, v in truth.items() if v]
        no = [k for k, v in truth.items() if not v]
        for j in range(per_image):
            pool = yes if (j % 2 == 0 and yes) or not no else no
            key = pool[rng.integers(len(pool))]
            idx.append(i)
            questions.append(items[key])
            labels.append(truth[key])
    return idx, questions, labels


def _pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in images]


def train_judge(folder: Path, corpus: Corpus, knowledge: dict[str, Knowledge], *, steps: int, batch: int, seed: int,
                lr: float = 1.5e-3) -> dict:
    """Build the tiny Llava-style judge and train it on yes/no checklist answers; saves it to ``folder``."""
    from craft_ray.models.engines import TransformersEngine
    from craft_ray.models.tiny_judge import fit_yes_no, make_tiny_judge

    make_tiny_judge(folder, seed=seed)
    engine = TransformersEngine(str(folder), device="cpu", dtype="float32")
    arr = to_uint8(corpus.pixels)
    idx, questions, truth = judge_pairs(arr, corpus.modality, corpus.label, corpus.meta, knowledge, 6, seed)
    images = _pil(arr)
    losses = fit_yes_no(engine, [images[i] for i in idx], questions, truth, steps=steps, lr=lr, batch_size=batch,
                        seed=seed)
    engine.model.save_pretrained(folder, safe_serialization=True)
    return {"pairs": len(idx), "final_loss_mean_last_50": float(np.mean(losses[-50:]))}


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate_judge(folder: Path, knowledge: dict[str, Knowledge], n: int, seed: int) -> dict:
    """The judge's yes/no AUROC against ground truth, per modality, on fresh phantoms."""
    from craft_ray.models.engines import TransformersEngine

    engine = TransformersEngine(str(folder), device="cpu", dtype="float32")
    out = {}
    for j, m in enumerate(MODALITY_NAMES):
        batch = generate(m, n, seed=seed + j)
        idx, questions, truth = judge_pairs(batch.images, [m] * n, batch.labels, batch.meta, knowledge, 4, seed)
        images = _pil(batch.images)
        p = engine.p_yes([images[i] for i in idx], questions)
        out[m] = auroc(p, truth)
    return {"yes_no_auroc": out}


# ---------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------


def _timed(report: dict, name: str, fn: Callable[[], dict]) -> dict:
    t0 = time.perf_counter()
    out = fn()
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    return out


def train_parts(cfg: BootstrapConfig, parts: Sequence[str]) -> dict:
    """Train the requested parts into ``cfg.out``; returns their report sections."""
    from craft_ray.models.diffusion import save_pipeline, tiny_components
    from craft_ray.models.evaluators import load_evaluator, make_tiny_evaluator

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    knowledge = {m: load_shipped(m, "phantom") for m in MODALITY_NAMES}
    corpus = _timed(report, "data", lambda: phantom_corpus(cfg.n_per_modality, cfg.size, cfg.seed))
    captions = Captions.of(corpus, knowledge)

    if "diffusion" in parts:
        comp = tiny_components(sample_size=cfg.size // 4, seed=cfg.seed, tokenizer=bpe_tokenizer(),
                               attention_head_dim=cfg.unet_heads)
        report["vae"] = _timed(report, "vae", lambda: train_vae(comp["vae"], corpus.pixels, steps=cfg.vae_steps,
                                                                batch=cfg.batch, seed=cfg.seed))
        latents = latent_stats(comp["vae"], corpus.pixels)
        report["text_encoder"] = _timed(report, "text_encoder", lambda: pretrain_text_encoder(
            comp["tokenizer"], comp["text_encoder"], latents[0], captions, steps=cfg.text_steps,
            batch=cfg.evaluator_batch, seed=cfg.seed))
        report["unet"] = _timed(report, "unet", lambda: train_base_unet(
            comp, latents, corpus.modality, steps=cfg.unet_steps, batch=cfg.batch, seed=cfg.seed))
        save_pipeline(comp, cfg.out / "diffusion")
        report["base_unet_oracle_modality_accuracy"] = _timed(
            report, "unet_eval", lambda: base_modality_accuracy(cfg.out / "diffusion", 32, cfg.seed + 7))

    for family, part in (("vit", "evaluator_vit"), ("convnet", "evaluator_conv")):
        if part not in parts:
            continue
        folder = make_tiny_evaluator(cfg.out / part, family, image_size=cfg.size, bpe_merges=8192,
                                     context_length=48, seed=cfg.seed, vision=TINY_WORLD_VISION.get(family))
        ev = load_evaluator(EvaluatorConfig(model=f"local-dir:{folder}", family=family))
        report[part] = _timed(report, part, lambda ev=ev: train_evaluator(
            ev, corpus, captions, steps=cfg.evaluator_steps, batch=cfg.evaluator_batch, seed=cfg.seed))
        ev.save(folder)
        report[part]["zero_shot_label_accuracy"] = zero_shot_accuracy(
            load_evaluator(EvaluatorConfig(model=f"local-dir:{folder}", family=family)), knowledge, cfg.n_eval, 10_000 + cfg.seed)

    if "judge" in parts:
        report["judge"] = _timed(report, "judge", lambda: train_judge(
            cfg.out / "judge", corpus, knowledge, steps=cfg.judge_steps, batch=cfg.batch, seed=cfg.seed,
            lr=cfg.judge_lr))
        report["judge"].update(evaluate_judge(cfg.out / "judge", knowledge, cfg.n_eval // 2, 20_000 + cfg.seed))
    return report


def _train_group(cfg: BootstrapConfig, parts: list[str]) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
    return train_parts(cfg, parts)


def bootstrap(cfg: BootstrapConfig, parts: Sequence[str] = PARTS, jobs: int = 1) -> dict:
    """Train ``parts`` (in ``jobs`` processes: the diffusion model beside the others) and write report.json."""
    t0 = time.perf_counter()
    groups = [list(parts)]
    if jobs > 1 and "diffusion" in parts and len(parts) > 1:
        groups = [["diffusion"], [p for p in parts if p != "diffusion"]]
    if len(groups) == 1:
        sections = [train_parts(cfg, groups[0])]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from dataclasses import replace

        # One torch thread per process: two single-threaded trainings use 2 cores better than one with two.
        sub = replace(cfg, threads=1)
        with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
            sections = list(pool.map(_train_group, [sub] * len(groups), groups))
    report_path = cfg.out / "report.json"
    # A partial run (--parts) updates its sections of an existing report; a full run starts a new one.
    partial = set(parts) != set(PARTS) and report_path.is_file()
    report = json.loads(report_path.read_text()) if partial else {}
    for section in sections:
        seconds = {**report.get("seconds", {}), **section.pop("seconds", {})}
        report.update(section)
        report["seconds"] = seconds
    report["seconds"]["wall_total"] = round(time.perf_counter() - t0, 1)
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "out"}
    report["config"]["jobs"] = jobs
    sizes = {p: sum(f.stat().st_size for f in (cfg.out / p).rglob("*") if f.is_file())
             for p in PARTS if (cfg.out / p).is_dir()}
    report["size_mb"] = {p: round(s / 1e6, 2) for p, s in sizes.items()} | {"total": round(sum(sizes.values()) / 1e6, 2)}
    report_path.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str]) -> int:
    """Parse the CLI and run the bootstrap."""
    parser = Parser(prog="python -m craft_ray.bootstrap", description=__doc__.splitlines()[0],
                    epilog="the shipped tiny world lives in craft_ray/tiny_world; regenerate it with no arguments")
    parser.add_argument("--out", type=Path, default=PACKAGE_ROOT / "tiny_world", help="output folder")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (with --jobs 1)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="processes: 2 trains the diffusion model beside the evaluators and the judge")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every step count (e.g. 0.05 for a quick smoke run)")
    add_common_flags(parser)
    ns = parser.parse_args(argv)
    parts = [p.strip() for p in ns.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise UserError(f"unknown part(s) {unknown} in --parts; known: {', '.join(PARTS)}")
    if ns.scale <= 0:
        raise UserError(f"--scale must be positive, got {ns.scale}")
    cfg = BootstrapConfig(out=ns.out, seed=ns.seed, threads=ns.threads)
    for key in ("vae_steps", "text_steps", "unet_steps", "evaluator_steps", "judge_steps"):
        setattr(cfg, key, max(1, int(getattr(cfg, key) * ns.scale)))
    if ns.scale < 1:
        cfg.n_per_modality = max(60, int(cfg.n_per_modality * ns.scale))
        cfg.n_eval = max(24, int(cfg.n_eval * ns.scale))
    print(f"bootstrap: parts={parts} out={cfg.out} seed={cfg.seed} threads={cfg.threads}")
    report = bootstrap(cfg, parts, jobs=ns.jobs)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run(main, sys.argv[1:])
