"""A run whose every teacher target is already in the target cache: the student workers make their batches
themselves. Each renders its share of the epoch's views and takes their targets from one array the driver read
from the cache; no teacher actor, no view task and no Ray Data execution run (benchmarks/RESULTS.md, "How cost
grows", gives the rates against the pipeline).

The driver decides before the run starts (``cached_source``): the cache must hold the target of every sample
for every view index the run uses (``augment.view_bank`` views, or one per epoch), for every teacher, and the
images must be in memory (a streamed pack goes through the Ray Data pipeline). It reads those targets into one
float16 array per teacher, (view indices, images, dim) in the images' order, and puts it in Ray's object store:
workers on any node read it from there (zero-copy, one copy per node), whatever storage the cache is on.
``DIRECT_MAX_BYTES`` bounds that array; larger runs take the pipeline, which reads the cache block by block.

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

from simreg.orchestrator.cache.targets import TargetCache
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.views import ViewPlan, add_views, view_index
from simreg.orchestrator.train.batches import in_thread

log = logging.getLogger("simreg")

DIRECT_MAX_BYTES = 2 * 2**30  # the targets of a run read into the object store (every view index of every teacher)


@dataclass(frozen=True)
class CachedSource:
    """What the workers need to make their batches: the images and each teacher's targets (object refs)."""

    images: Any  # ray.ObjectRef of the run's train ImageSet
    targets: dict[str, Any]  # teacher name -> ray.ObjectRef of a (len(views), N, dim) float16 array
    views: tuple[int, ...]  # the view indices of the arrays' first axis
    block_rows: int
    identity: str  # ``cached_identity`` of the config the targets were read for: a run with another one trains on others


def epoch_rows(n: int, block_rows: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """Indices of the images rank ``rank`` of ``world`` trains on in ``epoch``: blocks in a (seed, epoch) order,
    then an equal split."""
    blocks = np.arange(0, n, block_rows)
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(blocks))
    idx = np.concatenate([np.arange(blocks[b], min(blocks[b] + block_rows, n)) for b in order]) if n else np.zeros(0, np.int64)
    rows = n // world
    return idx[rank * rows:(rank + 1) * rows]


def cached_batches(
    images: ImageSet, targets: dict[str, np.ndarray], views: tuple[int, ...], plan: ViewPlan, seed: int, epoch: int,
    rank: int, world: int, batch_size: int, block_rows: int, pin: bool = False, ahead: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of ``epoch`` (the last one shorter), as the pipeline's blocks would carry them: views
    rendered and targets taken when the loop asks for the next batch (``ahead=0``), or in a thread up to ``ahead``
    batches in advance. ``targets``: per teacher, the (len(views), N, dim) array of ``cached_source``.

    A thread pays off only when the step does not need this process's CPU (a CUDA step). On the CPU, rendering
    is a per-image Python loop that takes the GIL from the training thread at every torch call it makes and
    starts a second OpenMP team, so the step's threads sit idle (``benchmarks/cached_render.py``)."""
    mine = epoch_rows(len(images), block_rows, seed, epoch, rank, world)
    at = views.index(view_index(epoch, plan.bank))

    def make() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            b = add_views({"sample_id": images.sample_ids[idx], "label": images.labels[idx], "image": images.images[idx]},
                          epoch=epoch, seed=seed, plan=plan)
            for name, t in targets.items():
                b[f"target_{name}"] = t[at, idx]  # a copy of the batch's rows (the array is read-only, shared)
            yield {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in b.items()}

    for batch in in_thread(make(), ahead, "simreg-cached-batches") if ahead > 0 else make():
        yield {k: t.pin_memory() for k, t in batch.items()} if pin else batch


def cached_source(cfg: Any, train: ImageSet, specs: list[Any], teacher_dims: dict[str, int], teacher_gpus: float) -> CachedSource | None:
    """A ``CachedSource`` when the target cache holds every target of the run (see the module's docstring), else None."""
    import ray

    found = cached_targets(cfg, train, specs, teacher_dims, teacher_gpus)
    if found is None:
        return None
    views, arrays = found
    return CachedSource(ray.put(train), {name: ray.put(a) for name, a in arrays.items()}, views, cfg.teacher_pool.batch_size,
                        identity=targets_identity(cfg, teacher_gpus))


def cached_identity(cfg: Any, cluster: dict[str, float]) -> str:
    """What decides the targets a run reads from the cache and how it reads them: data and seed (the images),
    the teachers' views and their indices (epochs, view bank), the teachers (names, specs and the precision they
    run in with the config's own placement on ``cluster``: a GPU teacher's targets are bf16), the cache. Configs
    with one identity train from one ``CachedSource``."""
    from simreg.orchestrator.train.placement import plan_placement

    return targets_identity(cfg, plan_placement(cfg, cluster, check=False).teacher_gpus)


def targets_identity(cfg: Any, teacher_gpus: float) -> str:
    """``cached_identity`` with the teachers' GPUs placed: what ``cached_targets`` reads by (a teacher's cache key
    is its spec, precision and memory layout; ``teacher_pool.compile`` and its device are not in it)."""
    from simreg.orchestrator.pipeline.requester import digest
    from simreg.orchestrator.train.builders import target_views, teacher_specs

    tp = cfg.teacher_pool
    teachers = [[s.name, {k: v for k, v in s.to_dict().items() if k != "key"}, _bf16(cfg, teacher_gpus), tp.channels_last]
                for s in teacher_specs(cfg)]  # ``key``: the config path, for messages only
    return digest({
        "data": cfg.data.model_dump(mode="json"), "views": target_views(cfg), "epochs": cfg.train.epochs, "bank": cfg.augment.view_bank,
        "cache": cfg.cache.model_dump(mode="json"), "block_rows": tp.batch_size, "teachers": teachers,
    })


def _bf16(cfg: Any, teacher_gpus: float) -> bool:
    """Whether the teachers' targets are bf16 ones: as the teacher actors run (trainer.pool_resources)."""
    tp = cfg.teacher_pool
    return tp.precision == "bf16" or (tp.precision == "auto" and teacher_gpus > 0)


def cached_targets(
    cfg: Any, train: ImageSet, specs: list[Any], teacher_dims: dict[str, int], teacher_gpus: float,
) -> tuple[tuple[int, ...], dict[str, np.ndarray]] | None:
    """(view indices, per teacher a (len(views), N, dim) float16 array in ``train``'s order) when the cache holds
    the target of every sample for every view index of the run, else None."""
    from simreg.orchestrator.pipeline.teacher import teacher_fingerprint
    from simreg.orchestrator.train.builders import cache_spec

    if not cfg.cache.enabled or train.streamed or len(train) == 0:
        return None
    views = tuple(sorted({view_index(e, cfg.augment.view_bank) for e in range(cfg.train.epochs)}))
    if len(train) * len(views) * sum(teacher_dims.values()) * 2 > DIRECT_MAX_BYTES:
        return None
    spec = cache_spec(cfg, train)
    assert spec is not None
    tp = cfg.teacher_pool
    bf16 = _bf16(cfg, teacher_gpus)
    arrays: dict[str, np.ndarray] = {}
    for s in specs:
        cache = TargetCache(spec.root, spec.key(teacher_fingerprint(s, bf16, tp.channels_last)), s.name, teacher_dims[s.name], spec.memory_mib)
        out = np.empty((len(views), len(train), teacher_dims[s.name]), np.float16)
        for j, v in enumerate(views):
            got, found = cache.lookup(v, train.sample_ids)
            if not found.all():
                return None
            out[j] = got
        arrays[s.name] = out
    return views, arrays
