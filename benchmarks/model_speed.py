"""In-process speed of candidate teachers (forward) and students (SimReg train step with a 4L head).

    python benchmarks/model_speed.py                       # the demo's models and the ResNet-50 teacher
    python benchmarks/model_speed.py --json out.json --threads 2 --batch 128

Prints one table (images/s, and each row's ratio to the demo's fused teacher+student step) and writes JSON.
Used to choose the demo's models: the teacher forward and the student step share the same 2 cores.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from simreg.models import InputTransform, SimRegObjective, build_backbone

MS = ((0.286,) * 3, (0.353,) * 3)


def _rate(fn, batch: int, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return batch * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    view = torch.rand(a.batch, 1, 64, 64)
    rows: list[tuple[str, float]] = []
    for arch in ("resnet50", "resnet10t"):
        m = build_backbone(arch).eval()
        tf = InputTransform(64, *MS)
        with torch.no_grad():
            rows.append((f"teacher {arch} forward @64px", _rate(lambda: m(tf(view)), a.batch, a.reps)))
    for arch, size in (("resnet10t", 64), ("resnet10t", 32)):
        obj = SimRegObjective(build_backbone(arch), InputTransform(size, *MS), {"t": 512})
        opt = torch.optim.SGD(obj.parameters(), lr=0.1, momentum=0.9)
        tgt = {"t": torch.randn(a.batch, 512)}

        def step() -> None:
            out = obj(view, tgt)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()

        rows.append((f"student {arch} step @{size}px (4L head, d=512)", _rate(step, a.batch, a.reps)))
    rates = dict(rows)
    fused = 1.0 / (1.0 / rates["teacher resnet10t forward @64px"] + 1.0 / rates["student resnet10t step @32px (4L head, d=512)"])
    rows.append(("demo pair, teacher + student per image (derived)", fused))
    w = max(len(r[0]) for r in rows)
    print(f"{'model':<{w}} | images/s | ratio to demo pair")
    print("-" * (w + 32))
    for name, r in rows:
        print(f"{name:<{w}} | {r:8.0f} | {r / fused:5.2f}")
    print(f"(torch {torch.__version__}, {a.threads} threads, batch {a.batch})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "batch": a.batch, "images_per_s": rates, "demo_pair_images_per_s": fused}, f, indent=2)


if __name__ == "__main__":
    main()
