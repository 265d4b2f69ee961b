"""The target statistics of ``teachers[i].normalize=standardize|phi_s``: estimated once per teacher and data.

The teacher runs (in fp32, on the driver) on the view-0 views of ``loss.stats_images`` training images drawn with
the run's seed; the mean and covariance eigendecomposition of its targets (``models/target_norm.TargetStats``)
are stored under ``<cache.dir>/stats/<digest>.safetensors``, keyed like the targets themselves (the teacher's
weights, the data, the views' recipe and seed) plus the sample: every epoch, trial, worker and rerun of the same
teacher and data uses the same statistics. Without a cache they are computed again by each run (the same
numbers: the sample and the views are seeded).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from simreg.models.target_norm import NEEDS_STATS, TargetStats, estimate_stats
from simreg.models.teachers import Teacher
from simreg.orchestrator.cache.targets import STATS_DIR, key_digest
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.views import make_views
from simreg.orchestrator.pipeline.teacher import TeacherSpec, teacher_fingerprint
from simreg.orchestrator.storage import Store, open_store

log = logging.getLogger("simreg")

STATS_VERSION = 1


def stats_key(cfg: SimRegConfig, spec: TeacherSpec, teacher: Teacher, sample: ImageSet) -> dict[str, Any]:
    from simreg.orchestrator.train.builders import target_views

    ids = np.ascontiguousarray(sample.sample_ids, dtype=np.int64)
    return {
        "version": STATS_VERSION,
        "teacher": teacher_fingerprint(spec, False, False, teacher.weights_sha256),
        "data": sample.source_fingerprint,
        "views": target_views(cfg),
        "view_index": 0,
        "sample": hashlib.sha256(ids.tobytes()).hexdigest()[:20],
        "images": len(ids),
    }


@torch.no_grad()
def teacher_targets(cfg: SimRegConfig, teacher: Teacher, sample: ImageSet, batch_size: int = 256) -> np.ndarray:
    """The teacher's fp32 targets (N, d) of the sample's view-0 views (the views epoch 0 trains on)."""
    from simreg.orchestrator.train.builders import view_plan

    spec = view_plan(cfg).teacher
    teacher.eval()
    out = []
    for i in range(0, len(sample), batch_size):
        imgs, ids = np.asarray(sample.images[i : i + batch_size]), sample.sample_ids[i : i + batch_size]
        view = torch.from_numpy(make_views(imgs, ids, 0, cfg.seed, spec, 0))
        out.append(teacher(view).float().numpy())
    return np.concatenate(out)


def _save(store: Store, stats: TargetStats, key: dict[str, Any]) -> None:
    import json

    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32 if k != "images" else np.int64) for k, v in stats.arrays().items()}
    store.write_bytes(save(arrays, metadata={"key": json.dumps(key, sort_keys=True)}))


def _load(store: Store) -> TargetStats | None:
    from safetensors.numpy import load

    try:
        if not store.exists():
            return None
        return TargetStats.from_arrays(load(store.read_bytes()))
    except Exception as e:  # noqa: BLE001  (a damaged or unreadable file: computed again, and rewritten)
        log.warning("target statistics %s cannot be read (%s): computing them again", store, str(e).splitlines()[0][:200])
        return None


def target_stats(
    cfg: SimRegConfig, train: ImageSet, specs: Sequence[TeacherSpec], teachers: dict[str, Teacher], quiet: bool = False,
) -> dict[str, TargetStats]:
    """Statistics of every teacher whose ``normalize`` needs them (name -> stats), read from beside the target
    cache or computed (and stored there)."""
    wanted = [(t, s) for t, s in zip(cfg.teachers, specs, strict=True) if t.normalize in NEEDS_STATS]
    if not wanted:
        return {}
    sample = train.subset(min(cfg.loss.stats_images, len(train)), cfg.seed + 5).materialized()
    base = None
    if cfg.cache.enabled:
        from simreg.orchestrator.cache.targets import default_cache_dir

        base = open_store(cfg.cache.dir or default_cache_dir()) / STATS_DIR
    out: dict[str, TargetStats] = {}
    for tcfg, spec in wanted:
        teacher = teachers[spec.name]
        key = stats_key(cfg, spec, teacher, sample)
        where = None if base is None else base / f"{key_digest(key)}.safetensors"
        stats = None if where is None else _load(where)
        if stats is None:
            t0 = time.perf_counter()
            stats = estimate_stats(teacher_targets(cfg, teacher, sample))
            if where is not None:
                try:
                    _save(where, stats, key)
                except OSError as e:  # a read-only cache: the run goes on with the statistics it computed
                    log.warning("target statistics could not be stored in %s (%s): this run uses them unstored", where, e)
            if not quiet:
                log.info("teacher %s: target statistics (%s) from %d images in %.1f s%s", spec.name, tcfg.normalize, len(sample),
                         time.perf_counter() - t0, f", stored in {where}" if where is not None else "")
        elif not quiet:
            log.info("teacher %s: target statistics (%s) from %s", spec.name, tcfg.normalize, where)
        out[spec.name] = stats
    return out


def stats_metrics(stats: dict[str, TargetStats]) -> dict[str, float]:
    """MLflow metrics of the statistics: ``normalize/<teacher>/<figure>``."""
    return {f"normalize/{name}/{k}": v for name, s in stats.items() for k, v in s.summary().items()}
