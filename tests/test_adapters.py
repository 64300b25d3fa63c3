"""Adapters on small official-style layouts written here (CSV + a few tiny images), and their subcommands."""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from craft_ray.data import adapters
from craft_ray.data.adapters import (
    CHEXPERT_COLUMNS,
    add_adapter_commands,
    aptos2019,
    assign_splits,
    chexpert,
    ham10000,
    isic2019,
    nct_crc_he,
    odir5k,
    odir_label,
    parse_split,
)
from craft_ray.data.dataset import ImageDataset
from craft_ray.data.manifest import read_manifest
from craft_ray.errors import UserError


def _image(path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 4), 128 if mode == "L" else (200, 90, 60)).save(path)


def _csv(path: Path, header: list[str] | tuple[str, ...], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(header), restval="")
        w.writeheader()
        w.writerows(rows)


def _splits_by_group(manifest_path: Path, modality: str, dataset: str) -> dict[str, set[str]]:
    m = read_manifest(manifest_path, modality, dataset)
    out: dict[str, set[str]] = defaultdict(set)
    for r in m.rows:
        out[r.meta["group"]].add(r.split)
    return out


# ------------------------------------------------------------------------------------------------ splits


def test_parse_split_and_errors() -> None:
    assert parse_split("train=0.8,val=0.1,test=0.1") == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert parse_split("train=0.9,val=0.1") == {"train": 0.9, "val": 0.1}
    with pytest.raises(UserError, match="bad split entry 'dev=0.2'"):
        parse_split("train=0.8,dev=0.2")
    with pytest.raises(UserError, match="sum to 1"):
        parse_split("train=0.8,val=0.1")


