"""How the cost of ``simreg distill`` grows with the work: images, teachers, student workers; and a run on
Ray against one process on the same cached targets.

    python benchmarks/scaling.py --json scaling.json --plot scaling.png      # every series (~20 min on 2 cores)
    python benchmarks/scaling.py --series data --sizes 2500,10000            # one series
    python benchmarks/scaling.py --device cuda                               # on a GPU machine (students, teachers on the GPU)

Each point is the real command (``simreg distill``, the demo otherwise: the SimCLR ResNet-10t teacher,
``resnet10t`` student, one epoch, no target cache, k-NN bank 1000 / queries 500, validation off), every
process of it sampled for memory (``benchmarks/memory.py``). Series:

- ``data``: 2.5k, 10k, 40k images (1 teacher, 2 workers);
- ``teachers``: 1, 2, 3 teachers at 10k images (the same ResNet-10t weights under distinct names: one actor
  each, so the count is what changes);
- ``workers``: 1 and 2 student workers on the local cluster, and 4 on a two-raylet cluster this script starts
  (``ray start --head`` and ``ray start --address``, 2 CPUs each; the command joins it with ``ray.address``);
- ``cached``: the target cache filled first (``simreg cache warm``), then four epochs of ``simreg distill``
  (every target cached: the Train workers render the views and take the targets, ``train/cached_data.py``;
  no teacher forward, no Ray Data pipeline) with 1 worker x 2 threads and with 2 workers x 1 thread, against
  the same work in one process (``benchmarks/pipeline_throughput.py``'s fused loop on the same cache, 2 torch
  threads); rates are the mean of epochs 2-4; memory is sampled every 30 s there (``--cached-every``).
  ``cached_ray_images_per_s`` is the 1-worker run's: the layout of the in-process loop (2 workers on 2 cores
  add DDP's all-reduce, which one process does not pay).

Each point's parts: ``student`` = the epochs' time minus their waits for data, ``waiting`` = the students'
waits for the view/teacher stage after each epoch's first batch, ``start-up`` = from the command's start to
rank 0's first optimizer step (``summary.json`` ``started_at`` + ``startup_s``; epoch 1's wait for its first
batch included), ``other`` = the rest of the wall time (evaluation, export, checkpoints, shut-down). ``images/s`` is epoch 1's rate after its first batch.
The baseline, measured in the same run, is each series' first point: the table gives every point's ratio
of wall time and of images/s to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import TEACHERS, require_teachers  # benchmarks/common.py (the script's folder is on sys.path)
from memory import run_sampled

BASE = ["train.epochs=1", "eval.val_every=0", "cache.enabled=false", "augment.view_bank=null",
        "data.knn_bank_size=1000", "data.knn_query_size=500"]


def teachers_override(n: int) -> str:
    arch, weights = TEACHERS["r10t"]
    return "teachers=" + json.dumps([{"name": f"r10t_{i}", "arch": arch, "weights": str(weights)} for i in range(n)])


def point(series: str, x: int, overrides: list[str], every: float, env: dict[str, str] | None = None) -> dict:
    print(f"{series}={x}: simreg distill {' '.join(o if len(o) < 80 else o[:77] + '...' for o in overrides)}", flush=True)
    r = run_sampled(overrides, every, env, whole_cluster=env is not None)
    s = r["summary"]
    h = s["history"]
    first_wait = h[0]["train/first_batch_wait_s"]
    epochs_s = sum(m["train/epoch_s"] for m in h)
    waits = sum(m.get("train/data_wait_s", 0.0) for m in h)
    # the command's own start, then to rank 0's first step (which already includes epoch 1's wait for its first batch)
    startup = (s["started_at"] - r["launched_at"]) + s["startup_s"]["first_step"]
    parts = {"student": epochs_s - waits, "waiting": waits - first_wait, "start-up": startup}
    parts["other"] = r["wall_s"] - sum(parts.values())
    images = h[0]["train/images"]
    row = {
        "series": series, "x": x, "wall_s": r["wall_s"], "images_per_s": images / (h[0]["train/epoch_s"] - first_wait),
        "steady_images_per_s": statistics.mean(m["train/images_per_s"] for m in h[1:]) if len(h) > 1 else None,
        "parts_s": parts, "host_peak_gib": r["host_peak_gib"], "worker_peak_gib": r["peak_rss_gib"]["train worker"],
        "teacher_peak_gib": r["peak_rss_gib"]["teacher actor"], "world_size": int(h[-1]["train/world_size"]),
        "train_images": s["train_images"], "teacher_rows": s["teacher_rows"],
    }
    print(f"  wall {row['wall_s']:.0f} s, {row['images_per_s']:.0f} images/s, host peak {row['host_peak_gib']:.2f} GiB", flush=True)
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_raylet_cluster(
    cpus_each: int, head_resources: dict[str, float] | None = None, node_resources: dict[str, float] | None = None,
    node_cpus: int | None = None,
) -> tuple[str, dict[str, str], Path]:
    """A head and a second raylet on this machine (``ray start``), token auth off, loopback only; custom resources
    on either node."""
    root = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    subprocess.run([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--num-cpus={cpus_each}", f"--temp-dir={root / 'h'}", "--disable-usage-stats",
                    f"--resources={json.dumps(head_resources or {})}"], env=env, check=True, capture_output=True)
    address = f"127.0.0.1:{port}"
    subprocess.run([ray, "start", f"--address={address}", "--node-ip-address=127.0.0.1", f"--num-cpus={node_cpus or cpus_each}",
                    f"--temp-dir={root / 'w'}", "--disable-usage-stats", f"--resources={json.dumps(node_resources or {})}"],
                   env=env, check=True, capture_output=True)
    return address, env, root


def stop_cluster(env: dict[str, str], root: Path) -> None:
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], env=env, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


CACHED_LAYOUTS = {  # label -> overrides; the first is the headline (the in-process loop's layout: 1 process x 2 threads)
    "1 worker x 2 threads": ["scaling.num_workers=1", "scaling.threads_per_worker=2", "scaling.cpus_per_worker=1"],
    "2 workers x 1 thread": ["scaling.num_workers=2", "scaling.threads_per_worker=1"],
}


# Sampling every process's memory each second takes a visible share of 2 cores from the run (benchmarks/RESULTS.md,
# "How cost grows"), a cost the in-process side does not pay: the cached runs sample rarely (--cached-every).
CACHED_SAMPLE_S = 30.0


def cached(every: float, size: int, device: list[str], epochs: int = 4) -> list[dict]:
    """Runs on Ray on a warm cache (student only), one per layout of ``CACHED_LAYOUTS``, against the fused
    in-process loop on the same cache; steady state = the mean of epochs 2.. on both sides."""
    from pipeline_throughput import inprocess

    from simreg.orchestrator.config import load_config

    cache_dir = Path(tempfile.mkdtemp(prefix="simreg-scaling-cache-"))
    overrides = [f"train.epochs={epochs}", "eval.val_every=0", "cache.enabled=true", f"cache.dir={cache_dir}", "augment.view_bank=2",
                 "data.knn_bank_size=1000", "data.knn_query_size=500", f"data.train_size={size}", *device]
    try:
        subprocess.run([str(Path(sys.executable).with_name("simreg")), "cache", "warm", *overrides], check=True,
                       stdout=subprocess.DEVNULL)
        rows = []
        for label, layout in CACHED_LAYOUTS.items():
            row = point("cached", size, [*overrides, *layout], every)
            row |= {"series": "cached ray", "layout": label}
            if any(r["forward"] for r in row["teacher_rows"].values()):
                raise SystemExit(f"the warm cache did not serve every target: {row['teacher_rows']}")
            rows.append(row)
        rates = inprocess(load_config(None, overrides), threads=2)
        rows.append({"series": "cached in-process", "x": size, "layout": "1 process x 2 threads", "images_per_s": rates[0],
                     "steady_images_per_s": statistics.mean(rates[1:]), "epochs_images_per_s": rates})
        return rows
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [s for s in ("data", "teachers", "workers") if any(r["series"] == s for r in rows)]
    fig, axes = plt.subplots(2, len(series), figsize=(4.5 * len(series), 7), squeeze=False)
    labels = {"data": "images", "teachers": "teachers", "workers": "student workers"}
    for j, s in enumerate(series):
        pts = sorted((r for r in rows if r["series"] == s), key=lambda r: r["x"])
        xs = [r["x"] for r in pts]
        bottom = [0.0] * len(pts)
        for part in ("start-up", "student", "waiting", "other"):
            vals = [r["parts_s"][part] for r in pts]
            axes[0][j].bar([str(x) for x in xs], vals, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        axes[0][j].set_title(f"wall time (s) by {labels[s]}")
        axes[1][j].plot([str(x) for x in xs], [r["images_per_s"] for r in pts], marker="o", label="images/s")
        ax2 = axes[1][j].twinx()
        ax2.plot([str(x) for x in xs], [r["host_peak_gib"] for r in pts], marker="s", color="tab:red", label="host peak GiB")
        # from zero, with room above: a flat rate reads as flat, not as a swing of a few images/s
        axes[1][j].set_ylim(0, 1.15 * max(r["images_per_s"] for r in pts))
        ax2.set_ylim(0, 1.15 * max(r["host_peak_gib"] for r in pts))
        axes[1][j].set_title(f"images/s (blue), host peak GiB (red) by {labels[s]}")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", default="data,teachers,workers,cached")
    ap.add_argument("--sizes", default="2500,10000,40000")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between memory samples")
    ap.add_argument("--cached-every", type=float, default=CACHED_SAMPLE_S, help="seconds between memory samples in the cached series")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="a PNG of wall-time parts, images/s and memory per series")
    ap.add_argument("overrides", nargs="*", help="more dotted config overrides for every point")
    a = ap.parse_args()
    require_teachers(["r10t"])
    device = (["scaling.use_gpu=true"] if a.device == "cuda" else []) + a.overrides
    todo = a.series.split(",")
    rows: list[dict] = []
    base10k: dict | None = None
    if "data" in todo:
        for n in (int(x) for x in a.sizes.split(",")):
            rows.append(point("data", n, [*BASE, f"data.train_size={n}", *device], a.every))
            if n == 10000:
                base10k = rows[-1]
    if "teachers" in todo:
        for k in (1, 2, 3):  # 3 actors x 0.15 CPU + 2 workers x 0.5 + 2 view tasks x 0.25 fit 2 CPUs (the resource rule)
            rows.append(point("teachers", k, [*BASE, "data.train_size=10000", teachers_override(k), "teacher_pool.cpus_per_actor=0.15", *device], a.every))
    if "workers" in todo:
        for w in (1, 2):
            if w == 2 and base10k is not None:
                rows.append({**base10k, "series": "workers", "x": 2})
                continue
            rows.append(point("workers", w, [*BASE, "data.train_size=10000", f"scaling.num_workers={w}", *device], a.every))
        address, env, root = two_raylet_cluster(2)
        try:
            rows.append(point("workers", 4, [*BASE, "data.train_size=10000", "scaling.num_workers=4", f"ray.address={address}",
                                             "scaling.cpus_per_worker=0.5", "teacher_pool.cpus_per_actor=0.5", *device], a.every, env))
        finally:
            stop_cluster(env, root)
    if "cached" in todo:
        rows += cached(a.cached_every, 10000, device)

    print("\n| series | x | wall s | images/s | start-up s | student s | waiting s | other s | host peak GiB | worker peak GiB | wall / first | images/s / first |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in ("data", "teachers", "workers"):
        pts = sorted((r for r in rows if r["series"] == s), key=lambda r: r["x"])
        for r in pts:
            p = r["parts_s"]
            print(f"| {s} | {r['x']} | {r['wall_s']:.0f} | {r['images_per_s']:.0f} | {p['start-up']:.0f} | {p['student']:.0f} | "
                  f"{p['waiting']:.0f} | {p['other']:.0f} | {r['host_peak_gib']:.2f} | {r['worker_peak_gib']:.2f} | "
                  f"{r['wall_s'] / pts[0]['wall_s']:.2f} | {r['images_per_s'] / pts[0]['images_per_s']:.2f} |")
    result: dict = {"points": rows}
    crs = [r for r in rows if r["series"] == "cached ray"]
    ci = next((r for r in rows if r["series"] == "cached in-process"), None)
    if crs and ci:
        ip_rate = ci["steady_images_per_s"]
        print("\ncached targets, 10k images, steady state (epochs 2..):\n\n| layout | images/s | ratio to in-process |\n|---|---|---|")
        print(f"| in process, {ci['layout']} | {ip_rate:.0f} | 1.00 |")
        for r in crs:
            print(f"| Ray, {r['layout']} | {r['steady_images_per_s']:.0f} | {r['steady_images_per_s'] / ip_rate:.2f} |")
        ray_rate = crs[0]["steady_images_per_s"]  # the in-process loop's layout (goal >= 0.85x)
        result |= {"cached_ray_images_per_s": ray_rate, "cached_inprocess_images_per_s": ip_rate, "cached_ratio": ray_rate / ip_rate,
                   "cached_ratios": {r["layout"]: r["steady_images_per_s"] / ip_rate for r in crs}}
    if a.plot:
        plot(rows, a.plot)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
