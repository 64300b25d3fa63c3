"""Evaluator VLMs on tiny open_clip models: local-dir round trips, differentiable pixels, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from craft_ray.config import EvaluatorConfig
from craft_ray.errors import UserError
from craft_ray.models.evaluators import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Evaluator,
    check_out_of_family,
    load_evaluator,
    make_tiny_evaluator,
    preprocess_images,
)

FAMILIES = ("vit", "convnet")
PROMPTS = ["a chest x-ray showing cardiomegaly", "a chest x-ray showing no finding"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluators")
    return {fam: make_tiny_evaluator(root / fam, fam, seed=1) for fam in FAMILIES}


def load(path: Path, family: str) -> Evaluator:
    return load_evaluator(EvaluatorConfig(model=f"local-dir:{path}", family=family))


def images(n: int = 2, size: tuple[int, int] = (64, 64), seed: int = 0, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, *size, generator=g) * 2 - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_folder_layout_and_size(tiny_dirs: dict[str, Path], family: str) -> None:
    folder = tiny_dirs[family]
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["model_cfg"]["embed_dim"] == 64
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 49408  # open_clip's SimpleTokenizer works
    assert config["preprocess_cfg"]["size"] == [64, 64]
    if family == "convnet":
        assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "test_convnext"
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    assert 5 < size_mb < 15  # dominated by the 49408 x 64 token embedding (12.6 MB in float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_identity_family_scale(tiny_dirs: dict[str, Path], family: str) -> None:
    ev = load(tiny_dirs[family], family)
    assert ev.id == f"local-dir:{tiny_dirs[family]}" and ev.family == family
    assert ev.image_size == (64, 64)
    assert ev.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's initial scale
    assert not ev.model.training
    assert not any(p.requires_grad for p in ev.model.parameters())


def test_same_seed_same_weights_other_seed_other(tmp_path: Path) -> None:
    a = load(make_tiny_evaluator(tmp_path / "a", "vit", seed=3), "vit")
    b = load(make_tiny_evaluator(tmp_path / "b", "vit", seed=3), "vit")
    c = load(make_tiny_evaluator(tmp_path / "c", "vit", seed=4), "vit")
    x = images()
    assert torch.equal(a.encode_images(x), b.encode_images(x))
    assert not torch.allclose(a.encode_images(x), c.encode_images(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_round_trip_gives_identical_embeddings(
    tiny_dirs: dict[str, Path], tmp_path: Path, family: str
) -> None:
    ev = load(tiny_dirs[family], family)
    # Change the weights as training would, so the round trip cannot pass by re-reading the source folder.
    with torch.no_grad():
        for p in ev.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ev.model.logit_scale.fill_(np.log(50.0))
    saved = ev.save(tmp_path / "saved")
    again = load(saved, family)
    x = images(3, seed=5)
    assert torch.equal(ev.encode_images(x), again.encode_images(x))
    assert torch.equal(ev.encode_texts(PROMPTS), again.encode_texts(PROMPTS))
    assert again.logit_scale == pytest.approx(50.0, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_are_normalised_with_the_right_shapes(tiny_dirs: dict[str, Path], family: str) -> None:
    ev = load(tiny_dirs[family], family)
    img = ev.encode_images(images(3, size=(80, 96)))  # resized to 64 x 64 on the way in
    txt = ev.encode_texts(PROMPTS)
    assert img.shape == (3, 64) and txt.shape == (2, 64)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_similarity_gradient_reaches_pixels_not_weights(tiny_dirs: dict[str, Path], family: str) -> None:
    ev = load(tiny_dirs[family], family)
    x = images(2, size=(96, 96)).requires_grad_(True)
    logits = ev.logit_scale * ev.encode_images(x) @ ev.encode_texts(PROMPTS).T
    logits.log_softmax(dim=-1)[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ev.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_gradient_matches_finite_differences_in_float64(
    tiny_dirs: dict[str, Path], family: str
) -> None:
    ev = load(tiny_dirs[family], family).to(dtype=torch.float64)
    text = ev.encode_texts(PROMPTS[:1])[0]
    x = images(1, size=(48, 48), seed=7).double().requires_grad_(True)  # upsampled to 64 on the way in

    def score(inp: torch.Tensor) -> torch.Tensor:
        return ev.encode_images(inp)[0] @ text

    score(x).backward()
    eps = 1e-6
    for c, i, j in [(0, 10, 20), (1, 24, 24), (2, 40, 5)]:
        bump = torch.zeros_like(x)
        bump[0, c, i, j] = eps
        with torch.no_grad():
            numeric = (score(x + bump) - score(x - bump)) / (2 * eps)
        assert x.grad[0, c, i, j].item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-9)


def test_text_cache_returns_the_same_tensor(tiny_dirs: dict[str, Path]) -> None:
    ev = load(tiny_dirs["vit"], "vit")
    first = ev.encode_texts(PROMPTS)
    assert ev.encode_texts(tuple(PROMPTS)) is first
    assert not first.requires_grad
    assert ev.encode_texts(PROMPTS[::-1]) is not first
    assert torch.equal(ev.encode_texts(PROMPTS[::-1]), first.flip(0))


def test_set_trainable_unfreezes_and_bypasses_the_cache(tiny_dirs: dict[str, Path]) -> None:
    ev = load(tiny_dirs["vit"], "vit")
    frozen = ev.encode_texts(PROMPTS)
    ev.set_trainable(True)
    assert ev.model.training and all(p.requires_grad for p in ev.model.parameters())
    live = ev.encode_texts(PROMPTS)
    assert live.requires_grad and live is not ev.encode_texts(PROMPTS)
    # One contrastive step with open_clip's own loss, as the bootstrap does.
    loss = open_clip.ClipLoss()(ev.encode_images(images(2)), live, ev.model.logit_scale.exp())
    loss.backward()
    assert ev.model.token_embedding.weight.grad is not None
    ev.set_trainable(False)
    assert not ev.model.training and not any(p.requires_grad for p in ev.model.parameters())
    assert torch.equal(ev.encode_texts(PROMPTS), frozen)


@pytest.mark.parametrize("family", FAMILIES)
def test_grayscale_input_is_replicated(tiny_dirs: dict[str, Path], family: str) -> None:
    ev = load(tiny_dirs[family], family)
    gray = images(2, channels=1)
    assert torch.equal(ev.encode_images(gray), ev.encode_images(gray.expand(-1, 3, -1, -1)))


def test_preprocess_resize_modes_and_normalisation() -> None:
    mean, std = torch.tensor([0.5, 0.25, 0.0]), torch.tensor([0.5, 0.25, 1.0])
    x = torch.zeros(1, 3, 32, 64)  # mid-grey, wide
    squash = preprocess_images(x, (16, 16), mean, std, resize_mode="squash")
    assert squash.shape == (1, 3, 16, 16)
    assert torch.allclose(squash[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.5]), atol=1e-6)
    shortest = preprocess_images(x, (16, 16), mean, std, resize_mode="shortest")
    assert shortest.shape == (1, 3, 16, 16)
    x[..., :, :8] = 1.0  # white left strip: cropped away by "shortest" (beyond the bicubic support)
    cropped = preprocess_images(x, (16, 16), mean, std, resize_mode="shortest")
    assert torch.allclose(cropped, shortest, atol=1e-6)
    padded = preprocess_images(
        torch.zeros(1, 3, 32, 64), (16, 16), mean, std, resize_mode="longest", fill=0.0
    )
    assert padded.shape == (1, 3, 16, 16)
    assert torch.allclose(padded[0, :, 0, 8], (0 - mean) / std, atol=1e-6)  # top rows are padding (black)
    assert torch.allclose(padded[0, :, 8, 8], (0.5 - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\] or \[B,1,H,W\], got shape \(3, 8, 8\)"):
        preprocess_images(torch.zeros(3, 8, 8), (16, 16), mean, std)


def test_preprocess_matches_open_clips_pil_transform(tiny_dirs: dict[str, Path]) -> None:
    ev = load(tiny_dirs["vit"], "vit")
    # A smooth image: PIL and torch bicubic antialiasing agree closely away from sharp edges.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    x = torch.stack([xx, yy, (xx + yy) / 2])[None] * 2 - 1
    pil = Image.fromarray(((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    _, reference_transform = open_clip.create_model_from_pretrained(f"local-dir:{tiny_dirs['vit']}")
    reference = reference_transform(pil)[None]
    ours = ev.preprocess(x)
    assert ours.shape == reference.shape == (1, 3, 64, 64)
    assert (ours - reference).abs().max() < 0.05  # in normalised units (std ~0.27): < 1.4 % of range


def test_same_family_is_refused(tiny_dirs: dict[str, Path]) -> None:
    vit, conv = load(tiny_dirs["vit"], "vit"), load(tiny_dirs["convnet"], "convnet")
    check_out_of_family(vit, conv)
    check_out_of_family(
        EvaluatorConfig(family="vit"), EvaluatorConfig(model="convnext_base_w", family="convnet")
    )
    with pytest.raises(UserError, match="has family 'vit', the same as the training evaluator"):
        check_out_of_family(vit, vit)
    with pytest.raises(UserError, match="set model.ood_evaluator"):
        check_out_of_family(EvaluatorConfig(family="convnet"), EvaluatorConfig(family="ConvNet"))


def test_declared_family_must_match_the_architecture(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(
        UserError, match=r"declared family 'convnet' .*VisionTransformer.* set evaluator.family=vit"
    ):
        load(tiny_dirs["vit"], "convnet")
    with pytest.raises(UserError, match=r"ConvNeXt.* set evaluator.family=convnet"):
        load(tiny_dirs["convnet"], "vit")


def test_missing_folder_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not found; .*open_clip_config.json.*open_clip_model.safetensors"):
        load(tmp_path / "nowhere", "vit")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"has no open_clip_config.json \(found: nothing\)"):
        load(empty, "vit")
    (empty / CONFIG_FILE).write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(UserError, match="has no 'model_cfg' key"):
        load(empty, "vit")
    (empty / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load(empty, "vit")


def test_folder_without_weights_is_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text((tiny_dirs["vit"] / CONFIG_FILE).read_text())
    with pytest.raises(UserError, match=r"has no weights file; .*open_clip_model.safetensors"):
        load(tmp_path, "vit")


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(UserError, match=r"unknown open_clip architecture 'ViT-Nope'.*known: .*ViT-B-32"):
        load_evaluator(EvaluatorConfig(model="ViT-Nope", family="vit"))
    with pytest.raises(UserError, match=r"needs evaluator.pretrained: .*openai"):
        load_evaluator(EvaluatorConfig(model="ViT-B-32", family="vit"))
    with pytest.raises(UserError, match=r"'nope' is neither a weights file nor a tag .*known tags: .*openai"):
        load_evaluator(EvaluatorConfig(model="ViT-B-32", pretrained="nope", family="vit"))


def test_hub_id_offline_says_to_download_beforehand() -> None:
    # conftest sets HF_HUB_OFFLINE=1: a hub id that is not in the local cache fails fast.
    with pytest.raises(
        UserError, match=r"cannot load evaluator 'hf-hub:craft-ray-tests/absent'.*HF_HUB_OFFLINE=1"
    ):
        load_evaluator(EvaluatorConfig(model="hf-hub:craft-ray-tests/absent", family="vit"))


def test_unknown_tiny_family() -> None:
    with pytest.raises(UserError, match=r"unknown tiny evaluator family 'rnn'; known: convnet, vit"):
        make_tiny_evaluator("unused", "rnn")


def test_cut_bpe_vocabulary_shrinks_the_folder_and_round_trips(tmp_path: Path) -> None:
    folder = make_tiny_evaluator(tmp_path / "small", "convnet", bpe_merges=4096, context_length=48)
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    assert size_mb < 3
    ev = load(folder, "convnet")
    assert ev.model.token_embedding.num_embeddings == 4096 + 514
    tokens = ev.tokenizer(["A Chest X-ray showing Cardiomegaly", "a chest x-ray showing cardiomegaly"])
    assert tokens.shape == (2, 48) and torch.equal(tokens[0], tokens[1])  # lower-cased like CLIP
    first_end = tokens[0].argmax().item()  # open_clip pools the text tower at the first end-of-text id
    assert tokens[0, first_end] == 4096 + 513 and tokens[0, 0] == 4096 + 512
    texts = ev.encode_texts(PROMPTS)
    assert texts.shape == (2, 64) and not torch.allclose(texts[0], texts[1])
    again = load(ev.save(tmp_path / "saved"), "convnet")
    assert torch.equal(again.encode_texts(PROMPTS), texts)
    with pytest.raises(UserError, match=r"bpe_merges=50000 out of range; choose 0..48894"):
        make_tiny_evaluator(tmp_path / "bad", "vit", bpe_merges=50000)
