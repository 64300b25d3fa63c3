"""Adapters: the official layouts of public medical datasets -> one manifest CSV (path,label,split,group).

Each adapter is a pure function ``<dataset>(root, out, ...) -> AdapterReport`` plus a subcommand of
``python -m craft_ray.data`` (see :func:`add_adapter_commands`). Splits are drawn with a seed, grouped
by patient or lesion wherever the dataset says which images belong together (so one patient never
spans train and test), and stratified by label. Where a dataset ships an official held-out set
(CheXpert ``valid.csv``, NCT-CRC-HE's CRC-VAL-HE-7K) it becomes the ``test`` split and the
fractions split the official training set into ``train``/``val`` only.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from craft_ray.data.manifest import SPLITS, write_manifest
from craft_ray.errors import UserError
from craft_ray.modalities import get_modality

DEFAULT_SPLIT: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
HELDOUT_SPLIT: dict[str, float] = {"train": 0.9, "val": 0.1}  # datasets whose official held-out set is test
_SHOW = 5  # bad rows quoted in an error message
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class AdapterReport:
    """What an adapter wrote: the manifest, rows per split and label, and rows left out (by reason)."""

    manifest: Path
    counts: dict[str, dict[str, int]]  # split -> label -> rows (labels with rows only)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out
    notes: list[str] = field(default_factory=list)  # facts a user should know (e.g. classes absent)

    def total(self) -> int:
        """Number of rows written."""
        return sum(sum(per.values()) for per in self.counts.values())

    def summary(self) -> str:
        """Human-readable multi-line summary for the CLI."""
        lines = [f"wrote {self.total()} rows to {self.manifest}"]
        for split, per in self.counts.items():
            shown = ", ".join(f"{lab}={n}" for lab, n in per.items())
            lines.append(f"  {split}: {sum(per.values())} ({shown})")
        if self.dropped:
            lines.append("  left out: " + ", ".join(f"{why}={n}" for why, n in sorted(self.dropped.items())))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class _Item:
    """One image found by an adapter, before splitting."""

    image: Path  # absolute path
    label: str
    group: str  # images sharing a group (patient, lesion) always land in the same split
    where: str  # origin for messages, e.g. "train.csv line 12"
    split: str | None = None  # fixed by the dataset (official held-out set); None = drawn by fraction


# ---------------------------------------------------------------------------------------------- splits


def parse_split(text: str) -> dict[str, float]:
    """Parse ``train=0.8,val=0.1,test=0.1`` into fractions that sum to 1."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SPLITS:
            raise UserError(f"bad split entry {part!r} in {text!r}; expected e.g. train=0.8,val=0.1,test=0.1")
        try:
            out[name] = float(value)
        except ValueError:
            raise UserError(f"bad split fraction {value!r} for {name} in {text!r}; expected a number") from None
    return check_split(out)


def check_split(fractions: dict[str, float]) -> dict[str, float]:
    """Validate split fractions: known names, non-negative, summing to 1."""
    bad = [k for k in fractions if k not in SPLITS]
    if bad:
        raise UserError(f"unknown split(s) {', '.join(bad)}; known: {', '.join(SPLITS)}")
    if any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise UserError(f"split fractions {fractions} must be non-negative and sum to 1")
    return {k: float(fractions[k]) for k in SPLITS if fractions.get(k, 0.0) > 0}


def assign_splits(
    groups: Sequence[str], strata: Sequence[str], fractions: dict[str, float], seed: int
) -> list[str]:
    """Split name per row: whole groups go to one split; within each stratum, rows follow the fractions.

    A group belongs to the stratum of its first row. Groups are shuffled with ``seed`` and laid end to
    end; each lands in the split whose cumulative-fraction interval holds its row-count midpoint.
    """
    fractions = check_split(fractions)
    names = list(fractions)
    bounds = []
    acc = 0.0
    for name in names[:-1]:
        acc += fractions[name]
        bounds.append(acc)
    size: Counter[str] = Counter(groups)
    stratum_groups: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for g, s in zip(groups, strata, strict=True):
        if g not in seen:
            seen.add(g)
            stratum_groups[s].append(g)
    rng = random.Random(seed)
    split_of: dict[str, str] = {}
    for stratum in sorted(stratum_groups):
        members = sorted(stratum_groups[stratum])
        rng.shuffle(members)
        total = sum(size[g] for g in members)
        cum = 0
        for g in members:
            mid = (cum + size[g] / 2) / total
            split_of[g] = names[bisect.bisect_right(bounds, mid)]
            cum += size[g]
    return [split_of[g] for g in groups]


