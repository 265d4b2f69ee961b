"""The paper's ablations on Fashion-MNIST with the real SimCLR teachers, one process, no Ray.

    python benchmarks/paper_ablations.py                       # 2 seeds, 8k images x 4 epochs per arm
    python benchmarks/paper_ablations.py --seeds 0,1,2 --train-size 10000 --epochs 6 --json ablations.json

Every arm is a config of the product (``load_config`` + the same builders, views, objective, epoch loop
and k-NN / linear probe as ``simreg distill``), trained on the same images for the same number of steps:
  (a) head: linear (1 layer) vs 2L vs 4L MLP                                  (paper, Table 1)
  (b) augmentation: the five (same | different image) x (weak | strong) rows  (paper, Table 7)
  (c) each teacher alone vs both together, one head each                      (paper, Table 5)
  (d) the 4L arm evaluated at the backbone and after k head layers            (paper, Table 2)
with the teachers and the random-init student as reference rows. Views and teacher targets are computed
once per (recipe, seed, epoch) and shared by every arm that uses them: arms differ only in what they
ablate. Cells are mean +- sample standard deviation over seeds; ``--json`` keeps every seed's figures.
Evaluation: k-NN (1, 20; majority) and the paper's linear probe, bank = 10,000 train images, queries =
2,000 test images (the demo's protocol).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (  # benchmarks/common.py (the script's folder is on sys.path)
    TEACHERS,
    mean_sd,
    product_config,
    require_teachers,
)

from simreg.models import Teacher, build_backbone
from simreg.orchestrator.config import DataConfig, SimRegConfig
from simreg.orchestrator.data.sources import load_splits
from simreg.orchestrator.data.views import ViewSpec, make_views
from simreg.orchestrator.evaluation.knn import extract_features, knn_top1, linear_probe
from simreg.orchestrator.train.builders import (
    build_objective,
    build_optimizer,
    student_transform,
    teacher_specs,
    view_plan,
)
from simreg.orchestrator.train.epoch import train_epoch

HEADS = [("linear (1 layer)", 1), ("2L-MLP", 2), ("4L-MLP", 4)]
TABLE7 = [("same", "weak", "weak"), ("same", "strong", "strong"), ("different", "weak", "weak"),
          ("different", "weak", "strong"), ("different", "strong", "strong")]
PAPER_T7 = [65.1, 64.3, 64.6, 62.0, 61.4]  # ImageNet linear top-1 of the five rows, R50 -> R18


class Bench:
    """Shared data, views, teachers and targets for every arm of one seed."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        train_full, test = load_splits(DataConfig(), 0)
        self.train = train_full.subset(a.train_size, 0)  # the same images for every arm and seed
        self.bank, self.query = train_full.subset(10000, 1), test.subset(2000, 2)
        self.views: dict[tuple[ViewSpec, int, int, int], torch.Tensor] = {}
        self.targets: dict[tuple[str, ViewSpec, int, int], torch.Tensor] = {}
        self.teachers: dict[str, Teacher] = {}
        self.teacher_s = 0.0
        self.view_s = 0.0

    def cfg(self, seed: int, teachers: list[str], overrides: list[str]) -> SimRegConfig:
        """The product's config for one arm: defaults, the given teachers, the bench's budget, the ablated keys."""
        a = self.a
        return product_config(teachers, [
            f"seed={seed}", f"train.epochs={a.epochs}", f"train.batch_size={a.batch}", f"optim.lr={a.lr}",
            f"student.arch={a.student}", f"student.input_size={a.student_size}", *overrides,
        ])

    def view(self, spec: ViewSpec, stream: int, seed: int, epoch: int) -> torch.Tensor:
        key = (spec, stream, seed, epoch)
        if key not in self.views:
            t0 = time.perf_counter()
            self.views[key] = torch.from_numpy(make_views(self.train.images, self.train.sample_ids, epoch, seed, spec, stream))
            self.view_s += time.perf_counter() - t0
        return self.views[key]

    def teacher(self, cfg: SimRegConfig, name: str) -> Teacher:
        if name not in self.teachers:
            spec = next(s for s in teacher_specs(cfg) if s.name == name)
            self.teachers[name] = spec.build()
        return self.teachers[name]

    @torch.no_grad()
    def target(self, cfg: SimRegConfig, name: str, spec: ViewSpec, seed: int, epoch: int) -> torch.Tensor:
        key = (name, spec, seed, epoch)
        if key not in self.targets:
            v, t = self.view(spec, 0, seed, epoch), self.teacher(cfg, name)
            t0 = time.perf_counter()
            self.targets[key] = torch.cat([t(v[i : i + 256]) for i in range(0, len(v), 256)]).to(torch.float16)
            self.teacher_s += time.perf_counter() - t0
        return self.targets[key]

    def evaluate(self, encode: Callable[[torch.Tensor], torch.Tensor], linear: bool = True) -> dict[str, float]:
        fb = extract_features(encode, self.bank.images, 64)
        fq = extract_features(encode, self.query.images, 64)
        lb, lq = torch.tensor(self.bank.labels), torch.tensor(self.query.labels)
        acc = knn_top1(fb, lb, fq, lq, ks=(1, 20))
        out = {"top1_1nn": acc[1], "top1_20nn": acc[20]}
        if linear:
            out["linear_top1"] = linear_probe(fb, lb, fq, lq, epochs=self.a.linear_epochs)
        return out

    def arm(self, cfg: SimRegConfig, head_layers: tuple[int, ...] = ()) -> dict[str, Any]:
        """Distill one student for cfg.train.epochs over the shared images; evaluate it."""
        plan, names = view_plan(cfg), [t.name for t in cfg.teachers]
        seed, n, bs = cfg.seed, len(self.train), cfg.train.batch_size
        dims = {nm: self.teacher(cfg, nm).feature_dim for nm in names}
        torch.manual_seed(seed)
        obj = build_objective(cfg, dims)
        steps = n // bs
        opt, sched = build_optimizer(cfg, obj, steps)
        t0 = time.perf_counter()
        train_s = 0.0
        for e in range(cfg.train.epochs):
            tv = self.view(plan.teacher, 0, seed, e)
            sv = tv if plan.student is None else self.view(plan.student, 1, seed, e)
            tg = {nm: self.target(cfg, nm, plan.teacher, seed, e) for nm in names}
            perm = torch.from_numpy(np.random.default_rng([seed, e]).permutation(n))
            batches = (
                {"view": sv[idx], **{f"target_{nm}": tg[nm][idx] for nm in names}}
                for idx in (perm[i : i + bs] for i in range(0, n - bs + 1, bs))
            )
            t1 = time.perf_counter()
            stats = train_epoch(obj, batches, opt, sched, names, torch.device("cpu"))
            train_s += time.perf_counter() - t1
        obj.eval()
        res: dict[str, Any] = {"student": self.evaluate(obj.features), "final_loss": stats.means()["loss"], "train_s": train_s,
                               "arm_s": time.perf_counter() - t0}
        for k in head_layers:
            res[f"head_{names[0]}_{k}"] = self.evaluate(lambda v, k=k: obj.head_features(v, names[0], k), linear=False)
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--train-size", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--student", default="resnet10t")
    ap.add_argument("--student-size", type=int, default=32)
    ap.add_argument("--main-teacher", default="r10t", choices=sorted(TEACHERS), help="teacher of tables (a), (b), (d)")
    ap.add_argument("--linear-epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of tables to skip: a,b,c")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    require_teachers(sorted(TEACHERS))
    seeds = [int(s) for s in a.seeds.split(",")]
    skip = set(filter(None, a.skip.split(",")))
    t_start = time.perf_counter()
    b = Bench(a)
    T = a.main_teacher
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(key: str, res: dict[str, Any]) -> None:
        runs.setdefault(key, []).append(res)
        s = res["student"]
        print(f"  {key}: 1-NN {s['top1_1nn']:.2f}  20-NN {s['top1_20nn']:.2f}  linear {s['linear_top1']:.2f}  ({res['arm_s']:.0f} s)", flush=True)

    refs: dict[str, dict[str, float]] = {}
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        cfg0 = b.cfg(seed, [T], [])
        torch.manual_seed(seed)
        rnd = build_backbone(a.student).eval()
        tf = student_transform(cfg0)
        runs.setdefault("random", []).append({"student": b.evaluate(lambda v: rnd(tf(v)))})
        main = b.arm(b.cfg(seed, [T], ["heads.depth=4"]), head_layers=(1, 2, 3, 4))
        record(f"heads/4/{T}", main)  # also Table 7 row 1 and the main teacher alone in (c)
        if "a" not in skip:
            for _, depth in HEADS[:-1]:
                record(f"heads/{depth}/{T}", b.arm(b.cfg(seed, [T], [f"heads.depth={depth}"])))
        if "b" not in skip:
            for mode, ta, sa in TABLE7[1:]:
                ov = [f"augment.mode={mode}", f"augment.teacher={ta}", f"augment.student={sa}"]
                record(f"aug/{mode}/{ta}/{sa}", b.arm(b.cfg(seed, [T], ov)))
        if "c" not in skip:
            other = next(n for n in TEACHERS if n != T)
            record(f"heads/4/{other}", b.arm(b.cfg(seed, [other], [])))
            record("heads/4/both", b.arm(b.cfg(seed, sorted(TEACHERS), [])))
    for name in TEACHERS if "c" not in skip else [T]:
        refs[name] = b.evaluate(b.teachers[name])

    def cells(key: str, sub: str = "student") -> list[str]:
        rs = runs.get(key, [])
        return [mean_sd([r[sub][m] for r in rs]) if rs and m in rs[0][sub] else "-" for m in ("top1_1nn", "top1_20nn", "linear_top1")]

    n_seeds = len(seeds)
    lines = [f"SimReg ablations on Fashion-MNIST: {a.student}@{a.student_size}px student, {len(b.train)} images x {a.epochs} epochs "
             f"per arm, batch {a.batch}, lr {a.lr}; {n_seeds} seed(s) {seeds} (mean ± sd); bank 10,000 train / 2,000 test queries", ""]

    def table(title: str, head: list[str], rows: list[list[str]]) -> None:
        lines.append(f"{title}")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in rows)
        lines.append("")

    ref_rows = [[f"teacher {n} (SimCLR)", *[f"{refs[n][m]:.2f}" for m in ("top1_1nn", "top1_20nn", "linear_top1")]] for n in refs]
    ref_rows.append([f"random-init {a.student}", *cells("random")])
    table("Reference rows", ["model", "1-NN", "20-NN", "linear"], ref_rows)
    table(f"(a) head (teacher {T}, same weak view)", ["head", "1-NN", "20-NN", "linear"],
          [[label, *cells(f"heads/{d}/{T}")] for label, d in HEADS])
    aug_rows = [[m, ta, sa, *cells("heads/4/" + T if i == 0 else f"aug/{m}/{ta}/{sa}"), f"{PAPER_T7[i]}"] for i, (m, ta, sa) in enumerate(TABLE7)]
    table(f"(b) augmentation (teacher {T}, 4L head)", ["image", "teacher aug", "student aug", "1-NN", "20-NN", "linear", "paper (ImageNet linear)"], aug_rows)
    if "c" not in skip:
        table("(c) teachers (4L head each, same weak view)", ["teacher(s)", "1-NN", "20-NN", "linear"],
              [[n, *cells(f"heads/4/{n}")] for n in TEACHERS] + [["r10t + r50", *cells("heads/4/both")]])
    d_rows = [["backbone", *cells(f"heads/4/{T}")[:2]]]
    d_rows += [[f"after {k} head layer(s)", *cells(f"heads/4/{T}", f"head_{T}_{k}")[:2]] for k in (1, 2, 3, 4)]
    table(f"(d) where to read the feature (4L head, teacher {T})", ["feature", "1-NN", "20-NN"], d_rows)
    wall = time.perf_counter() - t_start
    lines.append(f"wall {wall:.0f} s (teacher targets {b.teacher_s:.0f} s, views {b.view_s:.0f} s, computed once and shared by the arms)")
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs, "teachers": refs, "wall_s": wall,
                                            "teacher_s": b.teacher_s, "view_s": b.view_s, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
