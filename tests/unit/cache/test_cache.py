"""The teacher-target cache: bit-exact with online targets, keyed so that any change misses, atomic shards."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from simreg.models import DataError
from simreg.orchestrator.cache.admin import cache_entries
from simreg.orchestrator.cache.memory import SHARDS
from simreg.orchestrator.cache.targets import CacheSpec, TargetCache, key_digest, spec_dict
from simreg.orchestrator.cli.main import main
from simreg.orchestrator.data.views import ViewPlan, ViewSpec, add_views, preset_spec
from simreg.orchestrator.pipeline.teacher import TeacherInference, TeacherSpec

FM = ((0.2860,) * 3, (0.3530,) * 3)


def _spec(path: Path, size: int = 64) -> TeacherSpec:
    return TeacherSpec("r10t", "resnet10t", str(path), size, *FM)


def _batch(images, v: int, seed: int = 0, spec: ViewSpec | None = None, rows: slice = slice(0, 32)):
    b = {"sample_id": images.sample_ids[rows], "label": images.labels[rows], "image": images.images[rows]}
    return add_views(b, epoch=v, seed=seed, plan=ViewPlan(spec or ViewSpec(64)))


def _cache_spec(root: Path, images, seed: int = 0, spec: ViewSpec | None = None) -> CacheSpec:
    return CacheSpec(str(root), images.source_fingerprint, {"seed": seed, "teacher_view": spec_dict(spec or ViewSpec(64))})


def test_cached_targets_equal_online_targets_bit_for_bit(teachers_dir: Path, fmnist_small, tmp_path: Path):
    w = teachers_dir / "fmnist_simclr_resnet10t.safetensors"
    batch = _batch(fmnist_small, v=3)
    online = TeacherInference(_spec(w), threads=1, device="cpu")(dict(batch))["target_r10t"]
    first = TeacherInference(_spec(w), threads=1, device="cpu", cache=_cache_spec(tmp_path, fmnist_small))
    filled = first(dict(batch))["target_r10t"]
    assert first.forward_rows == 32 and first.cached_rows == 0
    again = TeacherInference(_spec(w), threads=1, device="cpu", cache=_cache_spec(tmp_path, fmnist_small))  # a new actor
    served = again(dict(batch))["target_r10t"]
    assert again.forward_rows == 0 and again.cached_rows == 32  # no teacher forward at all
    assert served.dtype == np.float16
    assert np.array_equal(served.view(np.uint16), online.view(np.uint16))  # bit for bit
    assert np.array_equal(filled.view(np.uint16), online.view(np.uint16))
    # another view index of the same samples is another target: it misses
    other = again(dict(_batch(fmnist_small, v=4)))
    assert again.forward_rows == 32 and not np.array_equal(other["target_r10t"], served)


def test_subsets_share_and_partial_hits_compute_only_missing_rows(teachers_dir: Path, fmnist_small, tmp_path: Path):
    w = teachers_dir / "fmnist_simclr_resnet10t.safetensors"
    inf = TeacherInference(_spec(w), threads=1, device="cpu", cache=_cache_spec(tmp_path, fmnist_small))
    inf(dict(_batch(fmnist_small, 0, rows=slice(0, 16))))
    out = inf(dict(_batch(fmnist_small, 0, rows=slice(8, 24))))  # 8 cached, 8 new
    assert (inf.forward_rows, inf.cached_rows) == (24, 8)
    ref = TeacherInference(_spec(w), threads=1, device="cpu")(dict(_batch(fmnist_small, 0, rows=slice(8, 24))))["target_r10t"]
    assert np.abs(out["target_r10t"].astype(np.float32) - ref.astype(np.float32)).max() < 1e-2


def test_anything_in_the_key_changing_misses(teachers_dir: Path, fmnist_small, fmnist_root, tmp_path: Path):
    from simreg.orchestrator.data.fashion_mnist import load_fashion_mnist

    w = teachers_dir / "fmnist_simclr_resnet10t.safetensors"
    TeacherInference(_spec(w), threads=1, device="cpu", cache=_cache_spec(tmp_path, fmnist_small))(dict(_batch(fmnist_small, 0)))
    sd = load_file(str(w))
    sd["conv1.0.weight"] = sd["conv1.0.weight"] * 1.01
    save_file(sd, str(tmp_path / "other.safetensors"))
    train = load_fashion_mnist(fmnist_root, "train").subset(64, 0)
    strong = preset_spec("strong", strength=0.5)
    variants = {
        "weights": (_spec(tmp_path / "other.safetensors"), _cache_spec(tmp_path, fmnist_small), fmnist_small, None),
        "input transform": (_spec(w, size=48), _cache_spec(tmp_path, fmnist_small), fmnist_small, None),
        "view recipe": (_spec(w), _cache_spec(tmp_path, fmnist_small, spec=strong), fmnist_small, strong),
        "view seed": (_spec(w), _cache_spec(tmp_path, fmnist_small, seed=1), fmnist_small, None),
        "data": (_spec(w), _cache_spec(tmp_path, train), train, None),
    }
    for what, (spec, cspec, images, vspec) in variants.items():
        inf = TeacherInference(spec, threads=1, device="cpu", cache=cspec)
        inf(dict(_batch(images, 0, seed=cspec.views["seed"], spec=vspec)))
        assert inf.cached_rows == 0 and inf.forward_rows == 32, what
    # the memory layout picks other kernels (other low bits): another key
    inf = TeacherInference(_spec(w), threads=1, device="cpu", cache=_cache_spec(tmp_path, fmnist_small), channels_last=False)
    inf(dict(_batch(fmnist_small, 0)))
    assert inf.cached_rows == 0 and inf.forward_rows == 32, "memory format"
    assert len(cache_entries(tmp_path)) == 7  # the original key plus one per change


def test_shards_are_atomic_and_damage_is_recomputed(teachers_dir: Path, fmnist_small, tmp_path: Path, caplog):
    w = teachers_dir / "fmnist_simclr_resnet10t.safetensors"
    inf = TeacherInference(_spec(w), threads=1, device="cpu", cache=_cache_spec(tmp_path, fmnist_small))
    inf(dict(_batch(fmnist_small, 0)))
    vdir = inf.cache.dir.local_path / "v00000"
    shards = sorted(vdir.rglob("part-*.parquet"))  # one per bucket of 4096 ids the 32 rows fall in
    buckets = sorted({int(s) // 4096 for s in _batch(fmnist_small, 0)["sample_id"]})
    assert [s.parent.name for s in shards] == [f"b{b:07d}" for b in buckets] and not list(vdir.rglob(".tmp-*"))
    (shards[0].parent / ".tmp-deadbeef-part-0000.parquet").write_bytes(b"PAR1 half a file")  # a writer killed mid-write
    for s in shards:
        s.write_bytes(s.read_bytes()[:100])  # truncated shards (disk full, bad copy)
    SHARDS.clear()  # as another process: nothing of it in memory
    fresh = TeacherInference(_spec(w), threads=1, device="cpu", cache=_cache_spec(tmp_path, fmnist_small))
    with caplog.at_level(logging.WARNING, logger="simreg"):
        fresh(dict(_batch(fmnist_small, 0)))
    assert fresh.forward_rows == 32 and "skipping unreadable shard" in caplog.text


def test_wrong_dim_shard_names_the_fix(tmp_path: Path):
    key = {"k": 1}
    TargetCache(tmp_path, key, "t", 4).store(0, np.arange(3), np.zeros((3, 4), np.float16))
    with pytest.raises(DataError, match=r"column .target. is fixed_size_list<item: halffloat>\[4\] \(expected fixed_size_list<item: halffloat>\[8\]\).*simreg cache clear --key"):
        TargetCache(tmp_path, key, "t", 8).lookup(0, np.arange(3))
    assert (tmp_path / key_digest(key) / "meta.json").is_file()


def test_cache_cli_warm_info_clear(fmnist_root, tmp_path: Path, capsys):
    root = tmp_path / "cache"
    args = ["cache", "warm", "--dir", str(root), "data.train_size=40", "train.epochs=3", "augment.view_bank=2",
            "teacher_pool.batch_size=16", "teacher_pool.threads=1"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["view_indices"] == [0, 1] and rep["teachers"]["simclr_r10t"]["computed_rows"] == 80
    assert main(args) == 0  # everything is there already
    rep = json.loads(capsys.readouterr().out)
    assert rep["teachers"]["simclr_r10t"]["computed_rows"] == 0 and rep["teachers"]["simclr_r10t"]["cached_rows"] == 80
    assert main(["cache", "info", "--dir", str(root)]) == 0
    info = capsys.readouterr().out
    assert "1 key(s)" in info and "simclr_r10t" in info and " 80 " in info
    key = rep["teachers"]["simclr_r10t"]["key"]
    assert main(["cache", "clear", "--dir", str(root), "--key", "zzz"]) == 2
    assert "matches 0 entries" in capsys.readouterr().err
    assert main(["cache", "clear", "--dir", str(root), "--key", key[:6]]) == 0
    assert key in capsys.readouterr().out and cache_entries(root) == []


def test_view_bank_cycles_views(fmnist_small):
    plan = ViewPlan(ViewSpec(64), bank=2)
    b = {"sample_id": fmnist_small.sample_ids[:4], "label": fmnist_small.labels[:4], "image": fmnist_small.images[:4]}
    e0, e1, e2 = (add_views(b, epoch=e, seed=0, plan=plan) for e in range(3))
    assert (e2["view_index"] == 0).all() and (e2["epoch"] == 2).all() and (e1["view_index"] == 1).all()
    np.testing.assert_array_equal(e0["view"], e2["view"])
    assert not np.array_equal(e0["view"], e1["view"])
    torch.testing.assert_close(torch.from_numpy(add_views(b, epoch=2, seed=0, plan=ViewPlan(ViewSpec(64)))["view"]),
                               torch.from_numpy(add_views(b, epoch=2, seed=0, plan=ViewPlan(ViewSpec(64), bank=5))["view"]))
