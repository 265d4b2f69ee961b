"""What the target cache saves in a head sweep: 8 trials at one augmentation setting, with and without it.

    python benchmarks/sweep_cost.py                          # ResNet-50 teacher -> resnet10t@32px, 2k images x 2 epochs
    python benchmarks/sweep_cost.py --teacher r10t --train-size 4000 --json sweep_cost.json

Each trial is what a sweep trial runs, in one process (no Ray, so Ray's fixed start-up does not blur the
comparison): the product's config, a fresh ``TeacherInference`` (a new actor: weights loaded, cache opened),
the shared view stage, the student's epoch loop. Trials differ in the head (depth 1-4 x width 1-2 m).
Without the cache every trial runs the teacher on every view; with it the first trial fills the Parquet
cache and the other seven read it. Timers split each run into teacher forward, view rendering and student
steps; the teacher's and the student's seconds per image come from the no-cache run.

The cache removes at most the teacher's share: per trial the limit is (teacher + rest) / rest per image;
for a sweep of n trials whose first trial fills the cache, n (t + r) / (t + n r). Both are printed, with
the measured ratios. JSON keys: teacher_forwards_nocache, teacher_forwards_cache, wall_nocache_s,
wall_cache_s, teacher_s_per_image, student_s_per_image (view rendering + step: everything but the teacher).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (  # benchmarks/common.py (the script's folder is on sys.path)
    TEACHERS,
    fused_batches,
    product_config,
    require_teachers,
)

from simreg.orchestrator.config import DataConfig, SimRegConfig
from simreg.orchestrator.data.sources import load_splits
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

HEADS = [(d, w) for d in (1, 2, 3, 4) for w in (1.0, 2.0)]


def trial_config(a: argparse.Namespace, depth: int, width: float, cache_dir: str | None) -> SimRegConfig:
    ov = [f"data.train_size={a.train_size}", f"train.epochs={a.epochs}", f"train.batch_size={a.batch}",
          f"student.input_size={a.student_size}", f"heads.depth={depth}", f"heads.width_mult={width}",
          f"teacher_pool.threads={a.threads}"]
    if cache_dir:
        ov += ["cache.enabled=true", f"cache.dir={cache_dir}"]
    return product_config([a.teacher], ov)


def run_trial(cfg: SimRegConfig, train: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    timer = {"teacher": 0.0, "views": 0.0}  # summed by fused_batches
    # the teacher as the product's actors run it
    teacher = TeacherInference(teacher_specs(cfg)[0], cfg.teacher_pool.threads, device="cpu", **teacher_options(cfg, cache_spec(cfg, train)))
    setup_s = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    obj = student_layout(build_objective(cfg, {teacher.spec.name: teacher.teacher.feature_dim}), cfg)
    bs = cfg.train.batch_size
    opt, sched = build_optimizer(cfg, obj, len(train) // bs)
    plan, name = view_plan(cfg), teacher.spec.name
    images = 0
    for e in range(cfg.train.epochs):
        stats = train_epoch(obj, fused_batches(train, teacher, plan, cfg.seed, e, bs, timer), opt, sched, [name], torch.device("cpu"))
        images += stats.images
    wall = time.perf_counter() - t0
    return {"depth": cfg.heads.depth, "width_mult": cfg.heads.width_mult, "wall_s": wall, "setup_s": setup_s,
            "teacher_s": timer["teacher"], "views_s": timer["views"],
            "student_s": wall - setup_s - timer["teacher"] - timer["views"], "images": images,
            "forward_rows": teacher.forward_rows, "cached_rows": teacher.cached_rows, "final_loss": stats.means()["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="r50", choices=sorted(TEACHERS))
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--student-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    require_teachers([a.teacher])
    heads = HEADS[: a.trials]
    train_full, _ = load_splits(DataConfig(source="fashion-mnist", root=None, download=True, store_size=96, holdout_fraction=0.1, stream=False), 0)
    train = train_full.subset(a.train_size, 0)
    cache_dir = tempfile.mkdtemp(prefix="simreg-sweep-cost-")
    runs: dict[str, list[dict[str, Any]]] = {"nocache": [], "cache": []}
    try:
        for mode in ("nocache", "cache"):
            for d, w in heads:
                r = run_trial(trial_config(a, d, w, cache_dir if mode == "cache" else None), train)
                runs[mode].append(r)
                print(f"{mode:8s} depth {d} width {w:g}: {r['wall_s']:6.1f} s (teacher {r['teacher_s']:5.1f}, views {r['views_s']:4.1f}, "
                      f"student {r['student_s']:5.1f}), {r['forward_rows']} teacher forwards, {r['cached_rows']} cached, "
                      f"loss {r['final_loss']:.3f}", flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    nc, c = runs["nocache"], runs["cache"]
    fw_nc, fw_c = sum(r["forward_rows"] for r in nc), sum(r["forward_rows"] for r in c)
    wall_nc, wall_c = sum(r["wall_s"] for r in nc), sum(r["wall_s"] for r in c)
    t = sum(r["teacher_s"] for r in nc) / fw_nc
    s = sum(r["wall_s"] - r["teacher_s"] for r in nc) / sum(r["images"] for r in nc)  # views + steps + setup
    n = len(heads)
    limit_trial, limit_sweep = (t + s) / s, n * (t + s) / (t + n * s)
    served = c[1:]
    trial_ratio = (sum(r["wall_s"] for r in nc[1:]) / sum(r["wall_s"] for r in served)) if served else float("nan")
    out = {
        "teacher": a.teacher, "student": f"resnet10t@{a.student_size}px", "trials": n, "train_images": len(train), "epochs": a.epochs,
        "teacher_forwards_nocache": fw_nc, "teacher_forwards_cache": fw_c, "forward_reduction": fw_nc / max(fw_c, 1),
        "wall_nocache_s": wall_nc, "wall_cache_s": wall_c, "wall_ratio": wall_nc / wall_c,
        "teacher_s_per_image": t, "student_s_per_image": s,
        "limit_per_trial": limit_trial, "limit_sweep_with_fill": limit_sweep,
        "cached_trial_ratio": trial_ratio, "runs": runs,
    }
    rows = [
        ("teacher forward passes", f"{fw_nc}", f"{fw_c}", f"{fw_nc / max(fw_c, 1):.2f}x fewer", f"{n}x"),
        ("sweep wall (s)", f"{wall_nc:.1f}", f"{wall_c:.1f}", f"{wall_nc / wall_c:.2f}x", f"{limit_sweep:.2f}x (first trial fills)"),
        ("one trial wall (s, trials 2..n)", f"{sum(r['wall_s'] for r in nc[1:]) / max(1, n - 1):.1f}",
         f"{sum(r['wall_s'] for r in served) / max(1, n - 1):.1f}", f"{trial_ratio:.2f}x", f"{limit_trial:.2f}x ((t + r) / r)"),
    ]
    print(f"\n{a.teacher} teacher -> resnet10t@{a.student_size}px student, {n} head trials x {len(train)} images x {a.epochs} epochs, "
          f"{a.threads} threads; teacher {t * 1e3:.2f} ms/image, rest (views + student step) {s * 1e3:.2f} ms/image")
    print("| | no cache | cache | ratio | limit |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
