"""channels_last against the contiguous (NCHW) layout on the CPU, for the demo's teacher forward and student step.

    python benchmarks/cpu_layout.py                          # 2 threads x batch 128, and 1 thread x batch 64
    python benchmarks/cpu_layout.py --json layout.json --reps 40

The product's defaults (``teacher_pool.channels_last``, ``train.channels_last``) put weights, and the
teacher's inputs, in channels_last on every device. Each row: the same model, batch and threads in both
layouts, measured in this run (contiguous first); ratio = channels_last / contiguous images/s.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from simreg.orchestrator.config import load_config
from simreg.orchestrator.pipeline.teacher import TeacherInference
from simreg.orchestrator.train.builders import (
    build_objective,
    build_optimizer,
    student_layout,
    teacher_options,
    teacher_specs,
)


def rate(fn: Callable[[], None], batch: int, reps: int) -> float:
    fn()
    fn()  # warm-up: oneDNN picks and caches its kernels
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return batch * reps / (time.perf_counter() - t)


def measure(threads: int, batch: int, reps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"teacher forward": {}, "student step": {}}
    for layout in ("contiguous", "channels_last"):
        flag = str(layout == "channels_last").lower()
        # the demo (resnet10t teacher at 64 px, resnet10t student at 32 px, 4L head) in this layout
        cfg = load_config(None, [f"teacher_pool.channels_last={flag}", f"train.channels_last={flag}"])
        # the teacher as the product's actors run it (its real weights; sets torch's threads)
        teacher = TeacherInference(teacher_specs(cfg)[0], threads, device="cpu", **teacher_options(cfg))
        torch.manual_seed(0)  # the same views, targets and student initialisation in both layouts
        view = torch.rand(batch, 1, cfg.data.view_size, cfg.data.view_size)
        views = view.numpy()
        obj = student_layout(build_objective(cfg, {"t": 512}), cfg)
        opt, _ = build_optimizer(cfg, obj, 100)
        tgt = {"t": torch.randn(batch, 512)}

        def step() -> None:
            loss = obj(view, tgt)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out["teacher forward"][layout] = rate(lambda: teacher.targets(views), batch, reps)
        out["student step"][layout] = rate(step, batch, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for threads, batch in ((2, 128), (1, 64)):  # the in-process loop / the teacher actor; one DDP worker's share
        for what, r in measure(threads, batch, a.reps).items():
            rows.append({"what": what, "threads": threads, "batch": batch, **r, "ratio": r["channels_last"] / r["contiguous"]})
    print(f"torch {torch.__version__}, images/s\n| | threads | batch | contiguous | channels_last | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['threads']} | {r['batch']} | {r['contiguous']:.0f} | {r['channels_last']:.0f} | {r['ratio']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
