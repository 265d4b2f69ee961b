"""Does a second teacher of another kind pay? Each teacher alone against the pair under each target
normalisation, and the best pair with UNIC's teacher dropping; one process, no Ray.

    python benchmarks/multi_teacher.py --json multi_teacher.json          # 2 seeds, the demo's recipe per arm
    python benchmarks/multi_teacher.py --seeds 0 --train-size 2000 --epochs 4 --arms simclr,pair_l2   # a quick look

Teachers: ``simclr`` (the vendored SimCLR ResNet-10t, 64 px) and ``byol`` (the vendored BYOL ConvNeXt-atto,
32 px; ``scripts/train_teacher.py``). Every arm is the product's config (``load_config``, the same builders,
views, target statistics, objective and epoch loop as ``simreg distill``) with the demo's recipe: the seed's
``data.train_size`` images, a bank of 4 views (epoch e trains on view e mod 4), 16 epochs, batch 128, SGD lr
0.2. Arms:
  simclr, byol                  one teacher, ``l2`` (SimReg's), the ``simreg`` loss
  pair_l2                       both, ``l2``, ``simreg`` loss
  pair_standardize, pair_phi_s  both, each teacher's targets standardised / PHI-S'd, ``mse`` loss
  pair_center                   both, ``phi_s`` under the ``simreg`` (cosine) loss: centring only
  <best pair>+drop              the best pair by mean 20-NN, ``loss.teacher_drop=0.5``
Views, teacher targets and target statistics are computed once per seed and shared by the arms. Evaluation: k-NN (1, 20;
majority) and the paper's linear probe on the student backbone, bank = 10,000 train images, queries = 2,000
test images (the demo's protocol). Cells: mean +- sample sd over seeds; ``--json`` keeps every seed's figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import mean_sd  # benchmarks/common.py (the script's folder is on sys.path)

from simreg.models import Teacher
from simreg.orchestrator.config import SimRegConfig, load_config
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.sources import load_splits
from simreg.orchestrator.data.views import make_views
from simreg.orchestrator.evaluation.knn import extract_features, knn_top1, linear_probe
from simreg.orchestrator.train.builders import build_objective, build_optimizer, teacher_specs, view_plan
from simreg.orchestrator.train.epoch import train_epoch
from simreg.orchestrator.train.target_stats import StatsSource, teacher_map

TEACHERS = {
    "simclr": {"arch": "resnet10t", "weights": "builtin:fmnist_simclr_resnet10t", "input_size": 64},
    "byol": {"arch": "convnext_atto", "weights": "builtin:fmnist_byol_convnext_atto", "input_size": 32},
}
ARMS: dict[str, tuple[list[str], list[str]]] = {  # name -> (teachers, overrides)
    "simclr": (["simclr"], []),
    "byol": (["byol"], []),
    "pair_l2": (["simclr", "byol"], []),
    "pair_standardize": (["simclr", "byol"], ["teachers.0.normalize=standardize", "teachers.1.normalize=standardize", "train.loss=mse"]),
    "pair_phi_s": (["simclr", "byol"], ["teachers.0.normalize=phi_s", "teachers.1.normalize=phi_s", "train.loss=mse"]),
    "pair_center": (["simclr", "byol"], ["teachers.0.normalize=phi_s", "teachers.1.normalize=phi_s"]),
}
DROP = "+drop"


class Bench:
    """One seed's images, views and teacher targets, shared by every arm."""

    def __init__(self, a: argparse.Namespace, seed: int) -> None:
        self.a, self.seed = a, seed
        cfg = self.cfg(["simclr"], [])
        train_full, held_out = load_splits(cfg.data, seed)
        self.train: ImageSet = train_full.subset(cfg.data.train_size, seed).materialized()  # as `simreg distill` draws them
        self.bank = train_full.subset(cfg.data.knn_bank_size, seed + 1).materialized()
        self.query = held_out.subset(cfg.data.knn_query_size, seed + 2).materialized()
        self.views: dict[int, torch.Tensor] = {}
        self.targets: dict[tuple[str, int], torch.Tensor] = {}
        self.teachers: dict[str, Teacher] = {}
        self.seconds = {"views": 0.0, "teacher": 0.0, "stats": 0.0}
        self.view_size = cfg.data.view_size

    def cfg(self, teachers: list[str], overrides: list[str]) -> SimRegConfig:
        a = self.a
        listed = [{"name": n, **TEACHERS[n]} for n in teachers]
        return load_config(None, [  # the cache's folder holds only the statistics here: computed once per seed and teacher
            f"teachers={json.dumps(listed)}", f"seed={self.seed}", "cache.enabled=true", f"cache.dir={a.stats_dir}", f"data.train_size={a.train_size}",
            f"train.epochs={a.epochs}", f"augment.view_bank={a.view_bank}", *overrides,
        ])

    def teacher(self, cfg: SimRegConfig, name: str) -> Teacher:
        if name not in self.teachers:
            self.teachers[name] = next(s for s in teacher_specs(cfg) if s.name == name).build().eval()
        return self.teachers[name]

    def view(self, cfg: SimRegConfig, v: int) -> torch.Tensor:
        if v not in self.views:
            t0 = time.perf_counter()
            self.views[v] = torch.from_numpy(make_views(np.asarray(self.train.images), self.train.sample_ids, v, self.seed, view_plan(cfg).teacher, 0))
            self.seconds["views"] += time.perf_counter() - t0
        return self.views[v]

    @torch.no_grad()
    def target(self, cfg: SimRegConfig, name: str, v: int) -> torch.Tensor:
        if (name, v) not in self.targets:
            view, t = self.view(cfg, v), self.teacher(cfg, name)
            t0 = time.perf_counter()
            self.targets[(name, v)] = torch.cat([t(view[i : i + 512]) for i in range(0, len(view), 512)]).to(torch.float16)
            self.seconds["teacher"] += time.perf_counter() - t0
        return self.targets[(name, v)]

    def evaluate(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        fb = extract_features(encode, self.bank.images, self.view_size)
        fq = extract_features(encode, self.query.images, self.view_size)
        lb, lq = torch.tensor(self.bank.labels), torch.tensor(self.query.labels)
        acc = knn_top1(fb, lb, fq, lq, ks=(1, 20))
        return {"knn1": acc[1], "knn20": acc[20], "linear": linear_probe(fb, lb, fq, lq)}

    def arm(self, teachers: list[str], overrides: list[str]) -> dict[str, Any]:
        cfg = self.cfg(teachers, overrides)
        t0 = time.perf_counter()
        for n in teachers:
            self.teacher(cfg, n)
        source, maps = StatsSource(cfg, self.train, quiet=True), {}  # the product's statistics and maps
        for i, (tc, spec) in enumerate(zip(cfg.teachers, teacher_specs(cfg), strict=True)):
            if tc.normalize != "l2":
                maps[spec.name] = teacher_map(tc, f"teachers.{i}", source.stats(tc, spec, self.teachers[spec.name]))
        self.seconds["stats"] += time.perf_counter() - t0
        dims = {n: self.teachers[n].feature_dim for n in teachers}
        torch.manual_seed(self.seed)
        obj = build_objective(cfg, dims, maps)
        n, bs = len(self.train), cfg.train.batch_size
        opt, sched = build_optimizer(cfg, obj, n // bs)
        t1 = time.perf_counter()
        history = []
        for e in range(cfg.train.epochs):
            v = e % cfg.augment.view_bank if cfg.augment.view_bank else e
            view = self.view(cfg, v)
            tg = {t: self.target(cfg, t, v) for t in teachers}
            perm = torch.from_numpy(np.random.default_rng([self.seed, e]).permutation(n))
            batches = ({"view": view[idx], **{f"target_{t}": tg[t][idx] for t in teachers}}
                       for idx in (perm[i : i + bs] for i in range(0, n - bs + 1, bs)))
            st = train_epoch(obj, batches, opt, sched, teachers, torch.device("cpu"))
            history.append({k: round(v, 5) for k, v in st.means().items()})
        train_s = time.perf_counter() - t1
        obj.eval()
        res = self.evaluate(obj.features)
        return {**res, "train_s": train_s, "arm_s": time.perf_counter() - t0, "history": history}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--view-bank", type=int, default=4)
    ap.add_argument("--arms", default=",".join([*ARMS, DROP]), help=f"comma list of {sorted(ARMS)} and {DROP!r} (the best pair + dropping)")
    ap.add_argument("--drop", type=float, default=0.5, help="loss.teacher_drop of the +drop arm")
    ap.add_argument("--drop-of", default=None, help="the pair arm the +drop arm drops from (default: the best pair by mean 20-NN)")
    ap.add_argument("--reuse", nargs="*", default=[], help="JSON files of earlier runs of this script (or their .partial): "
                    "an arm and seed found there is not run again")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from simreg.orchestrator.config import WEIGHTS_DIR

    for n, t in TEACHERS.items():
        if not (WEIGHTS_DIR / f"{t['weights'].removeprefix('builtin:')}.safetensors").is_file():
            raise SystemExit(f"teacher {n}: {t['weights']} is not in models/weights/: train it with scripts/train_teacher.py "
                             "(models/weights/README.md gives the command)")
    a.stats_dir = tempfile.mkdtemp(prefix="simreg-mt-stats-")
    seeds = [int(s) for s in a.seeds.split(",")]
    chosen = [x for x in a.arms.split(",") if x]
    unknown = sorted(set(chosen) - set(ARMS) - {DROP})
    if unknown:
        raise SystemExit(f"--arms: {unknown} unknown: use {sorted(ARMS)} and {DROP!r}")
    if a.drop_of is not None and len(ARMS.get(a.drop_of, ([], []))[0]) < 2:
        raise SystemExit(f"--drop-of {a.drop_of!r}: name a pair arm, one of {sorted(k for k, v in ARMS.items() if len(v[0]) > 1)}")
    t_start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    refs: dict[str, list[dict[str, float]]] = {}
    benches = {s: Bench(a, s) for s in seeds}
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for f in a.reuse:
        old = json.loads(Path(f).read_text())
        old_seeds = [int(x) for x in str(old["args"]["seeds"]).split(",")]
        for arm_name, rs in old["runs"].items():
            for i, r in enumerate(rs):
                done[(arm_name, int(r.get("seed", old_seeds[i])))] = r

    def run(name: str, teachers: list[str], overrides: list[str]) -> None:
        for s in seeds:
            if (name, s) in done:
                r = done[(name, s)]
                runs.setdefault(name, []).append(r)
                print(f"  seed {s} {name}: 1-NN {r['knn1']:.2f}  20-NN {r['knn20']:.2f}  linear {r['linear']:.2f}  (reused)", flush=True)
                continue
            r = {"seed": s, **benches[s].arm(teachers, overrides)}
            runs.setdefault(name, []).append(r)
            print(f"  seed {s} {name}: 1-NN {r['knn1']:.2f}  20-NN {r['knn20']:.2f}  linear {r['linear']:.2f}  ({r['arm_s']:.0f} s)", flush=True)
            if a.json:  # every arm as it ends: a long run stopped early keeps what it measured
                Path(a.json + ".partial").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))

    for name in (x for x in chosen if x != DROP):
        run(name, *ARMS[name])
    pairs = {k: statistics.mean(r["knn20"] for r in v) for k, v in runs.items() if len(ARMS[k][0]) > 1}
    if DROP in chosen and pairs:
        best = a.drop_of or max(pairs, key=lambda k: pairs[k])
        run(best + DROP, ARMS[best][0], [*ARMS[best][1], f"loss.teacher_drop={a.drop}"])
        pairs[best + DROP] = statistics.mean(r["knn20"] for r in runs[best + DROP])
    for b in benches.values():
        cfg = b.cfg(list(TEACHERS), [])
        for n in TEACHERS:
            refs.setdefault(n, []).append(b.evaluate(b.teacher(cfg, n)))

    arms = {k: {m: [r[m] for r in v] for m in ("knn20", "knn1", "linear")} for k, v in runs.items()}
    singles = {k: statistics.mean(v["knn20"]) for k, v in arms.items() if len(ARMS.get(k, ([], []))[0]) == 1}
    best_single = max(singles, key=lambda k: singles[k]) if singles else None
    best_pair = max(pairs, key=lambda k: pairs[k]) if pairs else None
    lines = [f"Multi-teacher on Fashion-MNIST: resnet10t@32px student, {a.train_size} images x {a.epochs} epochs, view bank "
             f"{a.view_bank}, seeds {seeds} (mean ± sd); k-NN bank 10,000 train / 2,000 test queries", "",
             "| arm | teachers | normalize / loss | 1-NN | 20-NN | linear | s / arm |", "|---|---|---|---|---|---|---|"]
    for n in TEACHERS:
        lines.append(f"| teacher {n} | - | - | {mean_sd([r['knn1'] for r in refs[n]])} | {mean_sd([r['knn20'] for r in refs[n]])} | "
                     f"{mean_sd([r['linear'] for r in refs[n]])} | - |")
    for k, v in arms.items():
        base = k.removesuffix(DROP)
        ts, ov = ARMS[base]
        norm = next((o.split("=")[1] for o in ov if ".normalize=" in o), "l2")
        loss = next((o.split("=")[1] for o in ov if o.startswith("train.loss=")), "simreg")
        extra = f", drop {a.drop}" if k.endswith(DROP) else ""
        secs = statistics.mean(r["arm_s"] for r in runs[k])
        lines.append(f"| {k} | {' + '.join(ts)} | {norm} / {loss}{extra} | {mean_sd(v['knn1'])} | {mean_sd(v['knn20'])} | {mean_sd(v['linear'])} | {secs:.0f} |")
    if best_single and best_pair:
        gap = pairs[best_pair] - singles[best_single]
        lines += ["", f"best single: {best_single} ({singles[best_single]:.2f} 20-NN); best pair: {best_pair} ({pairs[best_pair]:.2f}); "
                      f"pair - single: {gap:+.2f} points of 20-NN (goal >= +0.50); linear: "
                      f"{statistics.mean(arms[best_pair]['linear']) - statistics.mean(arms[best_single]['linear']):+.2f}"]
    wall = time.perf_counter() - t_start
    secs = {k: sum(b.seconds[k] for b in benches.values()) for k in ("views", "teacher", "stats")}
    lines.append(f"wall {wall:.0f} s (views {secs['views']:.0f} s, teacher targets {secs['teacher']:.0f} s, statistics {secs['stats']:.0f} s, shared by the arms)")
    print("\n".join(lines))
    import shutil

    shutil.rmtree(a.stats_dir, ignore_errors=True)
    if a.json:
        Path(a.json + ".partial").unlink(missing_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "arms": arms, "best_single": best_single, "best_pair": best_pair,
                                            "teachers": refs, "runs": runs, "wall_s": wall, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
