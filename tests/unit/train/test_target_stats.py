"""Target statistics of teachers[i].normalize=standardize|phi_s: estimated once per teacher and data by
``prepare`` (a real timm teacher on real synthetic images), stored beside the target cache and read back."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from simreg.models.errors import ConfigError, ModelError
from simreg.orchestrator.config import load_config
from simreg.orchestrator.storage import open_store
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
    st, first = prep.target_stats["simclr_r10t"], prep.target_maps["simclr_r10t"]
    assert st.dim == 96 and st.images == 128 and st.summary()["effective_rank"] > 1
    assert first.method == "phi_s" and first.w.shape == (96, 96) and first.w.dtype == np.float32
    files = list((tmp_path / "cache" / ts.STATS_DIR).glob("*.safetensors"))
    assert len(files) == 1 and "target statistics (phi_s) from 128 images" in caplog.text

    # the same teacher and data under another normalisation, another run: read, never computed again
    def no_forward(*a, **k):
        raise AssertionError("the statistics were computed again")

    monkeypatch.setattr(ts, "teacher_targets", no_forward)
    again = prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "train.epochs=3"), quiet=True).target_stats["simclr_r10t"]
    np.testing.assert_array_equal(again.mean, st.mean)  # rounded to float32 when computed: reading gives the very same
    np.testing.assert_array_equal(again.eigvecs, st.eigvecs)
    # and so the very same map as the run that computed them
    np.testing.assert_array_equal(prepare(_cfg(tmp_path, "teachers.0.normalize=phi_s"), quiet=True).target_maps["simclr_r10t"].w, first.w)
    # another view seed is another sample of views: computed
    with pytest.raises(AssertionError, match="computed again"):
        prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "seed=1"), quiet=True)
    # `simreg cache clear` (the whole cache) removes them with the targets; clearing chosen keys leaves them
    from simreg.orchestrator.cache.admin import clear_cache

    (tmp_path / "cache" / ts.STATS_DIR / "notes.txt").write_text("a user's file")
    clear_cache(tmp_path / "cache", keys=[])
    assert len(list((tmp_path / "cache" / ts.STATS_DIR).glob("*.safetensors"))) == 1  # chosen keys: statistics stay
    clear_cache(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / ts.STATS_DIR).iterdir()] == ["notes.txt"]  # only simreg's files went


def test_l2_needs_no_statistics_and_no_cache_computes_them_each_run(tmp_path):
    assert prepare(_cfg(tmp_path), quiet=True).target_maps == {}
    assert not (tmp_path / "cache").exists()
    a = prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "cache.enabled=false"), quiet=True).target_stats
    b = prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "cache.enabled=false"), quiet=True).target_stats
    np.testing.assert_array_equal(a["simclr_r10t"].mean, b["simclr_r10t"].mean)  # seeded sample and views: the same numbers
    assert not (tmp_path / "cache").exists()
    # a sweep whose space sets normalize: every teacher's statistics stored by the driver, none mapped for an l2 base
    prep = prepare(_cfg(tmp_path), quiet=True, stats_for_all=True)
    assert prep.target_maps == {} and len(list((tmp_path / "cache" / ts.STATS_DIR).glob("*.safetensors"))) == 1


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
    obj = build_objective(cfg, prep.teacher_dims, prep.target_maps)
    sample = prep.train.subset(64, 0).materialized()
    view = torch.from_numpy(make_views(np.asarray(sample.images), sample.sample_ids, 0, cfg.seed, view_plan(cfg).teacher, 0))
    teacher = prep.specs[0].build()
    with torch.no_grad():
        tg = teacher(view)
    out = obj(view, {"simclr_r10t": tg})
    assert torch.isfinite(out["loss"]) and 0.2 < out["loss"].item() < 5  # unit-variance targets: a fresh head's error ~1
    with pytest.raises(ValueError, match="needs the teacher's target statistics"):
        build_objective(cfg, prep.teacher_dims)(view, {"simclr_r10t": tg})


def test_a_resumed_run_trains_on_the_maps_in_its_folder(tmp_path):
    from simreg.orchestrator.train.distill import run_maps

    out = open_store(tmp_path / "run")
    prep = run_maps(out, prepare(_cfg(tmp_path, "teachers.0.normalize=standardize"), quiet=True), resuming=False)
    assert (tmp_path / "run" / ts.RUN_FILE).is_file()
    kept = prep.target_maps["simclr_r10t"]
    # the cache cleared and the statistics computed on another sample: a resumed run still uses the first maps
    (tmp_path / "cache").rename(tmp_path / "old-cache")
    other = prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "loss.stats_images=64"), quiet=True)
    assert not np.array_equal(other.target_maps["simclr_r10t"].scale, kept.scale)
    resumed = run_maps(out, other, resuming=True)
    np.testing.assert_array_equal(resumed.target_maps["simclr_r10t"].scale, kept.scale)
    np.testing.assert_array_equal(resumed.target_maps["simclr_r10t"].mu, kept.mu)


def test_refusals_are_one_line_before_ray(tmp_path, monkeypatch, caplog):
    from simreg.models import loss as losses

    monkeypatch.setitem(losses.LOSSES, "scalar_mse", lambda p, t: (p - t).pow(2).mean())
    with pytest.raises(ConfigError, match=r"^loss.teacher_drop=0.5 needs a loss that returns one value per image.*train.loss=scalar_mse"):
        prepare(_cfg(tmp_path, "train.loss=scalar_mse", "loss.teacher_drop=0.5"), quiet=True)
    prepare(_cfg(tmp_path, "loss.teacher_drop=0.5", "teachers.0.normalize=phi_s"), quiet=True)
    assert "loss.teacher_drop=0.5 has no effect with one teacher" in caplog.text
    assert "teachers.0: normalize=phi_s under train.loss=simreg (cosine) only centres the targets" in caplog.text
    monkeypatch.setattr(ts, "teacher_targets", lambda cfg, teacher, sample: np.ones((len(sample), 96), np.float32))
    with pytest.raises(ModelError, match=r"^teachers.0.normalize=standardize: teacher simclr_r10t's targets do not vary over 128 images"):
        prepare(_cfg(tmp_path, "teachers.0.normalize=standardize", "cache.enabled=false"), quiet=True)
