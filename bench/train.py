"""Ray Train overhead and scaling of the SFT step on the tiny world; writes JSON.

Three measurements in one run (the machine is noisy, so only ratios within one run mean much):
- ``plain``: a plain PyTorch loop in this process doing the same work as a training step
  (same model, LoRA, AdamW, data batches, diffusion loss, clipping) without Ray;
- ``ray_1``: the project's SFT stage on a 1-worker ``TorchTrainer``;
- ``ray_2``: the same on 2 workers (DDP over gloo; the global batch doubles).
Throughput is images per second over the steps after a warm-up window, from the workers' own
``images_per_s`` metric (MLflow history) for Ray and from a timer for the plain loop; peak memory
is each worker's peak RSS.

    python bench/train.py [--steps 60] [--out bench/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cfg(tmp: Path, steps: int, workers: int, name: str):
    from craft_ray.config import load_config

    return load_config(None, [
        f"name={name}", "stage=sft", f"train.sft_steps={steps}", f"train.num_workers={workers}",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.log_every=10", "train.torch_threads=1",
        "cas.use_judge=false", f"output_dir={tmp / 'runs'}", f"ray.storage_path={tmp / 'ray'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"])


def plain_loop(cfg, steps: int, warmup: int) -> dict:
    """The SFT step without Ray: returns images/s after ``warmup`` steps and peak RSS."""
    import torch

    from craft_ray.data.dataset import ImageDataset, load_dataset
    from craft_ray.models.diffusion import DiffusionModel
    from craft_ray.training import COND_DROPOUT, StepBatches, _generator

    torch.set_num_threads(1)
    model = DiffusionModel.from_config(cfg.model, "cpu", seed=int(cfg.seed))
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=float(cfg.train.sft_lr))
    data = StepBatches(ImageDataset(load_dataset(cfg), "train", int(cfg.data.size)), int(cfg.train.batch_size), 0, 1,
                       int(cfg.seed))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = data.batch(step)
        loss = model.diffusion_loss(batch["pixels"], batch["prompts"], generator=_generator(0, "sft", step, 0),
                                    cond_dropout=COND_DROPOUT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(cfg.train.max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    n = (steps - warmup) * int(cfg.train.batch_size)
    return {"images_per_s": n / seconds, "step_time_s": seconds / (steps - warmup),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ray_run(cfg, warmup: int) -> dict:
    """The project's SFT stage on Ray Train; throughput from the workers' metric history."""
    from mlflow.tracking import MlflowClient

    from craft_ray import train

    t0 = time.perf_counter()
    train.train(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], f"tags.`craft_ray.name` = '{cfg.name}'")[0]
    loop = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loop_s")}
    rss = [m.value for m in client.get_metric_history(run.info.run_id, "peak_rss_mb")]
    first = min(s for s in loop if s >= warmup)
    last = max(loop)
    # Loop wall time between two reports: steps, reports to Ray Train and metric logging all included.
    step_time = (loop[last] - loop[first]) / (last - first)
    per_step_images = int(cfg.train.batch_size) * max(1, int(cfg.train.num_workers))
    return {"images_per_s": per_step_images / step_time, "step_time_s": step_time, "peak_rss_mb_rank0": max(rss),
            "wall_s_including_startup": wall}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="bench/results/train.json")
    ns = parser.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory(prefix="craft-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        plain = plain_loop(_cfg(tmp, ns.steps, 1, "plain"), ns.steps, ns.warmup)
        print("plain", plain, flush=True)
        ray.init(num_cpus=2, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        one = ray_run(_cfg(tmp, ns.steps, 1, "ray1"), ns.warmup)
        print("ray_1", one, flush=True)
        two = ray_run(_cfg(tmp, ns.steps, 2, "ray2"), ns.warmup)
        print("ray_2", two, flush=True)
        ray.shutdown()
    result = {
        "what": "SFT step (tiny world, cxr, batch 8 per worker, 1 torch thread per process), images/s after "
                f"{ns.warmup} warm-up steps of {ns.steps}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "plain_pytorch": plain, "ray_train_1_worker": one, "ray_train_2_workers": two,
        "ratio_ray1_step_time_over_plain": one["step_time_s"] / plain["step_time_s"],
        "speedup_2_workers_over_1": two["images_per_s"] / one["images_per_s"],
        "goal": "ratio_ray1_step_time_over_plain <= 1.05",
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "speedup"))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
