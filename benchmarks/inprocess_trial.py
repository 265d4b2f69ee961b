"""A SimReg trial in one process, no Ray: the same views, objective, loop and k-NN as the product.

    python benchmarks/inprocess_trial.py --lrs 0.05,0.2                   # the demo's models, 10k x 6 epochs
    python benchmarks/inprocess_trial.py --teacher ../shared/teachers/fmnist_simclr_resnet50.safetensors \
        --teacher-arch resnet50 --student-size 64 --epochs 4 --train-size 5000 --json out.json

Teacher targets are computed once per epoch's views and shared by every learning rate tried, so a
learning-rate comparison costs the teacher once. Prints a table (k-NN top-1 of the random-init and
distilled student, the gain, train seconds) and writes JSON. The k-NN protocol is the demo's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from simreg.models import InputTransform, SimRegObjective, build_backbone, load_teacher
from simreg.orchestrator.data.fashion_mnist import fmnist_root, load_fashion_mnist
from simreg.orchestrator.data.views import ViewSpec, make_views
from simreg.orchestrator.evaluation.knn import knn_report
from simreg.orchestrator.train.epoch import train_epoch

MS = ((0.2860,) * 3, (0.3530,) * 3)
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(REPO / "models" / "weights" / "fmnist_simclr_resnet10t.safetensors"))
    ap.add_argument("--teacher-arch", default="resnet10t")
    ap.add_argument("--student", default="resnet10t")
    ap.add_argument("--student-size", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lrs", default="0.2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    root = fmnist_root(None, download=True)
    train_split, test_split = load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")
    sub = train_split.subset(a.train_size, a.seed)  # the same subsets as `simreg distill`
    bank, query = train_split.subset(10000, a.seed + 1), test_split.subset(2000, a.seed + 2)
    teacher = load_teacher("t", a.teacher_arch, a.teacher, InputTransform(64, *MS))

    t0 = time.perf_counter()
    views, targets = [], []
    for e in range(a.epochs):
        v = torch.from_numpy(make_views(sub.images, sub.sample_ids, e, a.seed, ViewSpec(64)))
        views.append(v)
        targets.append(torch.cat([teacher(v[i : i + 256]) for i in range(0, len(v), 256)]))
    teacher_s = time.perf_counter() - t0

    def knn(encode) -> dict[str, float]:
        return knn_report(encode, bank.images, bank.labels, query.images, query.labels, 64)

    def student() -> SimRegObjective:
        torch.manual_seed(a.seed)
        return SimRegObjective(build_backbone(a.student), InputTransform(a.student_size, *MS), {"t": teacher.feature_dim})

    random_knn = knn(student().eval().features)
    rows = []
    for lr in [float(x) for x in a.lrs.split(",")]:
        obj = student()
        opt = torch.optim.SGD(obj.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        steps = a.epochs * (len(sub) // a.batch)
        sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        t1 = time.perf_counter()
        for e in range(a.epochs):
            perm = np.random.default_rng(e).permutation(len(sub))
            batches = (
                {"view": views[e][perm[i : i + a.batch]], "target_t": targets[e][perm[i : i + a.batch]]}
                for i in range(0, len(sub) - a.batch + 1, a.batch)
            )
            stats = train_epoch(obj, batches, opt, sch, ["t"], torch.device("cpu"))
        train_s = time.perf_counter() - t1
        r = knn(obj.eval().features)
        rows.append({"lr": lr, "student_knn": r, "gain_20nn": r["top1_20nn"] - random_knn["top1_20nn"],
                     "final_loss": stats.means()["loss"], "train_s": train_s})

    print(f"{a.teacher_arch} -> {a.student}@{a.student_size}px, {len(sub)} images x {a.epochs} epochs, batch {a.batch}")
    print(f"random init: 1-NN {random_knn['top1_1nn']:.2f}, 20-NN {random_knn['top1_20nn']:.2f}; teacher targets {teacher_s:.0f} s")
    print("| lr | 1-NN | 20-NN | 20-NN gain | final loss | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        k = r["student_knn"]
        print(f"| {r['lr']:g} | {k['top1_1nn']:.2f} | {k['top1_20nn']:.2f} | {r['gain_20nn']:+.2f} | {r['final_loss']:.3f} | {r['train_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "random_knn": random_knn, "teacher_s": teacher_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
