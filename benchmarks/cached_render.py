"""Where a warm-cache worker renders its views: in the training loop or in a thread ahead of it.

    python benchmarks/cached_render.py                    # 1 worker x 2 threads, the demo's student, batch 128
    python benchmarks/cached_render.py --json render.json --steps 60 --threads 1

Each variant takes the same batches (``train/cached_data.cached_batches``: the demo's views of real Fashion-MNIST
images and one float16 target array) and runs the same SGD steps of the demo's objective, no DDP:
``in process, in the loop`` (the baseline: a plain Python process, as ``pipeline_throughput.inprocess``), then in
one Ray Train worker (``TorchTrainer``, 1 worker) ``Ray worker, in the loop`` (``ahead=0``, what a CPU worker
does) and ``Ray worker, in a thread`` (``ahead=2``, what a CUDA worker does). Per step: wall ms and the process's
CPU cores busy (user + system / wall); ratio = the baseline's ms / the variant's ms.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def steps(label: str, ahead: int, n_steps: int, threads: int, batch: int) -> dict[str, Any]:
    import torch

    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.builders import build_objective, build_optimizer, student_layout, view_plan
    from simreg.orchestrator.train.cached_data import cached_batches
    from simreg.orchestrator.train.prepare import prepare

    torch.set_num_threads(threads)
    cfg = load_config(None, [])
    train = prepare(cfg, quiet=True).train
    dim = 512
    targets = {"t": np.random.default_rng(0).standard_normal((1, len(train), dim)).astype(np.float16)}
    torch.manual_seed(0)
    obj = student_layout(build_objective(cfg, {"t": dim}), cfg)
    opt, sched = build_optimizer(cfg, obj, n_steps + 10)
    plan = view_plan(cfg)
    it = cached_batches(train, targets, (0,), plan, cfg.seed, 0, 0, 1, batch, cfg.teacher_pool.batch_size, ahead=ahead)

    def step() -> None:
        b = next(it)
        out = obj(b["view"], {"t": b["target_t"]})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()

    for _ in range(5):  # warm-up: allocator, OpenMP teams, the thread's queue
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n_steps):
        step()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return {"variant": label, "ms_per_step": 1000 * wall / n_steps, "cores": cpu / wall, "pid": os.getpid()}


def on_ray(n_steps: int, threads: int, batch: int) -> list[dict[str, Any]]:
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def fn(config: dict[str, Any]) -> None:
        rows = [steps("Ray worker, in the loop", 0, n_steps, threads, batch), steps("Ray worker, in a thread", 2, n_steps, threads, batch)]
        Path(config["out"]).write_text(json.dumps(rows))  # this machine's local cluster: the driver reads the file

    ray.init(num_cpus=os.cpu_count(), logging_level="WARNING", include_dashboard=False)
    with tempfile.TemporaryDirectory(prefix="simreg-render-") as d:
        out = Path(d) / "rows.json"
        try:
            TorchTrainer(fn, train_loop_config={"out": str(out)},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1})).fit()
        finally:
            ray.shutdown()
        return list(json.loads(out.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training loop")
    ap.add_argument("--batch", type=int, default=128, help="images per step (the demo's global batch on one worker)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [steps("in process, in the loop", 0, a.steps, a.threads, a.batch), *on_ray(a.steps, a.threads, a.batch)]
    base = rows[0]["ms_per_step"]
    print(f"\n{a.steps} steps of {a.batch} images, {a.threads} torch thread(s)\n")
    print("| variant | ms per step | cores busy | ratio |\n|---|---|---|---|")
    for r in rows:
        r["ratio"] = base / r["ms_per_step"]
        print(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['cores']:.2f} | {r['ratio']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"steps": a.steps, "threads": a.threads, "batch": a.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
