"""Manifest CSV: round trip and every bad-input case, reported before any training starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from craft_ray.data.manifest import read_manifest, write_manifest
from craft_ray.errors import UserError


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
        names.append(f"{folder.name}/{i}.png")
    return names


def test_round_trip_keeps_rows_splits_and_metadata(tmp_path: Path) -> None:
    names = _images(tmp_path / "img", 3)
    rows = [
        {"path": names[0], "label": "nevus", "split": "train", "diameter": 0.3},
        {"path": names[1], "label": "melanoma", "split": "val", "diameter": 0.45},
        {"path": names[2], "label": "bcc", "split": "test", "diameter": 0.25},
    ]
    out = write_manifest(tmp_path / "manifest.csv", rows)
    assert out.read_text().splitlines()[0] == "path,label,split,diameter"
    m = read_manifest(out, "derm", "phantom")
    assert [r.label for r in m.rows] == ["nevus", "melanoma", "bcc"]
    assert [r.path for r in m.rows] == [(tmp_path / n).resolve() for n in names]
    assert [r.meta["diameter"] for r in m.rows] == ["0.3", "0.45", "0.25"]
    assert [r.label for r in m.split("val")] == ["melanoma"]
    assert m.counts() == {"nevus": 1, "melanoma": 1, "bcc": 1}
    assert m.label_index("bcc") == 2


def test_without_split_column_every_split_is_all_rows(tmp_path: Path) -> None:
    names = _images(tmp_path / "img", 2)
    out = write_manifest(tmp_path / "m.csv", [{"path": n, "label": "normal"} for n in names])
    m = read_manifest(out, "histo")
    assert len(m.split("train")) == 2 and len(m.split("test")) == 2
    with pytest.raises(UserError, match="unknown split 'dev'"):
        m.split("dev")


def test_missing_files_are_counted_and_the_first_rows_named(tmp_path: Path) -> None:
    names = _images(tmp_path / "img", 1)
    rows = [{"path": names[0], "label": "normal"}] + [{"path": f"img/gone{i}.png", "label": "normal"} for i in range(7)]
    out = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(UserError) as err:
        read_manifest(out, "histo")
    msg = str(err.value)
    assert "7 row(s) whose image file is missing" in msg
    assert "line 3: 'img/gone0.png'" in msg and "line 7: 'img/gone4.png'" in msg
    assert "gone5" not in msg and msg.rstrip().endswith("paths are relative to the manifest's folder")
    assert read_manifest(out, "histo", check_files=False).rows[1].label == "normal"


def test_unknown_labels_name_count_rows_and_known_labels(tmp_path: Path) -> None:
    names = _images(tmp_path / "img", 3)
    rows = [{"path": names[0], "label": "pneumonia"}, {"path": names[1], "label": "cardiomegaly"},
            {"path": names[2], "label": "Edema"}]
    out = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(UserError) as err:
        read_manifest(out, "cxr", "chexpert")
    msg = str(err.value)
    assert "2 row(s) with unknown labels for cxr/chexpert" in msg
    assert "line 2: 'pneumonia'" in msg and "line 4: 'Edema'" in msg
    assert "known labels: no_finding, cardiomegaly" in msg


def test_missing_column_names_it_and_what_was_found(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("file,label\na.png,normal\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) path; found: file, label; required: path,label"):
        read_manifest(csv, "histo")


def test_bad_split_and_empty_and_absent_manifests(tmp_path: Path) -> None:
    names = _images(tmp_path / "img", 1)
    out = write_manifest(tmp_path / "m.csv", [{"path": names[0], "label": "normal", "split": "dev"}])
    with pytest.raises(UserError, match=r"1 row\(s\) with an unknown split: line 2: 'dev'"):
        read_manifest(out, "histo")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(UserError, match="has a header but no rows"):
        read_manifest(tmp_path / "empty.csv", "histo")
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path / "nope.csv", "histo")
    with pytest.raises(UserError, match="empty manifest"):
        write_manifest(tmp_path / "x.csv", [])
    with pytest.raises(UserError, match="unknown dataset 'mimic'"):
        read_manifest(out, "cxr", "mimic")
