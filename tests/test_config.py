"""Config precedence, typing and the one-line errors of bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from craft_ray.config import flatten, load_config, profile_names, to_yaml
from craft_ray.errors import UserError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_profiles_shipped() -> None:
    assert profile_names() == ["sd", "tiny"]


def test_tiny_is_the_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.profile == "tiny" and cfg.modality == "cxr" and cfg.stage == "all"
    assert cfg.data.source == "phantom" and cfg.model.resolution == 64
    assert cfg.train.use_gpu is False and 0 < cfg.train.cpus_per_worker < 1
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.model.evaluator.family != cfg.model.ood_evaluator.family
    assert cfg.model.pretrained.endswith("craft_ray/tiny_world/diffusion")


def test_sd_profile_is_the_gpu_template() -> None:
    cfg = load_config(overrides=["profile=sd"])
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-2-1-base"
    assert cfg.model.resolution == 512 and cfg.model.lora.rank == 32 and cfg.model.mixed_precision == "bf16"
    assert cfg.model.evaluator.model.startswith("hf-hub:microsoft/BiomedCLIP")
    assert cfg.judges.engine.kind == "vllm" and cfg.judges.engine.model == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_precedence_defaults_profile_file_overrides(tmp_path: Path) -> None:
    # dataclass default: train.batch_size=8, train.num_workers=1
    assert load_config().train.batch_size == 8
    # profile sd overrides the default
    assert load_config(overrides=["profile=sd"]).train.batch_size == 2
    # experiment file overrides the profile it names
    exp = write(tmp_path / "exp.yaml", "profile: sd\ntrain:\n  batch_size: 3\n  num_workers: 4\n")
    cfg = load_config(exp)
    assert (cfg.train.batch_size, cfg.train.num_workers, cfg.model.resolution) == (3, 4, 512)
    # overrides beat the file
    cfg = load_config(exp, ["train.batch_size=5"])
    assert (cfg.train.batch_size, cfg.train.num_workers) == (5, 4)
    # an override can switch the profile named by the file
    assert load_config(exp, ["profile=tiny"]).model.resolution == 64


def test_overrides_are_typed() -> None:
    cfg = load_config(overrides=["train.craft_lr=1e-4", "cas.q=0.2", "train.use_gpu=true", "modality=derm"])
    assert cfg.train.craft_lr == pytest.approx(1e-4) and isinstance(cfg.train.craft_lr, float)
    assert cfg.cas.q == pytest.approx(0.2) and cfg.train.use_gpu is True
    assert cfg.name == "craft-derm"  # interpolated from the overridden modality


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["data.manifest=data/manifest.csv"])
    assert cfg.data.manifest == str(tmp_path / "data" / "manifest.csv")


def test_print_and_flatten_round_trip() -> None:
    cfg = load_config(overrides=["train.sft_steps=7"])
    text = to_yaml(cfg)
    assert yaml.safe_load(text)["train"]["sft_steps"] == 7
    flat = flatten(cfg)
    assert flat["train.sft_steps"] == 7 and flat["model.lora.target_modules"][0] == "to_q"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trian.sft_steps=3"], "unknown config key 'trian'"),
        (["train.sft_stepz=3"], "unknown config key 'train.sft_stepz'"),
        (["train.sft_steps=many"], "wrong type for config key 'train.sft_steps'"),
        (["train.use_gpu=maybe"], "wrong type for config key 'train.use_gpu'"),
        (["modality=lung"], "bad value 'lung' for config key 'modality'; valid choices: cxr, derm, fundus, histo"),
        (["stage=finetune"], "valid choices: sft, craft, all"),
        (["sampling.timestep_spacing=last"], "valid choices: model, leading, trailing, linspace"),
        (["train.hacking_watch=[cas,sharpness]"], "'sharpness'. for config key 'train.hacking_watch': a non-empty list"),
        (["train.hacking_watch=[]"], "a non-empty list of cas, label, checklist, modality, realism"),
        (["profile=huge"], "unknown profile 'huge'; known: sd, tiny"),
        (["train.sft_steps"], "malformed override 'train.sft_steps'; expected key=value"),
        (["=3"], "malformed override '=3'"),
    ],
)
def test_bad_overrides(overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=overrides)


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(UserError) as err:
        load_config(overrides=["train.sft_stepz=3"])
    assert "in section 'train'" in str(err.value) and "sft_steps" in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file .*missing.yaml' not found"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path / "bad.yaml", "train: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml' is not valid YAML"):
        load_config(bad)
    listy = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(listy)
    unknown = write(tmp_path / "unknown.yaml", "model:\n  lora:\n    rnak: 8\n")
    with pytest.raises(UserError, match=r"unknown config key 'model.lora.rnak' \(from config file"):
        load_config(unknown)
    wrong = write(tmp_path / "wrong.yaml", "data:\n  size: big\n")
    with pytest.raises(UserError, match="wrong type for config key 'data.size'"):
        load_config(wrong)
