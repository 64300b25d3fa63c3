"""The tiny-world bootstrap: its pieces on small inputs, and a scaled-down end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from craft_ray import bootstrap
from craft_ray.data.phantom import generate
from craft_ray.data.phantom.truth import answers
from craft_ray.knowledge import load_shipped
from craft_ray.modalities import DISTRACTORS, MODALITY_NAMES


def test_distractor_images_cover_every_distractor() -> None:
    images, captions = bootstrap.distractor_images(8, 64, torch.Generator().manual_seed(0))
    assert images.shape == (8, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert set(captions) == set(DISTRACTORS)


def test_caption_pool_holds_only_true_statements() -> None:
    kn = load_shipped("cxr", "phantom")
    batch = generate("cxr", 4, seed=3)
    for label, meta in zip(batch.labels, batch.meta, strict=True):
        prompts, statements = bootstrap.caption_pools("cxr", label, meta, kn)
        pool = prompts + statements
        truth = answers(kn, label, meta)
        for lab in kn.labels():
            for item in kn.checklist(lab):
                expected, wrong = (item.present, item.absent) if truth[(lab, item.id)] else (item.absent, item.present)
                assert expected in pool and (wrong not in pool or wrong == expected)


def test_judge_pairs_are_balanced_and_correct() -> None:
    kn = {m: load_shipped(m, "phantom") for m in MODALITY_NAMES}
    batch = generate("fundus", 9, seed=1)
    idx, questions, truth = bootstrap.judge_pairs(batch.images, ["fundus"] * 9, batch.labels, batch.meta, kn, 4, 0)
    assert len(idx) == len(questions) == len(truth) == 36
    assert sum(truth) == 18  # alternate yes / no answers per image
    by_question = {it.question: (lab, it.id) for lab in kn["fundus"].labels() for it in kn["fundus"].checklist(lab)}
    for i, q, t in zip(idx, questions, truth, strict=True):
        assert answers(kn["fundus"], batch.labels[i], batch.meta[i])[by_question[q]] == t


def test_auroc_by_hand() -> None:
    assert bootstrap.auroc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert bootstrap.auroc([0.9, 0.2, 0.3, 0.1], [True, True, False, False]) == 0.75
    assert bootstrap.auroc([0.5, 0.5], [True, False]) == 0.5


def test_soft_clip_loss_treats_every_true_caption_as_positive() -> None:
    # Images 0 and 1 share a label described in two wordings ("a", "a2"): both captions are true of both
    # images, so both images get the same pull. Counting only the drawn pair as positive would pull image 0
    # towards "a" and image 1 towards "a2", apart from each other.
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]), dim=-1)
    captions = ["a", "a2", "b"]

    def grads(truths: list[set[str]]) -> torch.Tensor:
        img = torch.nn.functional.normalize(torch.tensor([[0.8, 0.4], [0.8, 0.4], [-1.0, 0.0]]), dim=-1)
        img.requires_grad_(True)
        bootstrap._soft_clip_loss(img, txt, truths, captions, torch.tensor(10.0)).backward()
        return img.grad

    multi = grads([{"a", "a2"}, {"a", "a2"}, {"b"}])
    assert torch.allclose(multi[0], multi[1], atol=1e-6)
    single = grads([{"a"}, {"a2"}, {"b"}])
    assert (single[0] - single[1]).norm() > 0.5


def test_bpe_tokenizer_survives_a_saved_pipeline(tmp_path: Path) -> None:
    from craft_ray.models.diffusion import load_components, save_pipeline, tiny_components

    comp = tiny_components(sample_size=8, tokenizer=bootstrap.bpe_tokenizer(512, max_length=32))
    assert comp["text_encoder"].config.vocab_size == len(comp["tokenizer"]) == 512 + 514
    assert comp["text_encoder"].config.max_position_embeddings == 32
    save_pipeline(comp, tmp_path / "pipe")
    merges = (tmp_path / "pipe" / "tokenizer" / "merges.txt").read_text().splitlines()
    assert len(merges) == 1 + 512  # header + every merge, as the slow tokenizer of transformers 4.x reads
    loaded = load_components(tmp_path / "pipe")["tokenizer"]
    text = "a chest x-ray showing cardiomegaly"
    assert loaded.tokenize(text) == comp["tokenizer"].tokenize(text)
    assert len(loaded.tokenize(text)) < len(text.replace(" ", ""))  # merged into sub-words, not characters


def test_base_captions_carry_no_label_information() -> None:
    from craft_ray.modalities import MODALITIES

    for m in MODALITY_NAMES:
        captions = bootstrap.base_captions(m)
        assert MODALITIES[m].caption in captions
        # every label appears equally often, so a caption drawn for an image says nothing about its label
        counts = [sum(p in captions for p in MODALITIES[m].prompts(lab)) for lab in MODALITIES[m].label_names()]
        assert len(set(counts)) == 1 and counts[0] > 0


def test_text_encoder_pretraining_learns_to_tell_labels_apart() -> None:
    from craft_ray.modalities import MODALITIES
    from craft_ray.models.diffusion import tiny_components

    torch.manual_seed(0)
    comp = tiny_components(sample_size=8, tokenizer=bootstrap.bpe_tokenizer(2048, max_length=24))
    kn = load_shipped("cxr", "phantom")
    batch = generate("cxr", 64, seed=0)
    # a latent that encodes the label directly: the encoder only has to learn the text side
    labels = MODALITIES["cxr"].label_names()
    latents = torch.zeros(64, 4, 4, 4)
    for i, y in enumerate(batch.labels):
        latents[i, labels.index(y)] = 1.0
    corpus = bootstrap.Corpus(bootstrap.to_tensor(batch.images), ["cxr"] * 64, batch.labels, batch.meta)
    captions = bootstrap.Captions.of(corpus, {"cxr": kn})
    prompts = [MODALITIES["cxr"].prompts(lab)[0] for lab in labels]

    def worst_pair_cosine() -> float:
        with torch.no_grad():
            ids = comp["tokenizer"](prompts, padding="max_length", max_length=24, return_tensors="pt").input_ids
            e = torch.nn.functional.normalize(comp["text_encoder"](ids).pooler_output, dim=-1)
        return float((e @ e.T - torch.eye(len(labels)) * 2).max())

    before = worst_pair_cosine()
    out = bootstrap.pretrain_text_encoder(comp["tokenizer"], comp["text_encoder"], latents, captions, steps=150,
                                          batch=32, seed=0, prompt_share=1.0)
    assert np.isfinite(out["final_loss_ema"])
    assert not any(p.requires_grad for p in comp["text_encoder"].parameters())  # frozen afterwards
    assert worst_pair_cosine() < min(before, 0.9)


@pytest.mark.slow
def test_scaled_down_bootstrap_writes_loadable_models(tmp_path: Path) -> None:
    out = tmp_path / "world"
    proc = subprocess.run(
        [sys.executable, "-m", "craft_ray.bootstrap", "--out", str(out), "--scale", "0.01"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    for part in bootstrap.PARTS:
        assert (out / part).is_dir() and report["size_mb"][part] > 0
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
    for m in MODALITY_NAMES:
        assert 0 <= report["evaluator_vit"]["zero_shot_label_accuracy"][m] <= 1
        assert 0 <= report["judge"]["yes_no_auroc"][m] <= 1
        assert 0 <= report["base_unet_oracle_modality_accuracy"][m] <= 1
    assert np.isfinite(report["vae"]["vae_recon_mae"])
    unet = json.loads((out / "diffusion" / "unet" / "config.json").read_text())
    assert unet["attention_head_dim"] == report["config"]["unet_heads"] == bootstrap.BootstrapConfig.unet_heads


def test_bad_arguments_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "craft_ray.bootstrap", "--parts", "vae"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) ['vae'] in --parts; known: diffusion" in proc.stderr