def test_assign_splits_follows_fractions_and_keeps_groups_together() -> None:
    groups = [f"g{i // 2}" for i in range(2000)]  # 1000 groups of two rows
    strata = ["a" if i < 1200 else "b" for i in range(2000)]
    got = assign_splits(groups, strata, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert got == assign_splits(groups, strata, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert got != assign_splits(groups, strata, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=4)
    per_group = defaultdict(set)
    for g, s in zip(groups, got, strict=True):
        per_group[g].add(s)
    assert all(len(s) == 1 for s in per_group.values())
    for stratum, n in (("a", 1200), ("b", 800)):
        names = [s for s, st in zip(got, strata, strict=True) if st == stratum]
        assert names.count("train") == pytest.approx(0.8 * n, abs=2)
        assert names.count("val") == pytest.approx(0.1 * n, abs=2)
        assert names.count("test") == pytest.approx(0.1 * n, abs=2)


# ---------------------------------------------------------------------------------------------- CheXpert


def _chexpert_row(path: str, view: str = "Frontal", **obs: str) -> dict[str, str]:
    row = dict.fromkeys(CHEXPERT_COLUMNS, "")
    row.update({"Path": path, "Sex": "Female", "Age": "60", "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else ""})
    row.update({k.replace("_", " "): v for k, v in obs.items()})
    return row


def _chexpert_layout(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    p = "CheXpert-v1.0-small/train/patient{:05d}/study1/view{}_{}.jpg"
    train = [
        _chexpert_row(p.format(1, 1, "frontal"), Cardiomegaly="1.0"),
        _chexpert_row(p.format(1, 2, "lateral"), "Lateral", Cardiomegaly="1.0"),
        _chexpert_row(p.format(2, 1, "frontal"), No_Finding="1.0"),
        _chexpert_row(p.format(3, 1, "frontal"), Edema="1.0", Atelectasis="-1.0"),
        _chexpert_row(p.format(4, 1, "frontal"), Pneumothorax="-1.0", Cardiomegaly="0.0"),
        _chexpert_row(p.format(5, 1, "frontal"), Cardiomegaly="1.0", Pleural_Effusion="1.0"),
        _chexpert_row(p.format(6, 1, "frontal"), Pneumonia="1.0"),
        _chexpert_row(p.format(7, 1, "frontal"), Pleural_Effusion="1.0", Support_Devices="1.0"),
    ]
    v = "CheXpert-v1.0-small/valid/patient{:05d}/study1/view1_{}.jpg"
    valid = [_chexpert_row(v.format(64541, "frontal"), Lung_Lesion="1.0"),
             _chexpert_row(v.format(64542, "lateral"), "Lateral", No_Finding="1.0")]
    _csv(root / "train.csv", CHEXPERT_COLUMNS, train)
    _csv(root / "valid.csv", CHEXPERT_COLUMNS, valid)
    for r in train + valid:
        _image(tmp_path / r["Path"], "L")
    return root


def _by_file(manifest_path: Path, dataset: str, modality: str) -> dict[str, tuple[str, str]]:
    m = read_manifest(manifest_path, modality, dataset)
    return {"/".join(r.path.parts[-3:]): (r.label, r.split) for r in m.rows}


@pytest.mark.parametrize(
    ("policy", "extra"),
    [
        ("ignore", {}),
        ("zeros", {"patient00003/study1/view1_frontal.jpg": "edema"}),
        ("ones", {"patient00004/study1/view1_frontal.jpg": "pneumothorax"}),
    ],
)
def test_chexpert_uncertain_policies_single_label_and_valid_as_test(tmp_path: Path, policy: str, extra: dict) -> None:
    root = _chexpert_layout(tmp_path)
    report = chexpert(root, tmp_path / "out" / "manifest.csv", uncertain=policy)
    got = _by_file(report.manifest, "chexpert", "cxr")
    want = {
        "patient00001/study1/view1_frontal.jpg": "cardiomegaly",
        "patient00002/study1/view1_frontal.jpg": "no_finding",
        "patient00007/study1/view1_frontal.jpg": "pleural_effusion",
        "patient64541/study1/view1_frontal.jpg": "lung_lesion",
        **extra,
    }
    assert {k: lab for k, (lab, _) in got.items()} == want
    assert got["patient64541/study1/view1_frontal.jpg"][1] == "test"
    assert {s for k, (_, s) in got.items() if "64541" not in k} <= {"train", "val"}
    assert report.dropped["lateral"] == 2
    assert report.dropped["multi_label"] == (2 if policy == "ones" else 1)
    # Paths are relative to the manifest's folder, whatever the CSV's "CheXpert-v1.0-small/" prefix says.
    first = (tmp_path / "out" / "manifest.csv").read_text().splitlines()[1]
    assert first.startswith("../CheXpert-v1.0-small/train/patient")


def test_chexpert_lateral_views_and_patient_grouping(tmp_path: Path) -> None:
    root = _chexpert_layout(tmp_path)
    report = chexpert(root, tmp_path / "m.csv", frontal_only=False, split={"train": 0.5, "val": 0.5})
    got = _by_file(report.manifest, "chexpert", "cxr")
    assert got["patient00001/study1/view2_lateral.jpg"][0] == "cardiomegaly"
    assert got["patient64542/study1/view1_lateral.jpg"] == ("no_finding", "test")
    groups = _splits_by_group(report.manifest, "cxr", "chexpert")
    assert groups["patient00001"] in ({"train"}, {"val"})
    item = ImageDataset(read_manifest(report.manifest, "cxr", "chexpert"), "test", 4)[0]  # adapter -> training item
    assert item["prompt"] == "a chest x-ray showing a lung lesion" and item["pixels"].shape == (3, 4, 4)
    with pytest.raises(UserError, match="valid.csv is the test split already"):
        chexpert(root, tmp_path / "m.csv", split={"train": 0.8, "val": 0.1, "test": 0.1})


def test_chexpert_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a directory"):
        chexpert(tmp_path / "nowhere", tmp_path / "m.csv")
    root = _chexpert_layout(tmp_path)
    (tmp_path / "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg").unlink()
    with pytest.raises(UserError) as err:
        chexpert(root, tmp_path / "m.csv")
    assert "1 image(s) referenced by the chexpert annotations are missing: train.csv line 4:" in str(err.value)
    assert "--skip-missing" in str(err.value)
    report = chexpert(root, tmp_path / "m.csv", skip_missing=True)
    assert report.dropped["missing_image"] == 1 and report.total() == 3
    with pytest.raises(UserError, match="unknown uncertain policy 'maybe'"):
        chexpert(root, tmp_path / "m.csv", uncertain="maybe")
    (root / "valid.csv").unlink()
    with pytest.raises(UserError, match=r"CheXpert valid.csv .*valid.csv' not found; expected the official CSV with columns Path,Sex"):
        chexpert(root, tmp_path / "m.csv")
    _csv(root / "valid.csv", ["Path", "Sex"], [{"Path": "x.jpg", "Sex": "Male"}])
    with pytest.raises(UserError) as err:
        chexpert(root, tmp_path / "m.csv")
    assert "lacks column(s) Age, Frontal/Lateral" in str(err.value) and "found: Path, Sex" in str(err.value)


# ---------------------------------------------------------------------------------------- HAM10000 / ISIC


def _ham_layout(tmp_path: Path) -> Path:
    root = tmp_path / "ham"
    rows = []
    n = 0
    for dx, lesions in (("nv", 20), ("mel", 6), ("bcc", 3), ("akiec", 2), ("bkl", 2), ("df", 1), ("vasc", 1)):
        for lesion in range(lesions):
            for _ in range(2):  # two images of every lesion
                image_id = f"ISIC_{n:07d}"
                rows.append({"lesion_id": f"HAM_{dx}{lesion:05d}", "image_id": image_id, "dx": dx, "dx_type": "histo",
                             "age": "50.0", "sex": "male", "localization": "back"})
                part = 1 if n % 2 else 2
                _image(root / f"HAM10000_images_part_{part}" / f"{image_id}.jpg")
                n += 1
    _csv(root / "HAM10000_metadata.csv", adapters.HAM10000_COLUMNS, rows)
    return root


def test_ham10000_maps_dx_and_splits_by_lesion(tmp_path: Path) -> None:
    root = _ham_layout(tmp_path)
    report = ham10000(root, tmp_path / "m.csv", seed=1)
    assert report.total() == 70
    assert report.counts["train"]["nevus"] == 32 and report.counts["val"]["nevus"] == 4
    assert report.counts["test"]["nevus"] == 4
    assert sum(per.get("vascular_lesion", 0) for per in report.counts.values()) == 2
    groups = _splits_by_group(report.manifest, "derm", "ham10000")
    assert len(groups) == 35 and all(len(s) == 1 for s in groups.values())
    m = read_manifest(report.manifest, "derm", "ham10000")
    assert {r.path.parent.name for r in m.rows} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    again = ham10000(root, tmp_path / "m2.csv", seed=1)
    assert (tmp_path / "m.csv").read_text() == (tmp_path / "m2.csv").read_text().replace("m2.csv", "m.csv")
    assert again.counts == report.counts


def test_ham10000_reads_dataverse_tab_metadata(tmp_path: Path) -> None:
    root = _ham_layout(tmp_path)
    text = (root / "HAM10000_metadata.csv").read_text().replace(",", "\t")
    (root / "HAM10000_metadata.csv").unlink()
    (root / "HAM10000_metadata.tab").write_text(text)
    assert ham10000(root, tmp_path / "m.csv").total() == 70


def test_ham10000_bad_inputs(tmp_path: Path) -> None:
    root = _ham_layout(tmp_path)
    with (root / "HAM10000_metadata.csv").open("a") as fh:
        fh.write("HAM_x,ISIC_9999999,scc,histo,50,male,back\n")
    with pytest.raises(UserError, match=r"1 row\(s\) with an unknown dx code: line 72: 'scc'; known: nv, mel"):
        ham10000(root, tmp_path / "m.csv")
    (root / "HAM10000_metadata.csv").unlink()
    with pytest.raises(UserError, match="HAM10000_metadata.csv' not found; expected the official CSV with columns lesion_id,image_id,dx"):
        ham10000(root, tmp_path / "m.csv")


def test_isic2019_one_hot_unk_and_lesion_groups(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    header = adapters.ISIC2019_COLUMNS
    rows, meta = [], []
    for i, code in enumerate(["MEL", "NV", "NV", "SCC", "UNK", "AK", "VASC"]):
        name = f"ISIC_{i:07d}"
        rows.append({**{c: "0.0" for c in header[1:]}, "image": name, code: "1.0"})
        meta.append({"image": name, "lesion_id": "L1" if code == "NV" else ""})
        _image(root / "ISIC_2019_Training_Input" / "ISIC_2019_Training_Input" / f"{name}.jpg")
    _csv(root / "ISIC_2019_Training_GroundTruth.csv", header, rows)
    _csv(root / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "lesion_id"], meta)
    report = isic2019(root, tmp_path / "m.csv")
    m = read_manifest(report.manifest, "derm", "isic2019")
    assert [r.label for r in m.rows] == ["melanoma", "nevus", "nevus", "scc", "actinic_keratosis", "vascular_lesion"]
    assert report.dropped == {"unknown_class": 1}
    assert [r.meta["group"] for r in m.rows][1:3] == ["L1", "L1"] and m.rows[1].split == m.rows[2].split
    rows.append({**{c: "0.0" for c in header[1:]}, "image": "ISIC_bad", "MEL": "1.0", "NV": "1.0"})
    _csv(root / "ISIC_2019_Training_GroundTruth.csv", header, rows)
    with pytest.raises(UserError, match=r"1 row\(s\) are not one-hot .*line 9: 'ISIC_bad' has 2 positive classes"):
        isic2019(root, tmp_path / "m.csv")


# ------------------------------------------------------------------------------------------------- fundus


@pytest.mark.parametrize(
    ("keywords", "want"),
    [
        ("normal fundus", ("normal", "")),
        ("moderate non proliferative retinopathy，lens dust", ("diabetic_retinopathy", "")),
        ("mild nonproliferative retinopathy", ("diabetic_retinopathy", "")),
        ("proliferative diabetic retinopathy", ("diabetic_retinopathy", "")),
        ("hypertensive retinopathy", ("hypertension", "")),
        ("suspected glaucoma", ("glaucoma", "")),
        ("cataract", ("cataract", "")),
        ("wet age-related macular degeneration", ("amd", "")),
        ("pathological myopia", ("myopia", "")),
        ("cataract，moderate non proliferative retinopathy", (None, "multi_label")),
        ("drusen", (None, "other_finding")),
        ("no fundus image", (None, "not_fundus")),
        ("lens dust", (None, "no_keyword")),
    ],
)
def test_odir_keywords_to_single_labels(keywords: str, want: tuple) -> None:
    assert odir_label(keywords) == want


def test_odir5k_per_eye_rows_grouped_by_patient(tmp_path: Path) -> None:
    root = tmp_path / "odir"
    header = ["ID", "Patient Age", "Patient Sex", *adapters.ODIR_COLUMNS, *"NDGCAHMO"]
    eyes = [("normal fundus", "normal fundus"), ("cataract", "normal fundus"),
            ("moderate non proliferative retinopathy", "drusen"), ("glaucoma", "lens dust，glaucoma")]
    rows = []
    for pid, (left, right) in enumerate(eyes):
        rows.append({"ID": str(pid), "Left-Fundus": f"{pid}_left.jpg", "Right-Fundus": f"{pid}_right.jpg",
                     "Left-Diagnostic Keywords": left, "Right-Diagnostic Keywords": right})
        for side in ("left", "right"):
            _image(root / "ODIR-5K_Training_Dataset" / f"{pid}_{side}.jpg")
    (root / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"only as a spreadsheet .*export it to CSV .*--annotations"):
        odir5k(root, tmp_path / "m.csv")
    _csv(tmp_path / "annotations.csv", header, rows)
    report = odir5k(root, tmp_path / "m.csv", annotations=tmp_path / "annotations.csv")
    m = read_manifest(report.manifest, "fundus", "odir5k")
    assert [(r.path.name, r.label) for r in m.rows] == [
        ("0_left.jpg", "normal"), ("0_right.jpg", "normal"), ("1_left.jpg", "cataract"),
        ("1_right.jpg", "normal"), ("2_left.jpg", "diabetic_retinopathy"), ("3_left.jpg", "glaucoma"),
        ("3_right.jpg", "glaucoma"),
    ]
    assert report.dropped == {"other_finding": 1}
    assert all(len(s) == 1 for s in _splits_by_group(report.manifest, "fundus", "odir5k").values())
    _csv(tmp_path / "bad.csv", ["ID", "Left-Fundus"], [{"ID": "0", "Left-Fundus": "0_left.jpg"}])
    with pytest.raises(UserError, match=r"lacks column\(s\) Right-Fundus, Left-Diagnostic Keywords"):
        odir5k(root, tmp_path / "m.csv", annotations=tmp_path / "bad.csv")


def test_aptos2019_grades_missing_images_and_bad_grades(tmp_path: Path) -> None:
    root = tmp_path / "aptos"
    rows = [{"id_code": f"{i:012x}", "diagnosis": str(i % 5)} for i in range(10)]
    _csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    for r in rows[:9]:
        _image(root / "train_images" / f"{r['id_code']}.png")
    with pytest.raises(UserError, match=r"1 image\(s\) referenced by the aptos2019 annotations are missing: train.csv line 11"):
        aptos2019(root, tmp_path / "m.csv")
    report = aptos2019(root, tmp_path / "m.csv", skip_missing=True)
    m = read_manifest(report.manifest, "fundus", "aptos2019")
    assert [r.label for r in m.rows[:5]] == ["normal", "mild_dr", "moderate_dr", "severe_dr", "proliferative_dr"]
    assert report.dropped == {"missing_image": 1} and len(m.rows) == 9
    _csv(root / "train.csv", ["id_code", "diagnosis"], [*rows[:9], {"id_code": "x", "diagnosis": "7"}])
    with pytest.raises(UserError, match=r"1 row\(s\) with a diagnosis outside 0-4: line 11: '7'"):
        aptos2019(root, tmp_path / "m.csv")


# ------------------------------------------------------------------------------------------------- histo


def test_nct_crc_he_folders_and_test_root(tmp_path: Path) -> None:
    train_root, test_root = tmp_path / "NCT-CRC-HE-100K", tmp_path / "CRC-VAL-HE-7K"
    for code in ("ADI", "LYM", "TUM"):
        for i in range(10):
            _image(train_root / code / f"{code}-TRAIN{i}.tif")
        _image(test_root / code / f"{code}-VAL0.tif")
    (train_root / "TUM" / "notes.txt").write_text("not an image")
    report = nct_crc_he(train_root, tmp_path / "m.csv", test_root=test_root)
    m = read_manifest(report.manifest, "histo", "nct_crc_he")
    assert len(m.rows) == 33
    assert sorted(r.path.name for r in m.split("test")) == ["ADI-VAL0.tif", "LYM-VAL0.tif", "TUM-VAL0.tif"]
    assert {r.split for r in m.rows if r.path.parent.parent == train_root} == {"train", "val"}
    assert m.counts()["lymphocytes"] == 11 and m.counts()["adipose"] == 11 and m.counts()["mucus"] == 0
    assert report.counts["val"] == {"adipose": 1, "lymphocytes": 1, "tumor": 1}
    assert any("BACK DEB MUC MUS NORM STR absent" in n for n in report.notes)
    report = nct_crc_he(train_root, tmp_path / "m.csv")
    assert report.total() == 30 and report.counts["test"] == {"adipose": 1, "lymphocytes": 1, "tumor": 1}
    with pytest.raises(UserError, match="no NCT-CRC-HE class folders in .*expected sub-folders ADI BACK DEB"):
        nct_crc_he(tmp_path / "CRC-VAL-HE-7K" / "ADI", tmp_path / "m.csv")


# --------------------------------------------------------------------------------------------------- CLI


def test_subcommands_call_the_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="craft_ray.data")
    add_adapter_commands(parser.add_subparsers(dest="command", required=True))
    root = _chexpert_layout(tmp_path)
    out = tmp_path / "cx.csv"
    ns = parser.parse_args(["chexpert", "--root", str(root), "--out", str(out), "--uncertain", "ones",
                            "--split", "train=0.5,val=0.5", "--seed", "2"])
    assert ns.func(ns) == 0
    printed = capsys.readouterr().out
    assert f"wrote 5 rows to {out}" in printed and "left out:" in printed
    assert len(read_manifest(out, "cxr", "chexpert").rows) == 5
    ns = parser.parse_args(["chexpert", "--root", str(root), "--out", str(out), "--include-lateral"])
    assert ns.func(ns) == 0 and len(read_manifest(out, "cxr", "chexpert").rows) == 6

    ham = _ham_layout(tmp_path)
    ns = parser.parse_args(["ham10000", "--root", str(ham), "--out", str(tmp_path / "ham.csv")])
    assert ns.func(ns) == 0 and len(read_manifest(tmp_path / "ham.csv", "derm", "ham10000").rows) == 70
    for name in ("isic2019", "odir5k", "aptos2019", "nct_crc_he"):
        ns = parser.parse_args([name, "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "x.csv")])
        with pytest.raises(UserError, match="is not a directory"):
            ns.func(ns)
    with pytest.raises(UserError, match="must be non-negative and sum to 1"):
        parser.parse_args(["aptos2019", "--root", "r", "--out", "o", "--split", "train=2"])
