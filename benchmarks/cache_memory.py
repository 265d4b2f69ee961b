"""A target-cache reader's memory past its bound: the teacher actor's pattern, without Ray.

    python benchmarks/cache_memory.py --images 1000000 --memory-mib 64        # ~20 s on 2 cores

One process stores ``--images`` targets (dim 96, fp16) in blocks of 512 ids in random block order, looking each
block up first (epoch 1: every lookup misses, the block is stored by one forward thread), then looks every block
up again (epoch 2: every target read back from the cache's files through 4 I/O threads, as a fleet actor reads).
With a bound (``cache.memory_mib``) smaller than the targets, epoch 2 reads shards back and drops others. Prints
the process's anonymous memory at each epoch's end, against its size before the cache was opened, and how often
and how long the heap was handed back to the system (``ShardMemory.trims`` / ``trim_s``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from simreg.orchestrator.cache.memory import SHARDS
from simreg.orchestrator.cache.targets import TargetCache

DIM, BLOCK = 96, 512


def anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--memory-mib", type=float, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="simreg-cache-memory-")
    base = anon_mib()
    cache = TargetCache(root, {"version": 2, "teacher": {"arch": "bench"}}, "bench", DIM, a.memory_mib)
    io, forward = ThreadPoolExecutor(4), ThreadPoolExecutor(1)
    rng = np.random.default_rng(0)
    res: dict = {"images": a.images, "memory_mib": a.memory_mib, "anon_mib_before": base, "epochs": []}
    try:
        for epoch in range(2):
            peak = 0.0
            for b in rng.permutation(a.images // BLOCK):
                ids = np.arange(b * BLOCK, (b + 1) * BLOCK)
                _, found = io.submit(cache.lookup, 0, ids).result()
                if not found.all():
                    tg = rng.standard_normal((int((~found).sum()), DIM)).astype(np.float16)
                    forward.submit(cache.store, 0, ids[~found], tg).result()
                peak = max(peak, anon_mib())
            res["epochs"].append({"peak_anon_mib": peak, "end_anon_mib": anon_mib(), "trims": SHARDS.trims,
                                  "trim_s": SHARDS.trim_s})
            print(f"epoch {epoch + 1}: peak anonymous {peak:.0f} MiB ({peak - base:+.0f} over the process before the cache), "
                  f"heap handed back {SHARDS.trims} times so far, {1000 * SHARDS.trim_s:.1f} ms in all", flush=True)
    finally:
        cache.close()
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
