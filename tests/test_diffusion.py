"""The diffusion model: loading, LoRA training surface, diffusers-format LoRA files, tiny pipelines."""

from __future__ import annotations

import contextlib
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from craft_ray.config import LoraConfig, load_config
from craft_ray.errors import UserError
from craft_ray.models.diffusion import DiffusionModel, load_components, make_tiny_pipeline

PROMPTS = ["a chest x-ray showing cardiomegaly", "a frontal chest radiograph with a nodule"]
N_ATTENTION = 8  # attention modules of the tiny UNet (4 self + 4 cross), each with to_q, to_k, to_v, to_out.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "diffusion")


def _model(folder: Path, **lora: object) -> DiffusionModel:
    return DiffusionModel(load_components(folder), LoraConfig(**lora))


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _randomize_lora(model: DiffusionModel, seed: int = 1) -> None:
    """Give lora_B non-zero values (it starts at zero, which would make every LoRA test trivially pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _unet_inputs(model: DiffusionModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    return latents, torch.tensor([10, 700]), model.encode_prompts(PROMPTS)


def test_tiny_pipeline_is_small_and_loads_in_plain_diffusers(tiny: Path) -> None:
    size = sum(f.stat().st_size for f in tiny.rglob("*") if f.is_file())
    assert size < 8_000_000
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny / name).exists()
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    # Every character maps: no unknown tokens, one token per character plus start/end.
    ids = pipe.tokenizer("Cardiomegaly, CTR 0.62!").input_ids
    assert len(ids) == len("Cardiomegaly,CTR0.62!") + 2
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]


def test_tiny_pipeline_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = make_tiny_pipeline(tmp_path / "again")
    first = load_file(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    second = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_encode_decode_shapes(tiny: Path) -> None:
    model = _model(tiny)
    assert (model.latent_scale, model.latent_channels) == (4, 4)
    latents = model.encode_images(_images(), torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 16, 16)
    images = model.decode_latents(latents)
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    assert model.encode_prompts(PROMPTS).shape == (2, 128, 32)
    # decode is differentiable in the latents (the reward's path back into the sampler)
    z = latents.clone().requires_grad_(True)
    model.decode_latents(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_only_lora_trains_and_receives_gradients(tiny: Path) -> None:
    model = _model(tiny, rank=4, alpha=4)
    trainable = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    assert len(trainable) == N_ATTENTION * 4 * 2  # lora_A and lora_B per target module
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for n, p in model.unet.named_parameters() if n in trainable
    }
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):  # B starts at 0, so A only gets a gradient after the first step
        optimizer.zero_grad()
        model.train()
        loss = model.diffusion_loss(_images(), PROMPTS, torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    frozen = [*model.vae.parameters(), *model.text_encoder.parameters()]
    frozen += [p for p in model.unet.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_lora_starts_as_identity_and_attention_uses_sdpa(tiny: Path) -> None:
    model = _model(tiny)
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    latents, t, emb = _unet_inputs(model)
    with torch.no_grad():
        assert torch.allclose(model.predict(latents, t, emb), pipe.unet(latents, t, emb).sample, atol=1e-6)
    assert {type(p).__name__ for p in model.unet.attn_processors.values()} == {"AttnProcessor2_0"}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_seeded_and_honours_prediction_type(tmp_path: Path, prediction_type: str) -> None:
    folder = make_tiny_pipeline(tmp_path / "tiny", prediction_type=prediction_type)
    model = _model(folder)
    assert model.scheduler.config.prediction_type == prediction_type
    loss_a = model.diffusion_loss(_images(), PROMPTS, torch.Generator().manual_seed(5))
    loss_b = model.diffusion_loss(_images(), PROMPTS, torch.Generator().manual_seed(5))
    loss_c = model.diffusion_loss(_images(), PROMPTS, torch.Generator().manual_seed(6))
    assert loss_a.item() == loss_b.item() != loss_c.item()


def test_cond_dropout_one_equals_empty_prompts(tiny: Path) -> None:
    model = _model(tiny)
    dropped = model.diffusion_loss(_images(), PROMPTS, torch.Generator().manual_seed(2), cond_dropout=1.0)
    empty = model.diffusion_loss(_images(), ["", ""], torch.Generator().manual_seed(2))
    kept = model.diffusion_loss(_images(), PROMPTS, torch.Generator().manual_seed(2))
    assert dropped.item() == pytest.approx(empty.item(), abs=1e-7)
    assert dropped.item() != kept.item()


def test_lora_file_loads_in_plain_diffusers_with_same_output(tiny: Path, tmp_path: Path) -> None:
    # alpha != rank: the file must carry the scale alpha / rank = 2 for diffusers to rebuild it
    model = _model(tiny, rank=4, alpha=8)
    _randomize_lora(model)
    path = model.save_lora(tmp_path / "lora.safetensors")
    assert path.is_file()
    keys = load_file(path).keys()
    assert len(keys) == N_ATTENTION * 4 * 2
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)

    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    latents, t, emb = _unet_inputs(model)
    with torch.no_grad():
        base = pipe.unet(latents, t, emb).sample
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(latents, t, emb).sample
        ours = model.predict(latents, t, emb)
    assert (ours - base).abs().max() > 1e-2  # the LoRA really changes the UNet
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_lora_round_trip_and_folder_path(tiny: Path, tmp_path: Path) -> None:
    source = _model(tiny)
    _randomize_lora(source, seed=7)
    path = source.save_lora(tmp_path / "run")  # a folder gets diffusers' default file name
    assert path == tmp_path / "run" / "pytorch_lora_weights.safetensors"
    target = _model(tiny)
    target.load_lora(tmp_path / "run")
    expected, got = source.lora_state_dict(), target.lora_state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    latents, t, emb = _unet_inputs(source)
    with torch.no_grad():
        assert torch.equal(source.predict(latents, t, emb), target.predict(latents, t, emb))


def test_mismatched_lora_keys_are_a_user_error(tiny: Path, tmp_path: Path) -> None:
    narrow = _model(tiny, target_modules=["to_q", "to_v"])
    path = narrow.save_lora(tmp_path / "narrow.safetensors")
    with pytest.raises(UserError, match=r"0 unexpected keys .* 32 missing keys \(first: down_blocks\.0\..*to_k"):
        _model(tiny).load_lora(path)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.not_a_layer.lora.down.weight": torch.zeros(4, 32)}, str(foreign))
    with pytest.raises(UserError, match=r"1 unexpected keys \(first: not_a_layer\.lora_A\.weight\)"):
        _model(tiny).load_lora(foreign)

    text = tmp_path / "text.safetensors"
    save_file({"text_encoder.x.lora.down.weight": torch.zeros(4, 32)}, str(text))
    with pytest.raises(UserError, match="outside the UNet"):
        _model(tiny).load_lora(text)


def test_lora_rank_or_alpha_mismatch_is_a_user_error(tiny: Path, tmp_path: Path) -> None:
    path = _model(tiny, rank=8, alpha=8).save_lora(tmp_path / "r8.safetensors")
    with pytest.raises(UserError, match=r"rank 8, alpha 8; this model has rank 4, alpha 4; set model.lora.rank=8"):
        _model(tiny, rank=4, alpha=4).load_lora(path)
    # without metadata the tensor shapes still catch a rank mismatch
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), str(bare))
    with pytest.raises(UserError, match=r"shape \(8, 32\) but this model's adapter has \(4, 32\)"):
        _model(tiny, rank=4, alpha=4).load_lora(bare)
    with pytest.raises(UserError, match="LoRA file .*nothing.safetensors' not found"):
        _model(tiny).load_lora(tmp_path / "nothing.safetensors")


def test_missing_or_incomplete_folder_names_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"folder '.*nope' not found; expected .*model_index\.json.*unet/, vae/, "
                       r"text_encoder/, tokenizer/, scheduler/"):
        load_components(tmp_path / "nope")
    partial = make_tiny_pipeline(tmp_path / "partial")
    for f in (partial / "unet").iterdir():
        f.unlink()
    (partial / "unet").rmdir()
    with pytest.raises(UserError, match="missing unet; expected model_index.json"):
        load_components(partial)


def test_hub_id_offline_error_explains_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty cache in offline mode: the hub path must fail fast with the offline recipe, never download.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as info:
        load_components("craft-ray-tests/no-such-model", revision="v1")
    message = str(info.value)
    assert "'craft-ray-tests/no-such-model' at revision 'v1'" in message
    assert "`huggingface-cli download craft-ray-tests/no-such-model`" in message
    assert "HF_HUB_OFFLINE=1" in message


def test_gradient_checkpointing_toggle_keeps_outputs_and_gradients(tiny: Path) -> None:
    model = _model(tiny)
    _randomize_lora(model)
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        assert model.gradient_checkpointing is enabled
        model.unet.zero_grad()
        loss = model.diffusion_loss(_images(), PROMPTS, torch.Generator().manual_seed(4))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.trainable_parameters()]))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, abs=1e-7)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_off, grads_on, strict=True))


def test_from_config_reads_model_section(tiny: Path) -> None:
    cfg = load_config(
        overrides=[f"model.pretrained={tiny}", "model.lora.rank=2", "model.lora.alpha=4", "model.mixed_precision=bf16"]
    )
    model = DiffusionModel.from_config(cfg.model, device="cpu", seed=3)
    config = model.unet.peft_config["default"]
    assert (config.r, config.lora_alpha) == (2, 4)
    assert model.gradient_checkpointing is False  # the tiny profile's; the configuration default is on
    on = load_config(overrides=[f"model.pretrained={tiny}", "model.gradient_checkpointing=true"])
    assert DiffusionModel.from_config(on.model, device="cpu").gradient_checkpointing is True
    assert model.device.type == "cpu"
    assert isinstance(model.autocast(), contextlib.nullcontext)  # mixed precision is GPU-only: float32 on CPU
    again = DiffusionModel.from_config(cfg.model, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.trainable_parameters(), again.trainable_parameters(), strict=True))


def test_bad_target_modules_is_a_user_error(tiny: Path) -> None:
    with pytest.raises(UserError, match=r"target_modules=\['to_qq'\] match no UNet layer"):
        _model(tiny, target_modules=["to_qq"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(tiny: Path, tmp_path: Path, precision: str) -> None:
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = DiffusionModel(load_components(tiny), LoraConfig(), mixed_precision=precision).to("cuda")
    _randomize_lora(model)
    assert model.unet.conv_in.weight.dtype == model.text_encoder.dtype == half
    assert model.vae.dtype == torch.float32  # SD VAEs overflow in fp16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())

    loss = model.diffusion_loss(_images().cuda(), PROMPTS, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0

    full = DiffusionModel(load_components(tiny), LoraConfig()).to("cuda")
    full.load_lora_state_dict(model.lora_state_dict())
    latents, t, emb = _unet_inputs(full)
    with torch.no_grad():
        ours = model.predict(latents.cuda(), t.cuda(), emb.cuda())
        reference = full.predict(latents.cuda(), t.cuda(), emb.cuda())
    assert ours.dtype == torch.float32
    assert (ours - reference).norm() / reference.norm() < 0.05
    saved = load_file(model.save_lora(tmp_path / "lora.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
