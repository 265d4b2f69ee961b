"""The target maps of ``teachers[i].normalize=standardize|phi_s``: statistics estimated once per teacher and data.

The teacher runs (in fp32, on the driver) on the view-0 views of ``loss.stats_images`` training images drawn with
the run's seed; the mean and covariance eigendecomposition of its targets (``models/target_norm.TargetStats``)
are stored under ``<cache.dir>/stats/<digest>.safetensors``, keyed like the targets themselves (the teacher's
weights, the data, the views' recipe and seed) plus the sample: every trial and later run of the same teacher
and data reads the same statistics. Without a cache each run computes them again. The statistics are rounded to
float32 as soon as they are computed (a run that computes them and one that reads them get the same map), then
turned into the float32 map the workers apply (``NormMap``); a run keeps its maps in its folder
(``target_norm.safetensors``) and a resumed run reads them from there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from simreg.models.errors import ModelError
from simreg.models.target_norm import NEEDS_STATS, NormMap, NoVariance, TargetStats, estimate_stats, norm_map
from simreg.models.teachers import Teacher
from simreg.orchestrator.cache.targets import STATS_DIR, key_digest
from simreg.orchestrator.config import SimRegConfig, TeacherConfig
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.views import make_views
from simreg.orchestrator.pipeline.teacher import TeacherSpec, teacher_fingerprint
from simreg.orchestrator.storage import Store, open_store

log = logging.getLogger("simreg")

STATS_VERSION = 1
RUN_FILE = "target_norm.safetensors"  # a run's maps, in its folder


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


def _stored_arrays(stats: TargetStats) -> dict[str, np.ndarray]:
    """The statistics' arrays as they are stored: float32 (the image count int64)."""
    return {k: np.ascontiguousarray(v, dtype=np.float32 if k != "images" else np.int64) for k, v in stats.arrays().items()}


def _float32(stats: TargetStats) -> TargetStats:
    """The statistics as they are stored: what every run, computing or reading them, builds its map from."""
    return TargetStats.from_arrays(_stored_arrays(stats))


def _save(store: Store, stats: TargetStats, key: dict[str, Any]) -> None:
    from safetensors.numpy import save

    store.write_bytes(save(_stored_arrays(stats), metadata={"key": json.dumps(key, sort_keys=True)}))


def _load(store: Store) -> TargetStats | None:
    from safetensors.numpy import load

    try:
        if not store.exists():
            return None
        return TargetStats.from_arrays(load(store.read_bytes()))
    except Exception as e:  # noqa: BLE001  (a damaged or unreadable file: computed again, and rewritten)
        log.warning("target statistics %s cannot be read (%s): computing them again", store, str(e).splitlines()[0][:200])
        return None


class StatsSource:
    """Where a run's statistics come from: ``<cache.dir>/stats`` (read, else computed and stored) or, without a
    cache, computed. The sample is drawn once for every teacher."""

    def __init__(self, cfg: SimRegConfig, train: ImageSet, quiet: bool = False) -> None:
        self.cfg, self.quiet = cfg, quiet
        self.sample = train.subset(min(cfg.loss.stats_images, len(train)), cfg.seed + 5).materialized()
        self.base: Store | None = None
        if cfg.cache.enabled and self.sample.source_fingerprint:  # no data key: nothing to key a stored file by
            from simreg.orchestrator.cache.targets import default_cache_dir

            self.base = open_store(cfg.cache.dir or default_cache_dir()) / STATS_DIR

    def stats(self, tcfg: TeacherConfig, spec: TeacherSpec, teacher: Teacher) -> TargetStats:
        key = stats_key(self.cfg, spec, teacher, self.sample)
        where = None if self.base is None else self.base / f"{key_digest(key)}.safetensors"
        stats = None if where is None else _load(where)
        if stats is not None:
            if not self.quiet:
                log.info("teacher %s: target statistics (%s) from %s", spec.name, tcfg.normalize, where)
            return stats
        t0 = time.perf_counter()
        stats = _float32(estimate_stats(teacher_targets(self.cfg, teacher, self.sample)))
        if where is not None:
            try:
                _save(where, stats, key)
            except OSError as e:  # a read-only cache: the run goes on with the statistics it computed
                log.warning("target statistics could not be stored in %s (%s): this run uses them unstored", where, e)
        if not self.quiet:
            log.info("teacher %s: target statistics (%s) from %d images in %.1f s%s", spec.name, tcfg.normalize, len(self.sample),
                     time.perf_counter() - t0, f", stored in {where}" if where is not None else "")
        return stats


def teacher_map(tcfg: TeacherConfig, key: str, stats: TargetStats) -> NormMap:
    """``norm_map``, its refusal as one line naming the teacher's key."""
    try:
        return norm_map(tcfg.normalize, stats)
    except NoVariance:
        raise ModelError(
            f"{key}.normalize={tcfg.normalize}: teacher {tcfg.name}'s targets do not vary over {stats.images} images "
            f"(a constant feature): use {key}.normalize=l2, or check the teacher's weights"
        ) from None


def needs_stats(cfg: SimRegConfig) -> bool:
    return any(t.normalize in NEEDS_STATS for t in cfg.teachers)


def save_maps(store: Store, maps: dict[str, NormMap]) -> None:
    """A run's maps, in one safetensors file of its folder (read back by a resumed run)."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for name, m in maps.items() for k, v in m.arrays(f"{name}.").items()}
    store.write_bytes(save(arrays, metadata={"methods": json.dumps({n: m.method for n, m in maps.items()})}))


def load_maps(store: Store) -> dict[str, NormMap]:
    from safetensors.numpy import load

    data = store.read_bytes()
    arrays = load(data)
    n = int.from_bytes(data[:8], "little")  # the safetensors header: its JSON holds the metadata
    methods = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["methods"])
    return {name: NormMap(m, arrays[f"{name}.mu"], arrays.get(f"{name}.scale"), arrays.get(f"{name}.w")) for name, m in methods.items()}


def stats_metrics(stats: dict[str, TargetStats]) -> dict[str, float]:
    """MLflow metrics of the statistics: ``normalize/<teacher>/<figure>``."""
    return {f"normalize/{name}/{k}": v for name, s in stats.items() for k, v in s.summary().items()}


def maps_payload(maps: dict[str, NormMap]) -> dict[str, dict[str, Any]]:
    """The maps as the workers receive them (train_loop_config): float32 arrays and the method."""
    return {n: {"method": m.method, **m.arrays()} for n, m in maps.items()}


def maps_from_payload(payload: dict[str, dict[str, Any]] | None) -> dict[str, NormMap]:
    return {n: NormMap(p["method"], p["mu"], p.get("scale"), p.get("w")) for n, p in (payload or {}).items()}
