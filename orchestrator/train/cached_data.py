"""A run whose every teacher target is already in the target cache: the student workers make their batches
themselves. Each renders its share of the epoch's views and reads their targets from the cache; no teacher
actor, no view task and no Ray Data execution run (on 2 cores those took a third of the CPU of a warm-cache
epoch: benchmarks/RESULTS.md, "How cost grows").

The driver decides before the run starts (``cached_source``): the cache must hold the target of every sample
for every view index the run uses (``augment.view_bank`` views, or one per epoch), for every teacher, and the
images must be in memory (a streamed pack goes through the Ray Data pipeline). The targets of one view index
are read once per worker; ``DIRECT_MAX_BYTES`` bounds what a worker may hold (larger runs take the pipeline).

Each epoch's order: the images in blocks of ``teacher_pool.batch_size`` rows, the blocks in an order drawn
from (seed, epoch), split equally over the workers (N mod W rows left out, as Ray Train's split does).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simreg.models.errors import DataError
from simreg.orchestrator.cache.targets import TargetCache
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.views import ViewPlan, add_views, view_index
from simreg.orchestrator.train.batches import in_thread

log = logging.getLogger("simreg")

DIRECT_MAX_BYTES = 2 * 2**30  # targets a worker may read into memory (every view index of every teacher)


@dataclass(frozen=True)
class CachedSource:
    """What the workers need to make their batches: the images (an object ref) and each teacher's cache."""

    images: Any  # ray.ObjectRef of the run's train ImageSet
    caches: dict[str, tuple[str, dict[str, Any], int]]  # teacher name -> (cache root, key, target dim)
    block_rows: int

    def open(self) -> dict[str, TargetCache]:
        return {name: TargetCache(root, key, name, dim) for name, (root, key, dim) in self.caches.items()}


def epoch_rows(n: int, block_rows: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """Indices of the images rank ``rank`` of ``world`` trains on in ``epoch``: blocks in a (seed, epoch) order,
    then an equal split."""
    blocks = np.arange(0, n, block_rows)
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(blocks))
    idx = np.concatenate([np.arange(blocks[b], min(blocks[b] + block_rows, n)) for b in order]) if n else np.zeros(0, np.int64)
    rows = n // world
    return idx[rank * rows:(rank + 1) * rows]


def cached_batches(
    images: ImageSet, caches: dict[str, TargetCache], plan: ViewPlan, seed: int, epoch: int, rank: int, world: int,
    batch_size: int, block_rows: int, pin: bool = False, ahead: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of ``epoch`` (the last one shorter): views rendered and targets read in a thread, up to
    ``ahead`` batches in advance, as the pipeline's blocks would carry them."""
    mine = epoch_rows(len(images), block_rows, seed, epoch, rank, world)
    v = view_index(epoch, plan.bank)

    def make() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            b = add_views({"sample_id": images.sample_ids[idx], "label": images.labels[idx], "image": images.images[idx]},
                          epoch=epoch, seed=seed, plan=plan)
            for name, cache in caches.items():
                got, found = cache.lookup(v, b["sample_id"])
                if not found.all():
                    raise DataError(f"target cache {cache.dir}: {int((~found).sum())} target(s) of view {v} went missing during the run "
                                    f"(the cache was cleared?); rerun: missing targets are then computed")
                b[f"target_{name}"] = got
            yield {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in b.items()}

    for batch in in_thread(make(), ahead, "simreg-cached-batches"):
        yield {k: t.pin_memory() for k, t in batch.items()} if pin else batch


def cached_source(cfg: Any, train: ImageSet, specs: list[Any], teacher_dims: dict[str, int], teacher_gpus: float) -> CachedSource | None:
    """A ``CachedSource`` when the target cache holds every target of the run (see the module's docstring), else None."""
    import ray

    caches = complete_caches(cfg, train, specs, teacher_dims, teacher_gpus)
    return None if caches is None else CachedSource(ray.put(train), caches, cfg.teacher_pool.batch_size)


def complete_caches(
    cfg: Any, train: ImageSet, specs: list[Any], teacher_dims: dict[str, int], teacher_gpus: float,
) -> dict[str, tuple[str, dict[str, Any], int]] | None:
    """Each teacher's (cache root, key, dim) when its cache holds the target of every sample for every view index
    of the run, else None."""
    from simreg.orchestrator.pipeline.teacher import teacher_fingerprint
    from simreg.orchestrator.train.builders import cache_spec

    if not cfg.cache.enabled or train.streamed or len(train) == 0:
        return None
    views = sorted({view_index(e, cfg.augment.view_bank) for e in range(cfg.train.epochs)})
    if len(train) * len(views) * sum(teacher_dims.values()) * 2 > DIRECT_MAX_BYTES:
        return None
    spec = cache_spec(cfg, train)
    assert spec is not None
    tp = cfg.teacher_pool
    bf16 = tp.precision == "bf16" or (tp.precision == "auto" and teacher_gpus > 0)  # as the teacher actor would run
    caches: dict[str, tuple[str, dict[str, Any], int]] = {}
    for s in specs:
        key = spec.key(teacher_fingerprint(s, bf16, tp.channels_last))
        cache = TargetCache(spec.root, key, s.name, teacher_dims[s.name])
        if not all(cache.contains(v, train.sample_ids) for v in views):
            return None
        caches[s.name] = (spec.root, key, teacher_dims[s.name])
    return caches