# ------------------------------------------------------------------------------------------ CSV helpers


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """Rows of an official CSV as (line number, record); names the file and columns when it is wrong."""
    expected = ",".join(required)
    if path.suffix.lower() in (".xlsx", ".xls"):
        raise UserError(
            f"{what} {str(path)!r} is a spreadsheet; export it to CSV (columns {expected}) and pass the .csv file"
        )
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} not found; expected the official CSV with columns {expected}")
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: exports from Excel start with a BOM
        first = fh.readline()
        fh.seek(0)
        # Harvard Dataverse serves tables as tab-separated .tab files; everything else is comma-separated.
        reader = csv.DictReader(fh, delimiter="\t" if "\t" in first and "," not in first else ",")
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(
                f"{what} {str(path)!r} lacks column(s) {', '.join(missing)}; expected columns {expected}; "
                f"found: {', '.join(header) or '(empty header)'}"
            )
        return [(n, {k: (v or "").strip() for k, v in rec.items() if k}) for n, rec in enumerate(reader, start=2)]


def _need_dir(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"{what} root {str(root)!r} is not a directory; pass the folder of the official download")
    return root


def _first_existing(dirs: Sequence[Path], name: str) -> Path:
    """``dir/name`` in the first dir holding it, else in the first dir (reported as missing later)."""
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return dirs[0] / name


def _show(bad: list[str]) -> str:
    return "; ".join(bad[:_SHOW]) + (" ..." if len(bad) > _SHOW else "")


def _finish(
    items: list[_Item],
    out: str | Path,
    *,
    modality: str,
    dataset: str,
    fractions: dict[str, float],
    seed: int,
    skip_missing: bool,
    dropped: Counter[str],
    notes: list[str] | None = None,
) -> AdapterReport:
    """Check files, draw splits, write the manifest with paths relative to it, and report."""
    out = Path(out).expanduser().absolute()
    absent = [it for it in items if not it.image.is_file()]
    if absent and not skip_missing:
        raise UserError(
            f"{len(absent)} image(s) referenced by the {dataset} annotations are missing: "
            + _show([f"{it.where}: {str(it.image)!r}" for it in absent])
            + "; complete the download or pass --skip-missing to leave them out"
        )
    if absent:
        dropped["missing_image"] += len(absent)
        gone = {id(it) for it in absent}
        items = [it for it in items if id(it) not in gone]
    if not items:
        why = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "none found"
        raise UserError(f"no {dataset} images left to write (left out: {why}); check --root and the options")

    labels = get_modality(modality).label_names(dataset)
    free = [it for it in items if it.split is None]
    if free:
        drawn = assign_splits([it.group for it in free], [it.label for it in free], fractions, seed)
        for it, name in zip(free, drawn, strict=True):
            it.split = name
    rows = []
    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(labels, 0) for s in SPLITS}
    for it in items:
        rel = os.path.relpath(it.image, out.parent)
        rows.append({"path": Path(rel).as_posix(), "label": it.label, "split": it.split, "group": it.group})
        counts[it.split][it.label] += 1
    write_manifest(out, rows)
    counts = {s: {lab: n for lab, n in per.items() if n} for s, per in counts.items() if sum(per.values())}
    return AdapterReport(manifest=out, counts=counts, dropped=dict(dropped), notes=list(notes or []))


def _fractions(split: dict[str, float] | None, default: dict[str, float], heldout: str | None) -> dict[str, float]:
    """Fractions for the drawn rows; with an official held-out set the test fraction must be 0."""
    fractions = check_split(dict(split if split is not None else default))
    if heldout and fractions.get("test", 0.0) > 0:
        raise UserError(
            f"{heldout} is the test split already; pass fractions for train and val only, e.g. train=0.9,val=0.1"
        )
    return fractions


