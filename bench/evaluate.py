"""Evaluation throughput on the tiny world: images generated and scored per second; writes JSON.

Three measurements in one run (the machine is noisy, so only ratios within one run mean much):
- ``plain``: generation and CAS scoring (both evaluators) in this process, no Ray, one thread;
- ``ray_1`` / ``ray_2``: ``craft_ray.evaluate.evaluate`` with 1 and 2 Ray actors (one CPU and one
  torch thread each), the same fixed seed set.
Generation and scoring are timed separately; the judge is off (``cas.use_judge=false``) so the
numbers are the generator's and the evaluators', not the MLLM's. The downstream classifier and the
real-image embeddings are part of ``total_s`` only.

    python bench/evaluate.py [--per-label 16] [--out bench/results/evaluate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cfg(tmp: Path, per_label: int, workers: int):
    from craft_ray.config import load_config

    return load_config(None, [
        f"evaluation.images_per_label={per_label}", f"evaluation.num_workers={workers}",
        "evaluation.cpus_per_worker=1", "evaluation.batch_size=8", "cas.use_judge=false", "cas.bootstrap=200",
        f"output_dir={tmp / 'runs'}", f"ray.storage_path={tmp / 'ray'}", "ray.num_cpus=2",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"])


def plain(cfg) -> dict:
    """Generate and score the evaluation set in this process (no Ray)."""
    import torch

    from craft_ray import evaluate as ev
    from craft_ray.models.diffusion import DiffusionModel

    torch.set_num_threads(1)
    knowledge = ev.load_knowledge_for(cfg)
    setups = {w: ev.ScoringSetup.build(cfg, w, knowledge) for w in ev.EVALUATORS}
    model = DiffusionModel.from_config(cfg.model, "cpu", seed=int(cfg.seed))
    labels, prompts, seeds = ev.eval_plan(cfg, int(cfg.evaluation.images_per_label),
                                          seed_offset=int(cfg.evaluation.seed_offset))
    b = int(cfg.evaluation.batch_size)
    t0 = time.perf_counter()
    images = torch.cat([ev.generate(model, prompts[i:i + b], seeds[i:i + b], cfg.sampling, int(cfg.model.resolution),
                                    batch_size=b) for i in range(0, len(labels), b)])
    pixels = ev.to_uint8(images)
    t1 = time.perf_counter()
    for i in range(0, len(labels), b):
        ev.score_images(ev.from_uint8(pixels[i:i + b]), labels[i:i + b], setups, cfg, embedding="ood")
    t2 = time.perf_counter()
    n = len(labels)
    return {"images": n, "generate_images_per_s": n / (t1 - t0), "score_images_per_s": n / (t2 - t1)}


def on_ray(cfg, tmp: Path) -> dict:
    from craft_ray import evaluate as ev

    s = ev.evaluate(cfg, ev.Subject("base", "base", None), tmp / f"eval-{cfg.evaluation.num_workers}")
    return {"images": s["images"], "generate_images_per_s": s["images_per_s"]["generate"],
            "score_images_per_s": s["images_per_s"]["score"], "total_s": s["timing_s"]["total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=16, help="images per label (4 labels on cxr)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "evaluate.json"))
    args = parser.parse_args()
    import ray

    from craft_ray.train import init_ray

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {"plain": plain(_cfg(tmp, args.per_label, 1))}
        init_ray(_cfg(tmp, args.per_label, 1))
        for workers in (1, 2):
            results[f"ray_{workers}"] = on_ray(_cfg(tmp, args.per_label, workers), tmp)
        ray.shutdown()
    for key in ("generate_images_per_s", "score_images_per_s"):
        results[f"ratio_ray_1_vs_plain_{key}"] = results["ray_1"][key] / results["plain"][key]
        results[f"speedup_ray_2_vs_ray_1_{key}"] = results["ray_2"][key] / results["ray_1"][key]
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
