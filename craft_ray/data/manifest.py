"""One manifest format for every dataset: a CSV with ``path,label[,split]`` plus optional metadata.

Paths are relative to the CSV's folder (absolute paths are accepted too). Labels are validated
against the label set of (modality, dataset) in :mod:`craft_ray.modalities`. Extra columns
(e.g. the phantom world's ground-truth feature values) are kept as strings in ``Row.meta``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from craft_ray.errors import UserError
from craft_ray.modalities import get_modality

REQUIRED_COLUMNS = ("path", "label")
SPLITS = ("train", "val", "test")
_SHOW = 5  # bad rows quoted in an error message


@dataclass(frozen=True)
class Row:
    """One manifest entry; ``path`` is absolute after reading."""

    path: Path
    label: str
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Manifest:
    """The validated rows of one manifest file with its label set."""

    csv_path: Path
    modality: str
    dataset: str
    labels: list[str]
    rows: list[Row]

    def split(self, name: str) -> list[Row]:
        """Rows of one split (``train``/``val``/``test``); all rows when the manifest has no split column."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        if all(r.split is None for r in self.rows):
            return list(self.rows)
        return [r for r in self.rows if r.split == name]

    def label_index(self, label: str) -> int:
        """Class index of ``label`` (its position in the dataset's label set)."""
        return self.labels.index(label)

    def counts(self) -> dict[str, int]:
        """Number of rows per label."""
        out = dict.fromkeys(self.labels, 0)
        for r in self.rows:
            out[r.label] += 1
        return out


def write_manifest(out_csv: str | Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write rows (dicts with ``path`` relative to the CSV, ``label``, optional ``split`` and extras)."""
    out_csv = Path(out_csv)
    rows = list(rows)
    if not rows:
        raise UserError(f"refusing to write an empty manifest {str(out_csv)!r}")
    extra: list[str] = []
    for r in rows:
        for key in r:
            if key not in REQUIRED_COLUMNS and key != "split" and key not in extra:
                extra.append(key)
    header = list(REQUIRED_COLUMNS) + (["split"] if any("split" in r for r in rows) else []) + extra
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(v) for k, v in r.items()})
    return out_csv


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def _bad(csv_path: Path, problem: str, bad: list[str], fix: str) -> UserError:
    shown = "; ".join(bad[:_SHOW]) + (" ..." if len(bad) > _SHOW else "")
    return UserError(f"manifest {str(csv_path)!r}: {len(bad)} {problem}: {shown}; {fix}")


def read_manifest(
    csv_path: str | Path, modality: str, dataset: str = "phantom", *, check_files: bool = True
) -> Manifest:
    """Read and validate a manifest; every problem is reported before any training starts."""
    csv_path = Path(csv_path).resolve()
    labels = get_modality(modality).label_names(dataset)
    if not csv_path.is_file():
        raise UserError(f"manifest {str(csv_path)!r} not found; write one with `python -m craft_ray.data ...`")
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"manifest {str(csv_path)!r} lacks column(s) {', '.join(missing)}; "
                f"found: {', '.join(header) or '(empty header)'}; required: path,label[,split]"
            )
        raw = list(reader)
    if not raw:
        raise UserError(f"manifest {str(csv_path)!r} has a header but no rows")

    rows: list[Row] = []
    unknown: list[str] = []
    bad_split: list[str] = []
    absent: list[str] = []
    root = csv_path.parent
    for lineno, rec in enumerate(raw, start=2):  # line 1 is the header
        label = (rec.get("label") or "").strip()
        split = (rec.get("split") or "").strip() or None
        path = Path((rec.get("path") or "").strip())
        full = path if path.is_absolute() else root / path
        if label not in labels:
            unknown.append(f"line {lineno}: {label!r}")
        if split is not None and split not in SPLITS:
            bad_split.append(f"line {lineno}: {split!r}")
        if check_files and (not str(path) or not full.is_file()):
            absent.append(f"line {lineno}: {str(path)!r}")
        meta = {k: v for k, v in rec.items() if k not in ("path", "label", "split") and k is not None}
        rows.append(Row(path=full, label=label, split=split, meta=meta))
    if unknown:
        raise _bad(csv_path, f"row(s) with unknown labels for {modality}/{dataset}", unknown,
                   f"known labels: {', '.join(labels)}")
    if bad_split:
        raise _bad(csv_path, "row(s) with an unknown split", bad_split, f"known splits: {', '.join(SPLITS)}")
    if absent:
        raise _bad(csv_path, "row(s) whose image file is missing", absent,
                   "paths are relative to the manifest's folder")
    return Manifest(csv_path=csv_path, modality=modality, dataset=dataset, labels=labels, rows=rows)
