"""Target statistics of teachers[i].normalize=standardize|phi_s: estimated once per teacher and data by
``prepare`` (a real timm teacher on real synthetic images), stored beside the target cache and read back."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from simreg.orchestrator.config import load_config
from simreg.orchestrator.train import target_stats as ts
from simreg.orchestrator.train.prepare import prepare

BASE = ["teachers.0.weights=random", "teachers.0.arch=test_resnet", "teachers.0.input_size=32", "data.source=synthetic",
        "data.synthetic.images=400", "data.synthetic.held_out=60", "data.store_size=32", "data.view_size=32",
        "data.train_size=300", "data.knn_bank_size=100", "data.knn_query_size=50", "eval.val_every=0",
        "student.arch=test_resnet", "loss.stats_images=128"]


def _cfg(tmp_path, *extra: str):
    return load_config(None, [*BASE, f"cache.dir={tmp_path / 'cache'}", *extra])


def test_statistics_are_computed_once_then_read_from_beside_the_cache(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "simreg")
    prep = prepare(_cfg(tmp_path, "teachers.0.normalize=phi_s"))
    st = prep.target_stats["simclr_r10t"]
    assert st.dim == 96 and st.images == 128 and st.summary()["effective_rank"] > 1
    files = list((tmp_path / "cache" / ts.STATS_DIR).glob("*.safetensors"))
    assert len(files) == 1 and "target statistics (phi_s) from 128 images" in caplog.text

    # the same teacher and data under another normalisation, another run: read, never computed again
    def no_forward(*a, **k):
        raise AssertionError("the statistics were computed again")

    monkeypatch.setattr(ts, "teacher_targets", no_forward)
    again = prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "train.epochs=3"), quiet=True).target_stats["simclr_r10t"]
    np.testing.assert_allclose(again.mean, st.mean, rtol=1e-6)  # stored as float32
    np.testing.assert_allclose(again.eigvals, st.eigvals, rtol=1e-5, atol=1e-9)
    # another view seed is another sample of views: computed
    with pytest.raises(AssertionError, match="computed again"):
        prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "seed=1"), quiet=True)
    # `simreg cache clear` (the whole cache) removes them with the targets; clearing chosen keys leaves them
    from simreg.orchestrator.cache.admin import clear_cache

    clear_cache(tmp_path / "cache", keys=[])
    assert (tmp_path / "cache" / ts.STATS_DIR).is_dir()
    clear_cache(tmp_path / "cache")
    assert not (tmp_path / "cache" / ts.STATS_DIR).exists()


def test_l2_needs_no_statistics_and_no_cache_computes_them_each_run(tmp_path):
    assert prepare(_cfg(tmp_path), quiet=True).target_stats == {}
    assert not (tmp_path / "cache").exists()
    a = prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "cache.enabled=false"), quiet=True).target_stats
    b = prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "cache.enabled=false"), quiet=True).target_stats
    np.testing.assert_array_equal(a["simclr_r10t"].mean, b["simclr_r10t"].mean)  # seeded sample and views: the same numbers
    assert not (tmp_path / "cache").exists()


def test_a_damaged_statistics_file_is_computed_again_and_rewritten(tmp_path, caplog):
    prepare(_cfg(tmp_path, "teachers.0.normalize=phi_s"), quiet=True)
    (f,) = (tmp_path / "cache" / ts.STATS_DIR).glob("*.safetensors")
    f.write_bytes(b"not a safetensors file")
    prep = prepare(_cfg(tmp_path, "teachers.0.normalize=phi_s"), quiet=True)
    assert "cannot be read" in caplog.text and prep.target_stats["simclr_r10t"].dim == 96
    assert f.read_bytes() != b"not a safetensors file"


def test_the_objective_trains_on_prepared_statistics(tmp_path):
    import torch

    from simreg.orchestrator.data.views import make_views
    from simreg.orchestrator.train.builders import build_objective, view_plan

    cfg = _cfg(tmp_path, "teachers.0.normalize=phi_s", "train.loss=mse")
    prep = prepare(cfg, quiet=True)
    obj = build_objective(cfg, prep.teacher_dims, prep.target_stats)
    sample = prep.train.subset(64, 0).materialized()
    view = torch.from_numpy(make_views(np.asarray(sample.images), sample.sample_ids, 0, cfg.seed, view_plan(cfg).teacher, 0))
    teacher = prep.specs[0].build()
    with torch.no_grad():
        tg = teacher(view)
    out = obj(view, {"simclr_r10t": tg})
    assert torch.isfinite(out["loss"]) and 0.2 < out["loss"].item() < 5  # unit-variance targets: a fresh head's error ~1
    with pytest.raises(ValueError, match="needs the teacher's target statistics"):
        build_objective(cfg, prep.teacher_dims)(view, {"simclr_r10t": tg})
