"""The shared CLI conventions, exercised through real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_package_lists_commands() -> None:
    out = cli("craft_ray")
    assert out.returncode == 0
    for command in ("train", "sweep", "serve", "evaluate", "data", "knowledge"):
        assert f"  {command}" in out.stdout
    bad = cli("craft_ray", "frobnicate")
    assert bad.returncode == 2 and "takes no arguments" in bad.stderr


@pytest.mark.parametrize("command", ["craft_ray.train", "craft_ray.data", "craft_ray.knowledge"])
def test_help(command: str) -> None:
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert f"python -m {command}" in out.stdout and "--debug" in out.stdout


def test_train_print_config(tmp_path: Path) -> None:
    out = cli("craft_ray.train", "--print-config", "modality=histo", "train.sft_steps=11", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["modality"] == "histo" and cfg["train"]["sft_steps"] == 11
    assert cfg["tracking"]["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"


def test_train_print_config_from_file(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("modality: fundus\ntrain:\n  craft_steps: 9\n")
    out = cli("craft_ray.train", str(exp), "train.craft_steps=10", "--print-config", cwd=tmp_path)
    cfg = yaml.safe_load(out.stdout)
    assert (cfg["modality"], cfg["train"]["craft_steps"]) == ("fundus", 10)


def test_train_lists_stages() -> None:
    out = cli("craft_ray.train", "--list-stages")
    assert out.returncode == 0
    assert "stages:" in out.stdout and "sft" in out.stdout and "craft" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no/such/experiment.yaml"], "config file 'no/such/experiment.yaml' not found"),
        (["train.bogus=1"], "unknown config key 'train.bogus'"),
        (["train.sft_steps=lots"], "wrong type for config key 'train.sft_steps'"),
        (["train.sft_steps"], "'train.sft_steps' is neither a YAML config file nor a key=value override"),
        (["modality=derm", "extra"], "unexpected argument 'extra'"),
        (["modality=xray"], "valid choices: cxr, derm, fundus, histo"),
        (["reward.preference_candidates=1"], "reward.preference_candidates must be >= 2"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    out = cli("craft_ray.train", *args)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback() -> None:
    out = cli("craft_ray.train", "train.bogus=1", "--debug")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "unknown config key 'train.bogus'" in out.stderr
