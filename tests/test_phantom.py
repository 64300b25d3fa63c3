"""The phantom world: generator determinism and ranges, the oracle's accuracy, the CLI end to end."""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craft_ray.data.manifest import read_manifest
from craft_ray.data.phantom import generate, generate_one, image_rng, oracle
from craft_ray.data.phantom.export import meta_columns
from craft_ray.errors import UserError
from craft_ray.modalities import MODALITY_NAMES, get_modality

REPO = Path(__file__).resolve().parents[1]
FRESH_SEED = 12345  # never used while tuning the oracle's thresholds


def _labels(modality: str) -> list[str]:
    return get_modality(modality).label_names("phantom")


@pytest.mark.parametrize("modality", MODALITY_NAMES)
def test_batch_shapes_and_cycling_labels(modality: str) -> None:
    batch = generate(modality, 8)
    labels = _labels(modality)
    assert batch.images.shape == (8, 64, 64, 3) and batch.images.dtype == np.uint8
    assert batch.labels == [labels[i % len(labels)] for i in range(8)]
    assert len(batch.meta) == 8 and all(m.keys() == batch.meta[0].keys() for m in batch.meta)
    if modality == "cxr":  # grayscale modality: the channel is replicated
        assert np.array_equal(batch.images[..., 0], batch.images[..., 2])
    else:
        assert not np.array_equal(batch.images[..., 0], batch.images[..., 2])


@pytest.mark.parametrize("modality", MODALITY_NAMES)
def test_deterministic_by_seed_and_index(modality: str) -> None:
    a = generate(modality, 6, seed=3)
    assert a.images.tobytes() == generate(modality, 6, seed=3).images.tobytes()
    assert a.meta == generate(modality, 6, seed=3).meta
    assert not np.array_equal(a.images, generate(modality, 6, seed=4).images)
    # Image i depends on (seed, i) only, not on how many images are generated.
    assert np.array_equal(generate(modality, 11, seed=3).images[:6], a.images)
    image, meta = generate_one(modality, a.labels[5], image_rng(3, 5))
    assert np.array_equal(image, a.images[5]) and meta == a.meta[5]


@pytest.mark.parametrize(("modality", "size"), [("cxr", 32), ("derm", 96), ("fundus", 128), ("histo", 48)])
def test_any_size(modality: str, size: int) -> None:
    batch = generate(modality, 3, size=size)
    assert batch.images.shape == (3, size, size, 3)


@pytest.mark.parametrize("modality", MODALITY_NAMES)
def test_oracle_accuracy_on_fresh_phantoms(modality: str) -> None:
    batch = generate(modality, 150, seed=FRESH_SEED)
    assert oracle.accuracy(modality, batch.images, batch.labels) >= 0.95


@pytest.mark.parametrize("modality", MODALITY_NAMES)
def test_oracle_accuracy_at_128_px(modality: str) -> None:
    batch = generate(modality, 40, size=128, seed=FRESH_SEED + 1)
    assert oracle.accuracy(modality, batch.images, batch.labels) >= 0.9


def test_oracle_measures_what_was_drawn() -> None:
    cxr = generate("cxr", 40, seed=FRESH_SEED + 2)
    for image, meta in zip(cxr.images, cxr.meta, strict=True):
        found = oracle.measure("cxr", image)
        assert abs(found["ctr"] - meta["ctr"]) < 0.05
        assert found["nodule_count"] == meta["nodule_count"]
    histo = generate("histo", 30, seed=FRESH_SEED + 2)
    assert [oracle.measure("histo", im)["lumen_count"] for im in histo.images] == [m["lumen_count"] for m in histo.meta]
    fundus = generate("fundus", 30, seed=FRESH_SEED + 2)
    assert [oracle.measure("fundus", im)["exudate_count"] for im in fundus.images] == [
        m["exudate_count"] for m in fundus.meta
    ]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_oracle_tells_modalities_apart(size: int) -> None:
    for modality in MODALITY_NAMES:
        batch = generate(modality, 12, size=size, seed=FRESH_SEED)
        assert [oracle.modality_of(im) for im in batch.images] == [modality] * 12


def test_oracle_is_evaluation_only_and_checks_input() -> None:
    doc = " ".join(oracle.__doc__.split())
    assert "FOR EVALUATION ONLY" in doc and "never feed a reward" in doc
    with pytest.raises(UserError, match="unknown modality 'xray'; known: cxr, derm, fundus, histo"):
        oracle.classify("xray", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UserError, match=r"expected an image \[H, W, 3\]"):
        oracle.measure("derm", np.zeros((64, 64, 4), np.uint8))


