"""Training throughput of the Ray pipeline against the same work fused in one process, one run.

    python benchmarks/pipeline_throughput.py                     # the demo's models and size, 10k images x 3 epochs
    python benchmarks/pipeline_throughput.py --train-size 4000 --epochs 4 --json throughput.json

Ray: ``simreg distill`` itself (Ray Data view stage fused into one teacher actor, 2 DDP student workers,
the demo's resources) with evaluation cut to a minimum; its per-epoch ``train/images_per_s`` (each
worker's time from asking for the epoch's first batch to its last step, slowest worker). In process:
the same config's view stage, teacher (``TeacherInference``), objective, optimizer and epoch loop, one
batch after the other on the same threads. Epoch 0 is reported but left out of the steady-state means
(both sides warm up there). JSON keys: ``ray_images_per_s``, ``inprocess_images_per_s``, ``ratio``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import fused_batches  # benchmarks/common.py (the script's folder is on sys.path)

from simreg.orchestrator.config import SimRegConfig, load_config
from simreg.orchestrator.pipeline.teacher import TeacherInference
from simreg.orchestrator.train.builders import (
    build_objective,
    build_optimizer,
    cache_spec,
    student_layout,
    teacher_options,
    teacher_specs,
    view_plan,
)
from simreg.orchestrator.train.epoch import train_epoch
from simreg.orchestrator.train.prepare import prepare


def config(a: argparse.Namespace) -> SimRegConfig:
    return load_config(a.config, [
        f"data.train_size={a.train_size}", f"train.epochs={a.epochs}", "data.knn_bank_size=200", "data.knn_query_size=100",
        "eval.val_every=0", "name=pipeline_throughput", "cache.enabled=false", "augment.view_bank=null", *a.overrides,
    ])


def inprocess(cfg: SimRegConfig, threads: int) -> list[float]:
    """Images/s per epoch of the fused loop: views -> teacher (or the target cache, ``cache.enabled``) -> student
    step, batch by batch."""
    torch.set_num_threads(threads)
    prep = prepare(cfg, quiet=True)
    train = prep.train
    cache = cache_spec(cfg, train)  # None unless cache.enabled
    teacher = TeacherInference(teacher_specs(cfg)[0], threads, device="cpu", **teacher_options(cfg, cache))  # as the product's actors run it
    name = teacher.spec.name
    torch.manual_seed(cfg.seed)
    obj = student_layout(build_objective(cfg, {name: teacher.teacher.feature_dim}, prep.target_maps), cfg)
    bs = cfg.train.batch_size
    opt, sched = build_optimizer(cfg, obj, len(train) // bs)
    plan = view_plan(cfg)
    rates = []
    for e in range(cfg.train.epochs):
        t0 = time.perf_counter()
        stats = train_epoch(obj, fused_batches(train, teacher, plan, cfg.seed, e, bs), opt, sched, [name], torch.device("cpu"))
        rates.append(stats.images / (time.perf_counter() - t0))
        print(f"in-process epoch {e}: {rates[-1]:.0f} images/s", flush=True)
    return rates


def on_ray(cfg: SimRegConfig) -> dict[str, Any]:
    from simreg.orchestrator.train.distill import distill

    with tempfile.TemporaryDirectory(prefix="simreg-throughput-") as d:
        t0 = time.perf_counter()
        summary = distill(cfg, Path(d))
        wall = time.perf_counter() - t0
    rates = [h["train/images_per_s"] for h in summary["history"]]
    for e, r in enumerate(rates):
        print(f"ray epoch {e}: {r:.0f} images/s", flush=True)
    return {"rates": rates, "fit_s": summary["fit_s"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="base config (default: the demo)")
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="in-process torch threads (the machine's cores)")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for both sides")
    a = ap.parse_args()
    cfg = config(a)
    ip = inprocess(cfg, a.threads)
    ray_res = on_ray(cfg)
    steady = lambda r: statistics.mean(r[1:]) if len(r) > 1 else r[0]  # noqa: E731
    ip_rate, ray_rate = steady(ip), steady(ray_res["rates"])
    t = cfg.teachers[0]
    print(f"\n{t.arch} teacher @{t.input_size}px -> {cfg.student.arch}@{cfg.student_input_size}px, {cfg.data.train_size} images x "
          f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}; Ray: {cfg.scaling.num_workers} DDP workers + "
          f"{cfg.teacher_pool.actors_per_teacher} teacher actor(s); in-process: {a.threads} threads")
    print("| pipeline | images/s per epoch | steady state (epochs 1..) | ratio |\n|---|---|---|---|")
    print(f"| in-process fused loop | {', '.join(f'{r:.0f}' for r in ip)} | {ip_rate:.0f} | 1.00 |")
    print(f"| Ray (Data + Train) | {', '.join(f'{r:.0f}' for r in ray_res['rates'])} | {ray_rate:.0f} | {ray_rate / ip_rate:.2f} |")
    print(f"Ray fit() {ray_res['fit_s']:.0f} s, distill wall {ray_res['wall_s']:.0f} s (start-up and evaluation included)")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "ray_images_per_s": ray_rate, "inprocess_images_per_s": ip_rate, "ratio": ray_rate / ip_rate,
            "ray_epochs": ray_res["rates"], "inprocess_epochs": ip, "ray_fit_s": ray_res["fit_s"], "config": json.loads(cfg.model_dump_json()),
        }, indent=2))


if __name__ == "__main__":
    main()
