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


def test_soft_clip_loss_treats_equal_captions_as_positives() -> None:
    # Two images with the same caption, embedded exactly at that caption, are already optimal:
    # the soft targets put half the mass on each, so the loss has (almost) no gradient.
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    img = emb.clone().requires_grad_(True)
    bootstrap._soft_clip_loss(img, emb, ["a", "a", "b"], torch.tensor(10.0)).backward()
    assert img.grad.abs().max() < 1e-3


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


def test_bad_arguments_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "craft_ray.bootstrap", "--parts", "vae"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) ['vae'] in --parts; known: diffusion" in proc.stderr