def _by_label(modality: str, n: int = 120, size: int = 64) -> dict[str, list[dict]]:
    batch = generate(modality, n, size=size, seed=7)
    out: dict[str, list[dict]] = {}
    for label, meta in zip(batch.labels, batch.meta, strict=True):
        out.setdefault(label, []).append(meta)
    return out


def _within(values: list[float], lo: float, hi: float) -> bool:
    return all(lo - 1e-9 <= v <= hi + 1e-9 for v in values)


@pytest.mark.parametrize("size", [64, 96])
def test_metadata_follows_design_ranges(size: int) -> None:
    s = size / 64  # DESIGN.md's pixel numbers are at 64 px
    cxr = _by_label("cxr", size=size)
    for label in ("no_finding", "pleural_effusion", "nodule"):
        assert _within([m["ctr"] for m in cxr[label]], 0.35, 0.45)
    assert _within([m["ctr"] for m in cxr["cardiomegaly"]], 0.55, 0.70)
    assert _within([m["effusion_fraction"] for m in cxr["pleural_effusion"]], 0.25, 0.40)
    assert all(m["effusion_side"] in ("left", "right") for m in cxr["pleural_effusion"])
    assert _within([m["nodule_count"] for m in cxr["nodule"]], 1, 2)
    assert _within([r / s for m in cxr["nodule"] for r in m["nodule_radii"]], 2.0, 4.0)
    assert all(m["nodule_count"] == 0 and m["effusion_fraction"] == 0 for m in cxr["no_finding"])

    derm = _by_label("derm", size=size)
    assert _within([m["axis_ratio"] for m in derm["nevus"]], 0.8, 1.0)
    assert _within([m["diameter_frac"] for m in derm["nevus"]], 0.25, 0.40)
    assert all(m["colour_count"] == 1 for m in derm["nevus"])
    assert _within([m["diameter_frac"] for m in derm["melanoma"]], 0.35, 0.55)
    assert _within([m["border_irregularity"] for m in derm["melanoma"]], 0.20, 1.0)
    assert all(set(m["colours"]) == {"light_brown", "dark", "blue_grey"} for m in derm["melanoma"])
    assert _within([m["vessel_count"] for m in derm["bcc"]], 3, 10)

    fundus = _by_label("fundus", size=size)
    assert _within([m["cup_to_disc"] for m in fundus["normal"]], 0.0, 0.4)
    assert _within([m["cup_to_disc"] for m in fundus["glaucoma"]], 0.7, 1.0)
    assert all(m["dot_count"] >= 5 and m["exudate_count"] >= 2 for m in fundus["diabetic_retinopathy"])
    assert all(m["dot_count"] == 0 and m["exudate_count"] == 0 for m in fundus["normal"] + fundus["glaucoma"])

    histo = _by_label("histo", size=size)
    assert _within([m["nuclear_radius_px"] / s for m in histo["normal"]], 1.5, 2.5)
    assert all(m["lumen_count"] >= 1 for m in histo["normal"])
    assert _within([m["nuclear_radius_px"] / s for m in histo["tumor"]], 3.0, 5.0)
    assert all(m["lumen_count"] == 0 for m in histo["tumor"] + histo["stroma"])
    assert min(m["nuclear_density"] for m in histo["tumor"]) > 3 * max(m["nuclear_density"] for m in histo["stroma"])


def test_features_scale_with_size() -> None:
    small, large = generate("cxr", 4, size=64, seed=5), generate("cxr", 4, size=128, seed=5)
    for a, b in zip(small.meta, large.meta, strict=True):
        assert b["thorax_width_px"] == pytest.approx(2 * a["thorax_width_px"])
        assert b["ctr"] == pytest.approx(a["ctr"])


@pytest.mark.parametrize("modality", MODALITY_NAMES)
def test_within_class_variety(modality: str) -> None:
    batch = generate(modality, 6 * len(_labels(modality)), seed=11)
    for label in _labels(modality):
        images = [im.astype(np.int16) for im, lab in zip(batch.images, batch.labels, strict=True) if lab == label]
        diffs = [np.abs(a - b).mean() for a, b in itertools.combinations(images, 2)]
        assert min(diffs) > 3.0, (label, min(diffs))  # mean absolute difference in grey levels


