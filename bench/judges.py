"""Benchmark: /v1/judge throughput and latency over real HTTP, batched vs unbatched, on a local Ray + Serve.

Each request judges 1, 4 or 8 images (64x64) against the knowledge checklist of cxr/cardiomegaly (one
(image, question) pair per image and item): 1 image per request is the worst case for batching (HTTP
and Serve overhead per image is highest); 8 is what a training run of the tiny profile sends (its
periodic evaluation judges ``train.eval_images_per_label`` = 8 images of a label per request). The
engine alone is also timed (``engine_only``): P(yes) of one pair per call vs a full batch per call,
in one process, which bounds what batching can gain over HTTP. The judge runs with the embedded
default's ``judges.max_batch_size`` pairs per forward pass (batched) and with ``max_batch_size=1``
(unbatched); for each, closed-loop
clients at concurrency 1, 8 and 32 send requests for a fixed time. Reported: images/s, p50/p99
latency in ms, failures. The shipped tiny judge is used when present, else an untrained one (same
architecture and cost). Writes ``bench/results/judges.json``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

CONCURRENCY = (1, 8, 32)
SECONDS = 8.0  # measured window per (mode, images per request, concurrency), after a warm-up
IMAGES_PER_REQUEST = (1, 4, 8)
WARMUP_S = 3.0
OUT = Path(__file__).parent / "results" / "judges.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, images: list[str], concurrency: int, seconds: float, per_request: int = 1) -> dict:
    """Closed loop: ``concurrency`` threads send /v1/judge (``per_request`` images) back to back for ``seconds``."""
    import httpx

    body = {"modality": "cxr", "label": "cardiomegaly"}
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                batch = [images[(i + j) % len(images)] for j in range(per_request)]
                r = client.post("/v1/judge", json=body | {"images": batch})
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if r.status_code == 200 else failures.append(f"{r.status_code}"))
                i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "images_per_request": per_request, "requests": len(latencies),
            "failures": len(failures), "images_per_s": len(latencies) * per_request / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "seconds": elapsed}


def _engine_only(model: str, checklist: list[str], batched: int) -> dict:
    """P(yes) pairs/s of the judge's engine in this process: one pair per call vs ``batched`` pairs per call."""
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    from craft_ray.config import load_config
    from craft_ray.models.engines import make_engine

    torch.set_num_threads(1)  # as in a replica (OMP_NUM_THREADS=1)
    cfg = load_config(None, [f"judges.engine.model={model}", f"judges.engine.batch_size={batched}"])
    engine = make_engine(OmegaConf.create(OmegaConf.to_container(cfg.judges.engine, resolve=True)))
    rng = np.random.RandomState(1)
    images = [Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(batched)]
    questions = [checklist[i % len(checklist)] for i in range(batched)]
    out = {}
    for name, size in (("unbatched", 1), ("batched", batched)):
        engine.p_yes(images[:size], questions[:size])  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            for i in range(0, batched, size):
                engine.p_yes(images[i:i + size], questions[i:i + size])
            n += batched
        out[f"{name}_pairs_per_s"] = n / (time.perf_counter() - t0)
    out["batched_vs_unbatched"] = out["batched_pairs_per_s"] / out["unbatched_pairs_per_s"]
    return out


def main() -> None:
    import ray
    from PIL import Image
    from ray import serve

    from craft_ray.config import load_config
    from craft_ray.judges.app import application, wait_healthy
    from craft_ray.judges.client import encode_image
    from craft_ray.knowledge import load_shipped
    from craft_ray.models.tiny_judge import make_tiny_judge

    load_before = os.getloadavg()[0]  # other processes on the machine skew the numbers
    shipped = load_config().judges.engine.model
    tmp = tempfile.TemporaryDirectory()
    model, which = (shipped, "shipped tiny judge") if os.path.isdir(shipped) else (
        str(make_tiny_judge(Path(tmp.name) / "judge", seed=0)), "untrained tiny judge (same architecture)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    rng = np.random.RandomState(0)
    images = [encode_image(Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8))) for _ in range(64)]
    checklist = [it.question for it in load_shipped("cxr", "phantom").checklist("cardiomegaly")]
    items = len(checklist)
    batched = int(load_config().judges.max_batch_size)  # the embedded default's batch size, in pairs
    engine_only = _engine_only(model, checklist, batched)  # before Ray starts: nothing else is running
    print(f"engine only: {engine_only}", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for mode, size in (("batched", batched), ("unbatched", 1)):
            cfg = load_config(None, [f"judges.engine.model={model}", f"judges.max_batch_size={size}",
                                     f"judges.engine.batch_size={batched}", "judges.replica_cpus=0.1"])
            serve.run(application(cfg), name=cfg.judges.app_name, route_prefix="/")
            wait_healthy(url)
            _load(url, images, 8, WARMUP_S)
            for per_request in IMAGES_PER_REQUEST:
                for c in CONCURRENCY:
                    row = {"mode": mode, "max_batch_size": size, **_load(url, images, c, SECONDS, per_request)}
                    rows.append(row)
                    print(f"{mode:<9} {per_request} img/req c={c:<3} {row['images_per_s']:7.1f} images/s  "
                          f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  failures {row['failures']}",
                          flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    by = {(r["mode"], r["images_per_request"], r["concurrency"]): r["images_per_s"] for r in rows}
    result = {
        "what": f"/v1/judge over HTTP, {IMAGES_PER_REQUEST} images (64x64) x {items} checklist items per request, "
                f"local Ray + Serve on {os.cpu_count()} CPUs shared with the load generator, {which}; "
                f"closed-loop clients, {SECONDS:.0f} s per level; load average before: {load_before:.1f}",
        "engine_only": engine_only,
        "rows": rows,
        "batched_vs_unbatched_throughput_at_32": {
            f"{n}_images_per_request": by[("batched", n, 32)] / by[("unbatched", n, 32)] for n in IMAGES_PER_REQUEST},
        "goal": "batching >= 3x the unbatched throughput at concurrency 32",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
