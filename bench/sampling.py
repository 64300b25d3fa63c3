"""Benchmark: time and peak memory of one DRaFT-K training step on the tiny model.

For K in {1, 2, 4, T}, with and without gradient checkpointing, one training step is: DDIM sampling
(T steps, CFG) with gradients through the last K, a differentiable VAE decode, the weighted CAS
reward of a tiny open_clip evaluator, backward, and an AdamW step on the LoRA parameters. Each
configuration runs in a fresh process with glibc's mmap threshold at 64 KiB, so every tensor buffer
is returned to the OS when freed and RSS follows live memory; peak memory is the peak RSS above the
RSS right before the step (sampled every millisecond by a thread), the maximum over steps. Writes
``bench/results/sampling.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

T = 10
BATCH = 16
STEPS = 3
OUT = Path(__file__).parent / "results" / "sampling.json"


def _worker(k: int, checkpointing: bool, folder: str, evaluator_dir: str) -> dict:
    import psutil
    import torch
    from omegaconf import OmegaConf

    from craft_ray import cas, sampling
    from craft_ray.config import EvaluatorConfig, LoraConfig
    from craft_ray.knowledge import load_shipped
    from craft_ray.models.diffusion import DiffusionModel, load_components
    from craft_ray.models.evaluators import load_evaluator
    from craft_ray.rewards import make_reward

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = DiffusionModel(load_components(folder), OmegaConf.structured(LoraConfig), gradient_checkpointing=False)
    evaluator = load_evaluator(EvaluatorConfig(model=f"local-dir:{evaluator_dir}", family="vit"))
    texts = cas.build_texts(evaluator, load_shipped("cxr", "phantom"), "cxr")
    weights = {"label": 1 / 3, "checklist": 1 / 3, "modality": 1 / 3, "realism": 0.0}
    reward_fn = make_reward(weights, cas.CASScorer(evaluator, texts, None))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    prompts = ["a chest x-ray showing cardiomegaly"] * BATCH
    meta = [{"label": "cardiomegaly"}] * BATCH
    with torch.no_grad():
        cond = model.encode_prompts(prompts)
        uncond = model.encode_prompts([""] * BATCH)
    shape = (BATCH, model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)

    def step(seed: int) -> None:
        init = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        traj = sampling.sample(model.unet, model.scheduler, cond, uncond, init, num_steps=T, guidance_scale=3.0,
                               k=k, grad_checkpointing=checkpointing)
        images = sampling.decode(model.vae, traj.latents, grad_checkpointing=checkpointing)
        reward, _ = reward_fn(images, prompts, meta)
        (-reward.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    proc = psutil.Process()
    times, peaks = [], []
    for i in range(STEPS + 1):  # the first step warms up allocators and caches
        base = proc.memory_info().rss
        peak = {"rss": base}
        done = threading.Event()

        def poll(peak=peak, done=done) -> None:
            while not done.is_set():
                peak["rss"] = max(peak["rss"], proc.memory_info().rss)
                time.sleep(0.001)

        thread = threading.Thread(target=poll)
        thread.start()
        t0 = time.perf_counter()
        step(i)
        elapsed = time.perf_counter() - t0
        done.set()
        thread.join()
        if i > 0:
            times.append(elapsed)
            peaks.append((peak["rss"] - base) / 2**20)
    return {"k": k, "checkpointing": checkpointing, "step_s": sorted(times)[len(times) // 2],
            "peak_mib": max(peaks)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        k, ckpt, folder, ev = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
        print(json.dumps(_worker(k, ckpt, folder, ev)))
        return
    from craft_ray.models.diffusion import make_tiny_pipeline
    from craft_ray.models.evaluators import make_tiny_evaluator

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(make_tiny_pipeline(Path(tmp) / "sd", seed=0))
        ev = str(make_tiny_evaluator(Path(tmp) / "ev", "vit", seed=0))
        rows = []
        for ckpt in (False, True):
            for k in (1, 2, 4, T):
                out = subprocess.run([sys.executable, __file__, "--worker", str(k), "1" if ckpt else "0", folder, ev],
                                     capture_output=True, text=True, check=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1",
                                          "MALLOC_MMAP_THRESHOLD_": "65536"})
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"K={k:<3} checkpointing={ckpt!s:<5} step {row['step_s']:.3f} s  peak +{row['peak_mib']:.1f} MiB")
    by = {(r["k"], r["checkpointing"]): r for r in rows}
    result = {
        "what": f"one DRaFT-K training step on the tiny model (T={T} DDIM steps, batch {BATCH}, CPU, 1 thread)",
        "rows": rows,
        "peak_ratio_KT_vs_K1_with_checkpointing": by[(T, True)]["peak_mib"] / max(by[(1, True)]["peak_mib"], 1e-9),
        "peak_ratio_KT_vs_K1_without_checkpointing": by[(T, False)]["peak_mib"] / max(by[(1, False)]["peak_mib"], 1e-9),
        "goal": "with checkpointing, peak memory at K=T <= 1.5x that at K=1",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
