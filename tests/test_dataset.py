"""ImageDataset tensors, prompts and corrupt-image policies; load_dataset; the Ray Data reader on real Ray."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from craft_ray.config import load_config
from craft_ray.data.dataset import ImageDataset, load_dataset, load_image, phantom_cache_dir, phantom_dataset
from craft_ray.data.manifest import Manifest, read_manifest, write_manifest
from craft_ray.errors import UserError


def _layout(tmp_path: Path) -> Manifest:
    """Six derm images: solid colours, a grayscale one, a wide one with a white centre, a 16-bit one."""
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(img / "red.png")
    Image.new("L", (12, 30), 255).save(img / "gray.jpg")
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # only the centre 10x10 is white
    Image.fromarray(wide).save(img / "wide.png")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(img / "deep.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(img / "blue.jpg")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(img / "green.tif")
    rows = [
        {"path": "img/red.png", "label": "melanoma", "split": "train"},
        {"path": "img/gray.jpg", "label": "nevus", "split": "train"},
        {"path": "img/wide.png", "label": "bcc", "split": "train"},
        {"path": "img/deep.png", "label": "nevus", "split": "train"},
        {"path": "img/blue.jpg", "label": "nevus", "split": "val"},
        {"path": "img/green.tif", "label": "bcc", "split": "test"},
    ]
    return read_manifest(write_manifest(tmp_path / "manifest.csv", rows), "derm", "phantom")


def test_items_are_3xSxS_in_minus1_1_with_labels_and_prompts(tmp_path: Path) -> None:
    ds = ImageDataset(_layout(tmp_path), "train", 10, modality="derm", dataset="phantom")
    assert len(ds) == 4
    red, gray, wide, deep = (ds[i] for i in range(4))
    for item in (red, gray, wide, deep):
        assert item["pixels"].shape == (3, 10, 10) and item["pixels"].dtype == torch.float32
        assert item["pixels"].min() >= -1.0 and item["pixels"].max() <= 1.0
    assert torch.equal(red["pixels"][0], torch.ones(10, 10)) and torch.equal(red["pixels"][1], -torch.ones(10, 10))
    assert torch.equal(gray["pixels"], torch.ones(3, 10, 10))  # grayscale replicated into three channels
    assert torch.equal(wide["pixels"], torch.ones(3, 10, 10))  # centre crop of the wide image
    assert torch.equal(deep["pixels"], torch.ones(3, 10, 10))  # 16-bit white is white
    assert (red["label"], red["label_name"], gray["label"], wide["label"]) == (1, "melanoma", 0, 2)
    assert red["prompt"] == "a dermoscopy image of melanoma"
    assert gray["prompt"] == "a dermoscopy image of a melanocytic nevus"
    assert red["path"] == str((tmp_path / "img" / "red.png").resolve())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["pixels"].shape == (3, 3, 10, 10) and batch["label"].tolist() == [1, 0, 2]


def test_prompt_fn_and_argument_checks(tmp_path: Path) -> None:
    m = _layout(tmp_path)
    ds = ImageDataset(m, "val", 8, prompt_fn=lambda label: f"enriched {label}")
    assert len(ds) == 1 and ds[0]["prompt"] == "enriched nevus"
    assert load_image(tmp_path / "img" / "red.png", 7).shape == (7, 7, 3)
    with pytest.raises(UserError, match="modality 'cxr' differs from the manifest's 'derm'"):
        ImageDataset(m, "train", 8, modality="cxr")
    with pytest.raises(UserError, match="unknown corrupt_images policy 'ignore'; known: fail, skip"):
        ImageDataset(m, "train", 8, corrupt_images="ignore")


def _with_corrupt(tmp_path: Path) -> Manifest:
    m = _layout(tmp_path)
    (tmp_path / "img" / "junk.png").write_bytes(b"not a png at all")
    jpeg = (tmp_path / "img" / "blue.jpg").read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated JPEG
    rows = [{"path": r.path, "label": r.label, "split": r.split} for r in m.rows]
    rows += [{"path": "img/junk.png", "label": "bcc", "split": "train"},
             {"path": "img/cut.jpg", "label": "nevus", "split": "train"}]
    return read_manifest(write_manifest(tmp_path / "manifest.csv", rows), "derm", "phantom")


def test_corrupt_images_fail_names_the_file(tmp_path: Path) -> None:
    ds = ImageDataset(_with_corrupt(tmp_path), "train", 8, corrupt_images="fail")
    assert len(ds) == 6
    with pytest.raises(UserError) as err:
        ds[4]
    assert f"cannot decode image {str((tmp_path / 'img' / 'junk.png').resolve())!r}" in str(err.value)
    assert "data.corrupt_images=skip" in str(err.value)
    with pytest.raises(UserError, match="cut.jpg"):
        ds[5]


def test_corrupt_images_skip_warns_once_with_the_count(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageDataset(_with_corrupt(tmp_path), "train", 8, corrupt_images="skip")
    messages = [str(w.message) for w in caught if "corrupt" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 corrupt image(s) of 6 in split 'train'" in messages[0]
    assert len(ds) == 4 and [p.name for p in ds.skipped] == ["junk.png", "cut.jpg"]
    assert [ds[i]["label_name"] for i in range(4)] == ["melanoma", "nevus", "bcc", "nevus"]


def test_load_dataset_reads_the_configured_manifest(tmp_path: Path) -> None:
    _layout(tmp_path)
    cfg = load_config(overrides=["modality=derm", "data.source=manifest", f"data.manifest={tmp_path / 'manifest.csv'}"])
    m = load_dataset(cfg)
    assert (m.modality, m.dataset, len(m.rows)) == ("derm", "phantom", 6)
    cfg.data.manifest = None
    with pytest.raises(UserError, match="data.source=manifest needs data.manifest=PATH"):
        load_dataset(cfg)
    cfg = load_config(overrides=["data.dataset=chexpert"])
    with pytest.raises(UserError, match="data.source=phantom generates the phantom label set"):
        load_dataset(cfg)


def test_phantom_dataset_is_generated_once_and_cached(tmp_path: Path) -> None:
    pytest.importorskip("craft_ray.data.phantom", reason="the phantom generator is not written yet")
    cfg = load_config(overrides=["modality=fundus", f"data.cache_dir={tmp_path}", "data.size=32",
                                 "data.n_train=6", "data.n_val=3", "data.n_test=3"])
    m = phantom_dataset(cfg)
    folder = phantom_cache_dir(cfg)
    assert folder == tmp_path / "fundus_32_0_6-3-3" and m.csv_path == folder / "manifest.csv"
    assert [len(m.split(s)) for s in ("train", "val", "test")] == [6, 3, 3]
    assert [r.label for r in m.split("train")[:3]] == ["normal", "diabetic_retinopathy", "glaucoma"]
    assert float(m.rows[0].meta["cup_to_disc"]) <= 0.4  # ground-truth feature values kept as columns
    stamp = m.csv_path.stat().st_mtime_ns
    again = load_dataset(cfg)
    assert m.csv_path.stat().st_mtime_ns == stamp and [r.path for r in again.rows] == [r.path for r in m.rows]
    item = ImageDataset(m, "train", 32)[0]
    assert item["pixels"].shape == (3, 32, 32) and item["prompt"].startswith("a fundus photograph showing")


def test_ray_dataset_yields_decoded_rows(tmp_path: Path, ray_local: object) -> None:
    from craft_ray.data.ray_reader import TorchCollate, ray_dataset

    m = _with_corrupt(tmp_path)
    rows = ray_dataset(m, "val", 8).take_all()
    assert len(rows) == 1 and rows[0]["label"] == 0 and rows[0]["prompt"] == "a dermoscopy image of a melanocytic nevus"
    assert rows[0]["pixels"].shape == (3, 8, 8) and rows[0]["pixels"].dtype == np.float32
    assert rows[0]["pixels"][2].min() > 0.9 and rows[0]["pixels"][0].max() < -0.9  # blue

    ds = ray_dataset(m, "train", 8, corrupt_images="skip", batch_size=2)
    batches = list(ds.iter_torch_batches(batch_size=8, collate_fn=TorchCollate()))
    got = sorted((int(lab), p) for b in batches for lab, p in zip(b["label"], b["prompt"], strict=True))
    assert [lab for lab, _ in got] == [0, 0, 1, 2]  # four decodable train images; junk.png and cut.jpg dropped
    assert got[2] == (1, "a dermoscopy image of melanoma")
    assert all(b["pixels"].shape[1:] == (3, 8, 8) and float(b["pixels"].abs().max()) <= 1.0 for b in batches)
    assert all(b["pixels"].dtype == torch.float32 and b["label"].dtype == torch.int64 for b in batches)
    shard = ds.streaming_split(1)[0]  # what ray.train.get_dataset_shard hands a Train worker
    assert sum(len(b["label"]) for b in shard.iter_batches(batch_size=3)) == 4

    with pytest.raises(Exception, match="cannot decode image .*junk.png"):
        ray_dataset(m, "train", 8, corrupt_images="fail").take_all()
