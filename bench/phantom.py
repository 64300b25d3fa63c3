"""Benchmark of the phantom world on one CPU core: generation and oracle speed, oracle accuracy.

Run: ``python bench/phantom.py [--n 2000] [--size 64] [--oracle-n 300] [--seed 12345]``.
Writes ``bench/results/phantom.json`` and prints it. The target (DESIGN / issue "Data") is at least
500 generated images per second per core at 64 px for every modality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from craft_ray.data.phantom import generate, generate_one, image_rng, oracle
from craft_ray.modalities import MODALITY_NAMES, get_modality

TARGET_PER_S = 500.0
OUT = Path(__file__).resolve().parent / "results" / "phantom.json"


def _generation_rate(modality: str, n: int, size: int, seed: int) -> float:
    """Images per second of ``generate_one`` over ``n`` images (labels cycling), after a warm-up."""
    labels = get_modality(modality).label_names("phantom")
    generate(modality, 16, size=size, seed=seed)  # warm caches (grids, imports)
    start = time.perf_counter()
    for i in range(n):
        generate_one(modality, labels[i % len(labels)], image_rng(seed, i), size)
    return n / (time.perf_counter() - start)


def main() -> None:
    """Measure every modality and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images timed per modality")
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument("--oracle-n", type=int, default=300, help="fresh images per modality for the oracle")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the oracle's fresh images")
    args = parser.parse_args()
    # One core: the process is pinned to a single CPU, so any thread pool shares it too.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    report: dict = {
        "size": args.size,
        "target_images_per_s": TARGET_PER_S,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpu": platform.processor()
                    or platform.machine(), "cores_visible": os.cpu_count(), "loadavg_1min": os.getloadavg()[0]},
        "modalities": {},
    }
    for modality in MODALITY_NAMES:
        rate = _generation_rate(modality, args.n, args.size, 0)
        batch = generate(modality, args.oracle_n, size=args.size, seed=args.seed)
        start = time.perf_counter()
        predicted = [oracle.classify(modality, img) for img in batch.images]
        oracle_rate = args.oracle_n / (time.perf_counter() - start)
        per_label = {
            label: float(np.mean([p == label for p, t in zip(predicted, batch.labels, strict=True) if t == label]))
            for label in get_modality(modality).label_names("phantom")
        }
        report["modalities"][modality] = {
            "images_per_s": round(rate, 1),
            "meets_target": rate >= TARGET_PER_S,
            "oracle_images_per_s": round(oracle_rate, 1),
            "oracle_accuracy": float(np.mean([p == t for p, t in zip(predicted, batch.labels, strict=True)])),
            "oracle_accuracy_per_label": per_label,
        }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
