"""Creating a study: matched image pairs drawn from evaluation folders (and optionally real images).

Each arm is an evaluation written by ``python -m craft_ray.evaluate`` (a folder or an MLflow run id).
A *unit* is a (label, prompt seed) that every generator arm has an image for; with ``--real`` the unit
also gets a held-out real image of its label. A candidate pair is a unit and two of its arms, so two
generators give one pair per unit and a real arm three (A-B, A-real, B-real). The pairs drawn, their
left/right order and each reader's order come from one seed and are stored, so a study can be rebuilt.
Every image is re-encoded into the study folder under an opaque random name (no metadata, no file
name that reveals the arm), so the study no longer needs the evaluation folders once created.
"""

from __future__ import annotations

import csv
import itertools
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from craft_ray.errors import UserError
from craft_ray.study.store import IMAGES_DIR, Arm, Pair, Store, StudyImage, new_token

REAL_ARM = "real (held-out)"


@dataclass(frozen=True)
class Candidate:
    """A unit (label, seed) and the two arms (indices) whose images it would put side by side."""

    label: str
    seed: int
    arms: tuple[int, int]


def read_evaluation(folder: Path) -> tuple[dict[str, Any], dict[tuple[str, int], Path]]:
    """(summary.json, {(label, seed): image path}) of an evaluation folder."""
    summary_file, csv_file = folder / "summary.json", folder / IMAGES_DIR / "images.csv"
    if not summary_file.is_file():
        raise UserError(f"{folder} has no summary.json; is it an evaluation folder of `python -m craft_ray.evaluate`?")
    if not csv_file.is_file():
        raise UserError(f"{folder} has no {IMAGES_DIR}/images.csv; rerun the evaluation with "
                        "evaluation.save_images=true")
    images: dict[tuple[str, int], Path] = {}
    with open(csv_file, newline="") as f:
        for row in csv.DictReader(f):
            images.setdefault((row["label"], int(row["seed"])), csv_file.parent / row["file"])
    return json.loads(summary_file.read_text()), images


def candidates(units: Sequence[tuple[str, int]], n_arms: int) -> list[Candidate]:
    """Every (unit, pair of arms) that could be shown, in unit order."""
    return [Candidate(label, seed, ab) for label, seed in units for ab in itertools.combinations(range(n_arms), 2)]


def draw(pool: Sequence[Candidate], n_pairs: int | None, per_label: bool, rng: np.random.Generator) -> list[Candidate]:
    """``n_pairs`` candidates at random (all when None); ``per_label`` splits them evenly across labels.

    With ``per_label`` the first ``n_pairs mod labels`` labels (sorted) take one pair more.
    """
    if n_pairs is None:
        return list(pool)
    if n_pairs < 1:
        raise UserError(f"--n-pairs {n_pairs}: must be at least 1")
    if not per_label:
        if n_pairs > len(pool):
            raise UserError(f"--n-pairs {n_pairs}, but only {len(pool)} matched pairs exist; lower --n-pairs")
        return [pool[i] for i in sorted(rng.choice(len(pool), n_pairs, replace=False).tolist())]
    by_label: dict[str, list[Candidate]] = defaultdict(list)
    for c in pool:
        by_label[c.label].append(c)
    labels = sorted(by_label)
    chosen: list[Candidate] = []
    for i, label in enumerate(labels):
        want = n_pairs // len(labels) + (1 if i < n_pairs % len(labels) else 0)
        have = by_label[label]
        if want > len(have):
            raise UserError(f"--per-label --n-pairs {n_pairs} needs {want} pairs of label {label!r}, but it has only "
                            f"{len(have)}; lower --n-pairs (at most {min(len(v) for v in by_label.values()) * len(labels)})")
        chosen += [have[j] for j in sorted(rng.choice(len(have), want, replace=False).tolist())]
    return chosen


def _copy(src: Path | np.ndarray, folder: Path, size: tuple[int, int] | None = None) -> str:
    """Re-encode an image (file or uint8 [H,W,3]) as ``folder/<token>.png``; returns the token."""
    token = new_token(12)
    img = Image.fromarray(src) if isinstance(src, np.ndarray) else Image.open(src)
    img = img.convert("RGB")
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    img.save(folder / f"{token}.png")  # a fresh PNG: no text chunks from the source survive
    return token