# ------------------------------------------------------------------------------------------------ CheXpert

CHEXPERT_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip
# Our chexpert label -> the CheXpert observation column it is read from.
CHEXPERT_OBSERVATIONS: dict[str, str] = {
    "no_finding": "No Finding",
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural Effusion",
    "lung_lesion": "Lung Lesion",
    "edema": "Edema",
    "consolidation": "Consolidation",
    "atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax",
}
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


def _chexpert_value(raw: str, policy: str) -> float | None:
    """1.0 / 0.0 for an observation cell, or None when the row must be dropped (uncertain, ignore)."""
    if raw == "":
        return 0.0  # blank = not mentioned in the report
    value = float(raw)
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0, "ignore": None}[policy]
    return value


def _chexpert_image(root: Path, rel: str) -> Path:
    # Path reads "CheXpert-v1.0-small/train/patient.../view1_frontal.jpg", relative to root's parent;
    # dropping the first component lets the dataset folder carry any name.
    parts = Path(rel).parts
    if parts and parts[0].lower().startswith("chexpert"):
        return root.joinpath(*parts[1:])
    return root / rel


def chexpert(
    root: str | Path,
    out: str | Path,
    *,
    split: dict[str, float] | None = None,
    seed: int = 0,
    frontal_only: bool = True,
    uncertain: str = "ignore",
    skip_missing: bool = False,
) -> AdapterReport:
    """CheXpert(-small): ``train.csv`` -> train/val by patient, ``valid.csv`` -> test; single-label rows only.

    A row is kept when exactly one of the used observations (CHEXPERT_OBSERVATIONS) is positive after the
    uncertain policy: ``ones`` reads -1 as positive, ``zeros`` as negative, ``ignore`` drops the row
    (default: conditioning on uncertain labels would teach the generator ambiguous images).
    ``valid.csv`` is the radiologist-labelled set, hence the held-out ``test`` split (CAS reference).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise UserError(f"unknown uncertain policy {uncertain!r}; known: {', '.join(UNCERTAIN_POLICIES)}")
    root = _need_dir(root, "CheXpert")
    fractions = _fractions(split, HELDOUT_SPLIT, "CheXpert valid.csv")
    items: list[_Item] = []
    dropped: Counter[str] = Counter()
    for name, fixed in (("train.csv", None), ("valid.csv", "test")):
        for lineno, rec in _read_csv(root / name, CHEXPERT_COLUMNS, f"CheXpert {name}"):
            if frontal_only and rec["Frontal/Lateral"].lower() != "frontal":
                dropped["lateral"] += 1
                continue
            try:
                values = {lab: _chexpert_value(rec[col], uncertain) for lab, col in CHEXPERT_OBSERVATIONS.items()}
            except ValueError:
                raise UserError(
                    f"CheXpert {name} line {lineno}: observation values must be 1.0, 0.0, -1.0 or blank; "
                    f"got {[rec[c] for c in CHEXPERT_OBSERVATIONS.values()]}"
                ) from None
            if any(v is None for v in values.values()):
                dropped["uncertain"] += 1
                continue
            positive = [lab for lab, v in values.items() if v == 1.0]
            if len(positive) != 1:
                dropped["no_used_label" if not positive else "multi_label"] += 1
                continue
            parts = Path(rec["Path"]).parts
            patient = next((p for p in parts if p.startswith("patient")), rec["Path"])
            items.append(
                _Item(_chexpert_image(root, rec["Path"]), positive[0], patient, f"{name} line {lineno}", fixed)
            )
    return _finish(items, out, modality="cxr", dataset="chexpert", fractions=fractions, seed=seed,
                   skip_missing=skip_missing, dropped=dropped)


# ---------------------------------------------------------------------------------------- HAM10000 / ISIC

HAM10000_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
HAM10000_DX: dict[str, str] = {
    "nv": "nevus",
    "mel": "melanoma",
    "bcc": "bcc",
    "akiec": "actinic_keratosis",
    "bkl": "benign_keratosis",
    "df": "dermatofibroma",
    "vasc": "vascular_lesion",
}
HAM10000_METADATA = ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata")  # Kaggle, Dataverse
HAM10000_IMAGE_DIRS = (
    "HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images_part1", "HAM10000_images_part2",
    "ham10000_images_part_1", "ham10000_images_part_2", "HAM10000_images",
)  # fmt: skip


def ham10000(
    root: str | Path,
    out: str | Path,
    *,
    split: dict[str, float] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
) -> AdapterReport:
    """HAM10000: ``HAM10000_metadata.csv`` (or Dataverse's ``.tab``) + ``HAM10000_images_part_{1,2}/<image_id>.jpg``.

    Split by ``lesion_id``: several images show the same lesion and must not span train and test.
    """
    root = _need_dir(root, "HAM10000")
    fractions = _fractions(split, DEFAULT_SPLIT, None)
    csv_path = next((root / n for n in HAM10000_METADATA if (root / n).is_file()), root / HAM10000_METADATA[0])
    dirs = [root / d for d in HAM10000_IMAGE_DIRS if (root / d).is_dir()] + [root]
    items: list[_Item] = []
    unknown: list[str] = []
    for lineno, rec in _read_csv(csv_path, HAM10000_COLUMNS, "HAM10000 metadata"):
        label = HAM10000_DX.get(rec["dx"].lower())
        if label is None:
            unknown.append(f"line {lineno}: {rec['dx']!r}")
            continue
        image = _first_existing(dirs, f"{rec['image_id']}.jpg")
        items.append(_Item(image, label, rec["lesion_id"] or rec["image_id"], f"{csv_path.name} line {lineno}"))
    if unknown:
        raise UserError(
            f"{str(csv_path)!r}: {len(unknown)} row(s) with an unknown dx code: {_show(unknown)}; "
            f"known: {', '.join(HAM10000_DX)}"
        )
    return _finish(items, out, modality="derm", dataset="ham10000", fractions=fractions, seed=seed,
                   skip_missing=skip_missing, dropped=Counter())


ISIC2019_CLASSES: dict[str, str] = {
    "MEL": "melanoma",
    "NV": "nevus",
    "BCC": "bcc",
    "AK": "actinic_keratosis",
    "BKL": "benign_keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular_lesion",
    "SCC": "scc",
}
ISIC2019_COLUMNS = ("image", *ISIC2019_CLASSES, "UNK")


def isic2019(
    root: str | Path,
    out: str | Path,
    *,
    split: dict[str, float] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
) -> AdapterReport:
    """ISIC 2019: ``ISIC_2019_Training_GroundTruth.csv`` (one-hot) + ``ISIC_2019_Training_Input/<image>.jpg``.

    UNK rows are dropped. When ``ISIC_2019_Training_Metadata.csv`` is present its ``lesion_id`` groups
    the split (ISIC 2019 contains HAM10000, which has several images per lesion).
    """
    root = _need_dir(root, "ISIC 2019")
    fractions = _fractions(split, DEFAULT_SPLIT, None)
    csv_path = root / "ISIC_2019_Training_GroundTruth.csv"
    lesion: dict[str, str] = {}
    meta_path = root / "ISIC_2019_Training_Metadata.csv"
    if meta_path.is_file():
        lesion = {r["image"]: r["lesion_id"] for _, r in _read_csv(meta_path, ("image", "lesion_id"), "ISIC 2019 metadata")}
    top = root / "ISIC_2019_Training_Input"
    dirs = [d for d in (top / "ISIC_2019_Training_Input", top) if d.is_dir()] + [root]  # the zip nests one level
    items: list[_Item] = []
    dropped: Counter[str] = Counter()
    bad: list[str] = []
    for lineno, rec in _read_csv(csv_path, ISIC2019_COLUMNS, "ISIC 2019 ground truth"):
        try:
            hot = [code for code in (*ISIC2019_CLASSES, "UNK") if float(rec[code] or 0) == 1.0]
        except ValueError:
            bad.append(f"line {lineno}: {rec['image']!r}")
            continue
        if len(hot) != 1:
            bad.append(f"line {lineno}: {rec['image']!r} has {len(hot)} positive classes")
            continue
        if hot[0] == "UNK":
            dropped["unknown_class"] += 1
            continue
        group = lesion.get(rec["image"]) or rec["image"]
        image = _first_existing(dirs, f"{rec['image']}.jpg")
        items.append(_Item(image, ISIC2019_CLASSES[hot[0]], group, f"{csv_path.name} line {lineno}"))
    if bad:
        raise UserError(
            f"{str(csv_path)!r}: {len(bad)} row(s) are not one-hot over {', '.join(ISIC2019_COLUMNS[1:])}: "
            f"{_show(bad)}; expected exactly one 1.0 per row"
        )
    return _finish(items, out, modality="derm", dataset="isic2019", fractions=fractions, seed=seed,
                   skip_missing=skip_missing, dropped=dropped)


# ------------------------------------------------------------------------------------------------- ODIR-5K

ODIR_COLUMNS = ("Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords", "Right-Diagnostic Keywords")
ODIR_CSV_NAMES = ("full_df.csv", "data.csv", "ODIR-5K_Training_Annotations(Updated)_V2.csv")
ODIR_IMAGE_DIRS = (
    "ODIR-5K_Training_Dataset", "Training Images", "ODIR-5K/Training Images", "ODIR-5K/ODIR-5K/Training Images",
    "preprocessed_images",
)  # fmt: skip
# Keyword fragment -> label, checked in order ('hypertensive retinopathy' before the DR fragments).
ODIR_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("normal fundus", "normal"),
    ("hypertensive retinopathy", "hypertension"),
    ("diabetic retinopathy", "diabetic_retinopathy"),
    ("proliferative", "diabetic_retinopathy"),  # also matches "nonproliferative", "non proliferative"
    ("glaucoma", "glaucoma"),
    ("cataract", "cataract"),
    ("age-related macular degeneration", "amd"),
    ("myopi", "myopia"),
)
# Image-quality remarks that say nothing about disease.
ODIR_QUALITY = ("lens dust", "low image quality", "image offset", "optic disk photographically invisible")
ODIR_NOT_FUNDUS = ("no fundus image", "anterior segment image")


def odir_label(keywords: str) -> tuple[str | None, str]:
    """Per-eye label from ODIR diagnostic keywords: (label, '') or (None, reason it is left out)."""
    found: set[str] = set()
    other = False
    for kw in (k.strip().lower() for k in keywords.replace("\uff0c", ",").split(",")):
        if not kw or any(q in kw for q in ODIR_QUALITY):
            continue
        if any(q in kw for q in ODIR_NOT_FUNDUS):
            return None, "not_fundus"
        label = next((lab for frag, lab in ODIR_KEYWORDS if frag in kw), None)
        if label is None:
            other = True  # a finding outside our label set (drusen, epiretinal membrane, ...)
        else:
            found.add(label)
    if other:
        return None, "other_finding"
    if len(found) != 1:
        return None, "multi_label" if found else "no_keyword"
    return found.pop(), ""


def odir5k(
    root: str | Path,
    out: str | Path,
    *,
    annotations: str | Path | None = None,
    split: dict[str, float] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
) -> AdapterReport:
    """ODIR-5K: per-eye labels from the diagnostic keywords of the annotation CSV; split by patient.

    The official annotations are an .xlsx: export it to CSV (or use Kaggle's ``full_df.csv``). Eyes with
    more than one of our labels, or a finding outside them, are left out (single-label only).
    """
    root = _need_dir(root, "ODIR-5K")
    fractions = _fractions(split, DEFAULT_SPLIT, None)
    if annotations is not None:
        csv_path = Path(annotations).expanduser().absolute()
    else:
        found = [root / n for n in ODIR_CSV_NAMES if (root / n).is_file()]
        if not found:
            sheets = sorted(root.glob("*.xls*"))
            if sheets:
                raise UserError(
                    f"ODIR-5K annotations found only as a spreadsheet ({sheets[0].name}); export it to CSV "
                    f"with columns {','.join(ODIR_COLUMNS)} and pass --annotations FILE.csv"
                )
            raise UserError(
                f"no ODIR-5K annotation CSV in {str(root)!r} (looked for {', '.join(ODIR_CSV_NAMES)}); "
                f"pass --annotations FILE.csv with columns {','.join(ODIR_COLUMNS)}"
            )
        csv_path = found[0]
    dirs = [root / d for d in ODIR_IMAGE_DIRS if (root / d).is_dir()] + [root]
    items: list[_Item] = []
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    for lineno, rec in _read_csv(csv_path, ODIR_COLUMNS, "ODIR-5K annotations"):
        for side in ("Left", "Right"):
            name = rec[f"{side}-Fundus"]
            if not name or name in seen:  # full_df.csv repeats each patient once per image
                continue
            seen.add(name)
            label, why = odir_label(rec[f"{side}-Diagnostic Keywords"])
            if label is None:
                dropped[why] += 1
                continue
            patient = rec.get("ID") or name.split("_")[0]  # "0_left.jpg": the prefix is the patient id
            items.append(_Item(_first_existing(dirs, name), label, patient, f"{csv_path.name} line {lineno}"))
    return _finish(items, out, modality="fundus", dataset="odir5k", fractions=fractions, seed=seed,
                   skip_missing=skip_missing, dropped=dropped)


# ---------------------------------------------------------------------------------------------- APTOS 2019

APTOS_COLUMNS = ("id_code", "diagnosis")


def aptos2019(
    root: str | Path,
    out: str | Path,
    *,
    split: dict[str, float] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
) -> AdapterReport:
    """APTOS 2019: ``train.csv`` (grades 0-4) + ``train_images/<id_code>.png``; split per image (no patient ids)."""
    root = _need_dir(root, "APTOS 2019")
    fractions = _fractions(split, DEFAULT_SPLIT, None)
    labels = get_modality("fundus").label_names("aptos2019")
    csv_path = root / "train.csv"
    items: list[_Item] = []
    bad: list[str] = []
    for lineno, rec in _read_csv(csv_path, APTOS_COLUMNS, "APTOS 2019 train.csv"):
        grade = rec["diagnosis"]
        if grade not in {str(i) for i in range(len(labels))}:
            bad.append(f"line {lineno}: {grade!r}")
            continue
        image = root / "train_images" / f"{rec['id_code']}.png"
        items.append(_Item(image, labels[int(grade)], rec["id_code"], f"{csv_path.name} line {lineno}"))
    if bad:
        raise UserError(f"{str(csv_path)!r}: {len(bad)} row(s) with a diagnosis outside 0-4: {_show(bad)}")
    return _finish(items, out, modality="fundus", dataset="aptos2019", fractions=fractions, seed=seed,
                   skip_missing=skip_missing, dropped=Counter())


# ------------------------------------------------------------------------------------------ NCT-CRC-HE-100K

NCT_CLASSES: dict[str, str] = {
    "ADI": "adipose",
    "BACK": "background",
    "DEB": "debris",
    "LYM": "lymphocytes",
    "MUC": "mucus",
    "MUS": "smooth_muscle",
    "NORM": "normal",
    "STR": "stroma",
    "TUM": "tumor",
}


def _nct_folder(root: Path, split: str | None, notes: list[str]) -> list[_Item]:
    present = [code for code in NCT_CLASSES if (root / code).is_dir()]
    if not present:
        raise UserError(
            f"no NCT-CRC-HE class folders in {str(root)!r}; expected sub-folders {' '.join(NCT_CLASSES)}"
        )
    absent = [code for code in NCT_CLASSES if code not in present]
    if absent:
        notes.append(f"{root.name}: class folder(s) {' '.join(absent)} absent")
    items = []
    for code in present:
        for image in sorted((root / code).iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                # No slide/patient ids in the file names: each tile is its own group.
                items.append(_Item(image, NCT_CLASSES[code], f"{code}/{image.name}", str(image), split))
    return items


def nct_crc_he(
    root: str | Path,
    out: str | Path,
    *,
    test_root: str | Path | None = None,
    split: dict[str, float] | None = None,
    seed: int = 0,
) -> AdapterReport:
    """NCT-CRC-HE-100K: one folder per class (ADI BACK ... TUM) of .tif tiles; CRC-VAL-HE-7K as test if given.

    CRC-VAL-HE-7K comes from other patients, so it is the proper held-out set; without it the tiles
    of NCT-CRC-HE-100K are split per tile (the file names carry no patient ids).
    """
    root = _need_dir(root, "NCT-CRC-HE-100K")
    notes: list[str] = []
    items = _nct_folder(root, None, notes)
    if test_root is not None:
        fractions = _fractions(split, HELDOUT_SPLIT, "CRC-VAL-HE-7K (--test-root)")
        items += _nct_folder(_need_dir(test_root, "CRC-VAL-HE-7K"), "test", notes)
    else:
        fractions = _fractions(split, DEFAULT_SPLIT, None)
    return _finish(items, out, modality="histo", dataset="nct_crc_he", fractions=fractions, seed=seed,
                   skip_missing=False, dropped=Counter(), notes=notes)


# ------------------------------------------------------------------------------------------------------ CLI


def _common(p: argparse.ArgumentParser, *, skip_missing: bool = True) -> None:
    p.add_argument("--root", required=True, help="folder of the official download")
    p.add_argument("--out", required=True, help="manifest CSV to write (image paths are stored relative to it)")
    p.add_argument("--split", type=parse_split, default=None,
                   help="split fractions (default: train=0.8,val=0.1,test=0.1; train=0.9,val=0.1 where an "
                        "official held-out set is the test split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split draw")
    if skip_missing:
        p.add_argument("--skip-missing", action="store_true",
                       help="leave out rows whose image file is absent (default: fail, naming them)")
    # SUPPRESS: an unset sub-command flag must not overwrite a --debug given before the sub-command.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")


def _report(fn: Callable[..., AdapterReport], *options: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand body: call the adapter with the common flags plus ``options`` and print its report."""

    def run(ns: argparse.Namespace) -> int:
        kwargs = {k: getattr(ns, k) for k in options}
        report = fn(ns.root, ns.out, split=ns.split, seed=ns.seed, **kwargs)
        print(report.summary())
        return 0

    return run


def add_adapter_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register one subcommand per real dataset; each sets ``func(ns) -> exit code``."""
    p = subparsers.add_parser("chexpert", help="CheXpert(-small) train.csv/valid.csv -> manifest",
                              description=chexpert.__doc__)
    _common(p)
    p.add_argument("--include-lateral", dest="frontal_only", action="store_false",
                   help="keep lateral views too (default: frontal only)")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                   help="uncertain (-1) labels: ones=positive, zeros=negative, ignore=drop the row (default)")
    p.set_defaults(func=_report(chexpert, "frontal_only", "uncertain", "skip_missing"))

    for name, fn, what in (
        ("ham10000", ham10000, "HAM10000 metadata + images -> manifest (split by lesion)"),
        ("isic2019", isic2019, "ISIC 2019 training ground truth + images -> manifest"),
        ("aptos2019", aptos2019, "APTOS 2019 train.csv + train_images -> manifest"),
    ):
        p = subparsers.add_parser(name, help=what, description=fn.__doc__)
        _common(p)
        p.set_defaults(func=_report(fn, "skip_missing"))

    p = subparsers.add_parser("odir5k", help="ODIR-5K annotation CSV + fundus images -> per-eye manifest",
                              description=odir5k.__doc__)
    _common(p)
    p.add_argument("--annotations", default=None,
                   help=f"annotation CSV (default: the first of {', '.join(ODIR_CSV_NAMES)} in --root)")
    p.set_defaults(func=_report(odir5k, "annotations", "skip_missing"))

    p = subparsers.add_parser("nct_crc_he", help="NCT-CRC-HE-100K class folders -> manifest",
                              description=nct_crc_he.__doc__)
    _common(p, skip_missing=False)
    p.add_argument("--test-root", default=None, help="CRC-VAL-HE-7K folder, used as the test split")
    p.set_defaults(func=_report(nct_crc_he, "test_root"))