def test_labels_argument() -> None:
    batch = generate("fundus", 4, labels="glaucoma")
    assert batch.labels == ["glaucoma"] * 4
    assert all(m["cup_to_disc"] >= 0.7 for m in batch.meta)
    assert generate("histo", 2, labels=["tumor", "stroma"]).labels == ["tumor", "stroma"]
    with pytest.raises(UserError, match="got 1 labels for 2 images"):
        generate("histo", 2, labels=["tumor"])
    with pytest.raises(UserError, match="unknown label 'pneumonia' for modality cxr.*known: no_finding"):
        generate("cxr", 1, labels="pneumonia")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "xray", "n": 1}, "unknown modality 'xray'; known: cxr, derm, fundus, histo"),
        ({"modality": "cxr", "n": 0}, "number of images must be positive, got 0"),
        ({"modality": "cxr", "n": 1, "size": 8}, "image size must be at least 16 px, got 8"),
        ({"modality": "cxr", "n": 1, "seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        generate(**kwargs)


def test_meta_columns_flatten_lists() -> None:
    cols = meta_columns({"nodule_radii": [2.5, 3.25], "nodule_count": np.int64(2), "colours": ["dark", "blue_grey"]})
    assert cols == {"nodule_radii": "2.5;3.25", "nodule_count": 2, "colours": "dark;blue_grey"}


# --- CLI -----------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "craft_ray.data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_pngs_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "cxr"
    res = _cli("phantom", "--modality", "cxr", "--n", "200", "--out", str(out), "--seed", "2")
    assert res.returncode == 0, res.stderr
    assert "wrote 200 cxr phantoms (64 px, seed 2; train 160, val 20, test 20)" in res.stdout
    assert len(list((out / "images").rglob("*.png"))) == 200
    manifest = read_manifest(out / "manifest.csv", "cxr", "phantom")
    assert len(manifest.rows) == 200 and set(manifest.counts().values()) == {50}
    splits = Counter(r.split for r in manifest.rows)
    assert splits == {"train": 160, "val": 20, "test": 20}
    for split in ("val", "test"):  # stratified: every label in every split
        assert {r.label for r in manifest.split(split)} == set(_labels("cxr"))
    with (out / "manifest.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["path", "label", "split"] and {"ctr", "nodule_radii", "effusion_fraction"} <= set(header)
    # The PNGs hold exactly the generated pixels and the columns the ground truth.
    batch = generate("cxr", 4, seed=2)
    for row in manifest.rows[:4]:
        i = int(row.meta["index"])
        assert np.array_equal(np.asarray(Image.open(row.path)), batch.images[i])
        assert float(row.meta["ctr"]) == pytest.approx(batch.meta[i]["ctr"], rel=1e-5)
    nodule = next(r for r in manifest.rows if r.label == "nodule")
    assert len(nodule.meta["nodule_radii"].split(";")) == int(nodule.meta["nodule_count"])


def test_cli_size_and_custom_split(tmp_path: Path) -> None:
    res = _cli("phantom", "--modality", "histo", "--n", "30", "--out", str(tmp_path), "--size", "32",
               "--split", "train=0.5,test=0.5")
    assert res.returncode == 0, res.stderr
    manifest = read_manifest(tmp_path / "manifest.csv", "histo", "phantom")
    assert Counter(r.split for r in manifest.rows) == {"train": 15, "test": 15}
    assert Image.open(manifest.rows[0].path).size == (32, 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modality", "xray", "--n", "5"], "unknown modality 'xray'; known: cxr, derm, fundus, histo"),
        (["--modality", "cxr", "--n", "0"], "number of images must be positive, got 0"),
        (["--modality", "cxr", "--n", "-3"], "number of images must be positive, got -3"),
        (["--modality", "cxr", "--n", "5", "--split", "train=0.8,val=0.3"], "must be non-negative and sum to 1"),
        (["--modality", "cxr", "--n", "5", "--split", "train=0.8,dev=0.2"], "bad split entry 'dev=0.2'"),
        (["--modality", "cxr", "--n", "5", "--size", "4"], "image size must be at least 16 px, got 4"),
    ],
)
def test_cli_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    res = _cli("phantom", "--out", str(tmp_path / "x"), *args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_refuses_to_overwrite(tmp_path: Path) -> None:
    assert _cli("phantom", "--modality", "derm", "--n", "3", "--out", str(tmp_path)).returncode == 0
    res = _cli("phantom", "--modality", "derm", "--n", "3", "--out", str(tmp_path))
    assert res.returncode == 2 and "already exists; choose another --out or pass --overwrite" in res.stderr
    res = _cli("phantom", "--modality", "derm", "--n", "6", "--out", str(tmp_path), "--overwrite")
    assert res.returncode == 0 and len(read_manifest(tmp_path / "manifest.csv", "derm").rows) == 6