def _real_images(modality: str, overrides: Sequence[str], labels: set[str]) -> tuple[dict[str, list[np.ndarray]], str]:
    """Held-out (test split) real images by label as uint8 [H,W,3], and a description of the dataset."""
    from craft_ray.config import load_config
    from craft_ray.data.dataset import load_dataset
    from craft_ray.evaluate import real_images, to_uint8

    cfg = load_config(None, [f"modality={modality}", *overrides])
    x, names = real_images(load_dataset(cfg), cfg, "test")
    pixels = to_uint8(x)
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for img, label in zip(pixels, names, strict=True):
        out[label].append(img)
    missing = sorted(labels - set(out))
    if missing:
        raise UserError(f"the real {modality} dataset ({cfg.data.source}/{cfg.data.dataset}) has no held-out image of "
                        f"label(s) {', '.join(missing)}; point data.* overrides at a dataset with those labels")
    return out, f"{cfg.data.source}:{cfg.data.dataset} test split (data.size={cfg.data.size})"


def create_study(folder: Path, name: str, refs: Sequence[str], *, real: bool = False, n_pairs: int | None = None,
                 per_label: bool = False, seed: int = 0, tracking_uri: str = "",
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Write a new study into ``folder`` from evaluations ``refs`` (folders or MLflow run ids); returns its meta."""
    from craft_ray.evaluate import evaluation_folder

    if len(refs) < 2:
        raise UserError(f"a study compares at least two generators; --runs got {len(refs)}")
    if Store(folder).path.exists():
        raise UserError(f"study {name!r} already exists in {folder}; choose another name or delete that folder")
    with tempfile.TemporaryDirectory(prefix="craft-study-") as tmp:
        evals = [read_evaluation(evaluation_folder(ref, tracking_uri, Path(tmp))) for ref in refs]
        modalities = [s.get("modality") for s, _ in evals]
        for ref, mod in zip(refs[1:], modalities[1:], strict=True):
            if mod != modalities[0]:
                raise UserError(f"{refs[0]} is a {modalities[0]} evaluation but {ref} is {mod}; "
                                "a study compares generators of one modality")
        names: list[str] = []
        for s, _ in evals:
            base = str(s.get("subject", {}).get("name", "generator"))
            names.append(base if base not in names else f"{base} ({len(names) + 1})")
        units = sorted(set.intersection(*(set(imgs) for _, imgs in evals)))
        if not units:
            raise UserError(f"no (label, seed) is shared by all of {', '.join(refs)}; matched pairs need evaluations "
                            "made with the same evaluation.images_per_label and labels")
        arms = [Arm(n, "generator", str(ref)) for n, ref in zip(names, refs, strict=True)]
        rng = np.random.default_rng(seed)
        chosen = draw(candidates(units, len(arms) + int(real)), n_pairs, per_label, rng)
        # Real images go to the generated images' size, so image size cannot tell the arms apart.
        size = Image.open(evals[0][1][units[0]]).size
        real_by_unit: dict[tuple[str, int], np.ndarray] = {}
        if real:
            pool, described = _real_images(modalities[0], overrides, {u[0] for u in units})
            arms.append(Arm(REAL_ARM, "real", described))
            for label in sorted({c.label for c in chosen}):
                seeds = sorted({c.seed for c in chosen if c.label == label})
                order = rng.permutation(len(pool[label]))
                for k, s in enumerate(seeds):  # distinct real images while they last, then reused
                    real_by_unit[(label, s)] = pool[label][order[k % len(order)]]
        image_dir = folder / IMAGES_DIR
        image_dir.mkdir(parents=True, exist_ok=True)
        images: dict[tuple[str, int, int], StudyImage] = {}

        def image(label: str, s: int, arm: int) -> str:
            key = (label, s, arm)
            if key not in images:
                if arms[arm].kind == "real":
                    token, source = _copy(real_by_unit[(label, s)], image_dir, size), arms[arm].source
                else:
                    src = evals[arm][1][(label, s)]
                    token, source = _copy(src, image_dir, size), f"{refs[arm]}:{src.name}"
                images[key] = StudyImage(token, arms[arm].name, label, None if arms[arm].kind == "real" else s, source)
            return images[key].token

        pairs = []
        for c in chosen:
            a, b = c.arms
            if rng.random() < 0.5:
                a, b = b, a
            pairs.append(Pair(new_token(9), c.label, image(c.label, c.seed, a), image(c.label, c.seed, b)))
    meta = {"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "modality": modalities[0],
            "dataset": evals[0][0].get("dataset"), "runs": list(map(str, refs)), "arms": [a.name for a in arms],
            "real": real, "n_pairs": len(pairs), "n_pairs_requested": n_pairs, "per_label": per_label, "seed": seed,
            "overrides": list(overrides), "matched_units": len(units)}
    Store(folder).initialise(meta, arms, list(images.values()), pairs)
    return meta
