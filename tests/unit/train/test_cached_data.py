"""A run whose every target is cached: the workers' own batches (no Ray) hold the views the pipeline would
render and the cached targets of exactly those views; every sample once per epoch over the ranks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simreg.orchestrator.config import load_config
from simreg.orchestrator.data.views import add_views
from simreg.orchestrator.pipeline.teacher import TeacherInference
from simreg.orchestrator.train.builders import cache_spec, teacher_options, teacher_specs, view_plan
from simreg.orchestrator.train.cached_data import cached_batches, cached_targets, epoch_rows


def test_epoch_rows_split_every_image_once_in_a_per_epoch_block_order():
    for n, world in ((300, 2), (301, 2), (1000, 3)):
        parts = [epoch_rows(n, 64, seed=0, epoch=1, rank=r, world=world) for r in range(world)]
        every = np.concatenate(parts)
        assert all(len(p) == n // world for p in parts) and len(np.unique(every)) == len(every)
    a, b = epoch_rows(640, 64, 0, 0, 0, 1), epoch_rows(640, 64, 0, 1, 0, 1)
    assert not np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(640))  # another order each epoch
    assert np.array_equal(a, epoch_rows(640, 64, 0, 0, 0, 1))  # the same order for the same (seed, epoch)
    assert all(np.array_equal(a[i:i + 64], np.arange(a[i], a[i] + 64)) for i in range(0, 640, 64))  # whole blocks


def _warm(cfg, train, tmp: Path) -> None:
    teacher = TeacherInference(teacher_specs(cfg)[0], threads=1, device="cpu", **teacher_options(cfg, cache_spec(cfg, train)))
    for e in range(cfg.train.epochs):
        b = add_views({"sample_id": train.sample_ids, "label": train.labels, "image": train.images}, epoch=e, seed=cfg.seed, plan=view_plan(cfg))
        teacher(b)


def test_a_warm_cache_feeds_the_workers_the_views_and_targets_of_the_pipeline(fmnist_small, tmp_path: Path):
    cfg = load_config(None, ["cache.enabled=true", f"cache.dir={tmp_path}", "train.epochs=2", "augment.view_bank=null",
                             "teacher_pool.batch_size=16"])
    train = fmnist_small
    spec = teacher_specs(cfg)[0]
    dims = {spec.name: 512}
    assert cached_targets(cfg, train, [spec], dims, 0.0) is None  # a cold cache: the pipeline computes the targets
    _warm(cfg, train, tmp_path)
    found = cached_targets(cfg, train, [spec], dims, 0.0)
    assert found is not None
    views, arrays = found
    assert views == (0, 1) and arrays[spec.name].shape == (2, len(train), 512)
    online = TeacherInference(spec, threads=1, device="cpu", **teacher_options(cfg))
    seen = []
    for rank in range(2):
        for b in cached_batches(train, arrays, views, view_plan(cfg), cfg.seed, 1, rank, 2, batch_size=24, block_rows=16,
                                ahead=2 * rank):  # rank 0 renders in the loop, rank 1 in a thread
            assert set(b) >= {"view", "sample_id", "label", "epoch", f"target_{spec.name}"} and (b["epoch"] == 1).all()
            idx = np.searchsorted(train.sample_ids, b["sample_id"].numpy()) if np.all(np.diff(train.sample_ids) > 0) else \
                np.array([int(np.flatnonzero(train.sample_ids == s)[0]) for s in b["sample_id"].tolist()])
            ref = add_views({"sample_id": train.sample_ids[idx], "label": train.labels[idx], "image": train.images[idx]},
                            epoch=1, seed=cfg.seed, plan=view_plan(cfg))
            assert np.array_equal(b["view"].numpy(), ref["view"])  # the very views the pipeline renders
            got, want = b[f"target_{spec.name}"].numpy().astype(np.float32), online.targets(ref["view"]).astype(np.float32)
            assert np.allclose(got, want, atol=2e-3, rtol=2e-2)  # the cache filled in batches of 64: other kernel sums
            seen += b["sample_id"].tolist()
    assert sorted(seen) == sorted(train.sample_ids.tolist())  # 64 images, 32 per rank, each once
    other = load_config(None, ["cache.enabled=true", f"cache.dir={tmp_path}", "train.epochs=3", "augment.view_bank=null"])
    assert cached_targets(other, train, [spec], dims, 0.0) is None  # epoch 2's views are not cached
    assert cached_targets(cfg, train, [spec], dims, 1.0) is None  # a GPU teacher runs in bf16: other targets
