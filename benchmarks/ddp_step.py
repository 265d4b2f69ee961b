"""The DDP cost of one student worker's step: 2 gloo processes on this machine against the same step without DDP.

    python benchmarks/ddp_step.py                 # the demo's objective, 64 images per worker, 1 thread each
    python benchmarks/ddp_step.py --json ddp.json --steps 30

Variants (each a fresh pair of processes, in this order): ``no DDP`` (each process steps alone), ``DDP``
(torch's defaults), ``DDP, bucket views`` (the workers' ``DDP_OPTIONS``: ``gradient_as_bucket_view=True``),
``DDP, bucket views, bf16 hook`` (plus ``train.ddp_compression=bf16``, through the workers' ``compress_allreduce``). Per step: wall ms and CPU ms (user + system
of the process, so gloo's threads count), mean of the 2 ranks; ratio = CPU ms / the no-DDP CPU ms.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simreg.orchestrator.config import load_config
from simreg.orchestrator.train.builders import (
    DDP_OPTIONS,
    build_objective,
    build_optimizer,
    compress_allreduce,
    student_layout,
)

# name -> None (no DDP) or (DDP's options, train.ddp_compression)
VARIANTS: dict[str, tuple[dict[str, Any], str] | None] = {
    "no DDP": None,
    "DDP": ({}, "none"),
    "DDP, bucket views": (DDP_OPTIONS, "none"),
    "DDP, bucket views, bf16 hook": (DDP_OPTIONS, "bf16"),
}


def _rank(rank: int, port: int, variant: tuple[dict[str, Any], str] | None, steps: int, batch: int, q: Any) -> None:

    torch.set_num_threads(1)  # as in a Ray Train worker (scaling.threads_per_worker)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(None, [])
    torch.manual_seed(0)
    obj = student_layout(build_objective(cfg, {"t": 512}), cfg)
    model: Any = obj
    if variant is not None:
        options, compression = variant
        model = torch.nn.parallel.DistributedDataParallel(obj, **options)
        compress_allreduce(model, compression)
    opt, _ = build_optimizer(cfg, model, 100)
    view, tgt = torch.rand(batch, 1, 64, 64), {"t": torch.randn(batch, 512)}

    def step() -> None:
        loss = model(view, tgt)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    dist.barrier()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    q.put((wall / steps * 1e3, cpu / steps * 1e3))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="images per worker (the demo: 128 over 2 workers)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    rows = []
    for name, variant in VARIANTS.items():
        q, port = ctx.Queue(), _free_port()
        procs = [ctx.Process(target=_rank, args=(r, port, variant, a.steps, a.batch, q)) for r in range(2)]
        for p in procs:
            p.start()
        res = [q.get() for _ in procs]
        for p in procs:
            p.join()
        rows.append({"variant": name, "wall_ms": sum(r[0] for r in res) / 2, "cpu_ms": sum(r[1] for r in res) / 2})
        print(f"{name}: {rows[-1]['wall_ms']:.1f} ms wall, {rows[-1]['cpu_ms']:.1f} ms CPU per step", flush=True)
    base = rows[0]["cpu_ms"]
    print(f"\ntorch {torch.__version__}, 2 gloo processes x 1 thread, {a.batch} images each, {a.steps} steps")
    print("| variant | wall ms / step | CPU ms / step | CPU ratio |\n|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["cpu_ms"] / base
        print(f"| {r['variant']} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | {r['ratio']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
