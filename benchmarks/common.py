"""Pieces the in-process benchmarks share. They run as scripts (``python benchmarks/x.py``), which puts
this folder on ``sys.path``: ``from common import ...``."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from simreg.orchestrator.config import SimRegConfig, load_config
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.views import ViewPlan, add_views
from simreg.orchestrator.pipeline.teacher import TeacherInference

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "teachers"
TEACHERS = {  # the real SimCLR teachers of ../shared/teachers (the ResNet-10t is also vendored, same bytes)
    "r10t": ("resnet10t", SHARED / "fmnist_simclr_resnet10t.safetensors"),
    "r50": ("resnet50", SHARED / "fmnist_simclr_resnet50.safetensors"),
}


UNCACHED = ["cache.enabled=false", "augment.view_bank=null"]


def mean_sd(vals: list[float]) -> str:
    """A table cell: the value, or mean ± sample standard deviation over seeds; "-" for none."""
    import statistics

    if not vals:
        return "-"
    return f"{vals[0]:.2f}" if len(vals) == 1 else f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def require_teachers(names: list[str]) -> None:
    for name in names:
        if not TEACHERS[name][1].is_file():
            raise SystemExit(f"teacher {name} not found at {TEACHERS[name][1]}: run from a checkout with ../shared beside it")


def product_config(teachers: list[str], overrides: list[str]) -> SimRegConfig:
    """The product's config (defaults <- overrides, validated) with the named teachers; a fresh view every
    epoch and no target cache unless the overrides say so (the benchmarks time the teacher's work)."""
    listed = [{"name": n, "arch": TEACHERS[n][0], "weights": str(TEACHERS[n][1])} for n in teachers]
    return load_config(None, [f"teachers={json.dumps(listed)}", *UNCACHED, *overrides])


def fused_batches(
    train: ImageSet, teacher: TeacherInference, plan: ViewPlan, seed: int, epoch: int, batch_size: int,
    timer: dict[str, float] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of the fused in-process loop: full batches in a seeded order, each rendered by the
    product's view stage and sent through ``teacher``; ``timer`` sums seconds of "views" and "teacher"."""
    n = len(train)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    name = teacher.spec.name
    for i in range(0, n - batch_size + 1, batch_size):
        idx = np.sort(perm[i : i + batch_size])
        t0 = time.perf_counter()
        b = add_views({"sample_id": train.sample_ids[idx], "image": train.images[idx]}, epoch=epoch, seed=seed, plan=plan)
        t1 = time.perf_counter()
        b = teacher(b)
        if timer is not None:
            timer["views"] = timer.get("views", 0.0) + t1 - t0
            timer["teacher"] = timer.get("teacher", 0.0) + time.perf_counter() - t1
        yield {"view": torch.from_numpy(b["view"]), f"target_{name}": torch.from_numpy(b[f"target_{name}"])}
