"""The target cache touches only what it wrote (`simreg cache clear`), and a cache it cannot write to (disk
full, no permission) costs a warning, never the run."""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from simreg.orchestrator.cache.admin import cache_entries, clear_cache
from simreg.orchestrator.cache.targets import CacheSpec, TargetCache, key_digest
from simreg.orchestrator.cli.main import main
from simreg.orchestrator.data.views import ViewPlan, ViewSpec, add_views
from simreg.orchestrator.pipeline.teacher import TeacherInference, TeacherSpec


def _cache_with_one_key(root: Path) -> str:
    c = TargetCache(root, {"k": 1}, "t", 4)
    c.store(0, np.arange(3), np.ones((3, 4), np.float16))
    return c.dir.name


def _not_keys(root: Path) -> list[Path]:
    """Folders and files under a cache root that simreg did not write, three with a meta.json."""
    bogus = {"photos": {"key": {"k": 1}, "teacher": "t", "dim": 4, "created": "x"},  # not a key's name
             "0" * 20: {"key": {"k": 1}, "teacher": "t", "dim": 4, "created": "x"},  # its key digests to another name
             key_digest({"k": 2}): {"key": {"k": 2}}}  # meta.json lacks fields simreg writes
    out = []
    for name, meta in bogus.items():
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text(json.dumps(meta))
        out.append(root / name / "meta.json")
    (root / "README.txt").write_text("mine")
    return [*out, root / "README.txt"]


def test_clear_removes_only_simreg_key_folders_and_says_so(tmp_path: Path, caplog):
    key = _cache_with_one_key(tmp_path)
    others = _not_keys(tmp_path)
    assert [r["key"] for r in cache_entries(tmp_path)] == [key]
    with caplog.at_level(logging.INFO, logger="simreg"):
        assert clear_cache(tmp_path) == [key]
    assert not (tmp_path / key).exists() and all(p.is_file() for p in others)
    said = [r.getMessage() for r in caplog.records if "cache clear" in r.getMessage()]
    assert len(said) == 1 and "removing 1 key folder(s)" in said[0] and f"{key} (0.0 MiB)" in said[0]
    assert "4 other entries there, not simreg cache keys, left alone" in said[0]


def test_cli_clear_leaves_other_folders(tmp_path: Path, capsys):
    key = _cache_with_one_key(tmp_path)
    others = _not_keys(tmp_path)
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert f"removed 1 key(s) from {tmp_path}: {key}" in capsys.readouterr().out
    assert all(p.is_file() for p in others)


def _enospc_halfway(monkeypatch) -> list[Path]:
    """Every file write from now on writes half its bytes, then fails as a full disk does."""
    tried: list[Path] = []

    def full(self: Path, data: bytes) -> int:
        tried.append(self)
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    return tried


def test_a_full_disk_warns_once_and_targets_are_still_computed(teachers_dir: Path, fmnist_small, tmp_path: Path,
                                                                caplog, monkeypatch):
    spec = TeacherSpec("r10t", "resnet10t", str(teachers_dir / "fmnist_simclr_resnet10t.safetensors"), 64, (0.286,) * 3, (0.353,) * 3)
    batches = [add_views({"sample_id": fmnist_small.sample_ids[r], "label": fmnist_small.labels[r], "image": fmnist_small.images[r]},
                         epoch=v, seed=0, plan=ViewPlan(ViewSpec(64))) for v, r in ((0, slice(0, 16)), (1, slice(16, 32)))]
    online = [TeacherInference(spec, threads=1, device="cpu")(dict(b))["target_r10t"] for b in batches]
    cspec = CacheSpec(str(tmp_path), fmnist_small.source_fingerprint, {"seed": 0})
    inf = TeacherInference(spec, threads=1, device="cpu", cache=cspec)
    tried = _enospc_halfway(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="simreg"):
        got = [inf(dict(b))["target_r10t"] for b in batches]
    for g, o in zip(got, online, strict=True):
        assert np.array_equal(g.view(np.uint16), o.view(np.uint16))  # the run got every target
    assert inf.forward_rows == 32 and len(tried) == 1  # after the first failure no write is tried again
    warned = [r.getMessage() for r in caplog.records if "target cache" in r.getMessage()]
    assert len(warned) == 1 and f"cannot write to {inf.cache.dir}" in warned[0] and "No space left on device" in warned[0]
    assert "cache.enabled=false" in warned[0]
    monkeypatch.undo()
    assert not [p for p in inf.cache.dir.local_path.rglob("*") if p.is_file()]  # no shard, no half file
    reader = TargetCache(tmp_path, inf.cache.key, "r10t", inf.teacher.feature_dim)
    assert not reader.lookup(0, batches[0]["sample_id"])[1].any()


def test_an_unwritable_cache_folder_warns_once(tmp_path: Path, caplog, monkeypatch):
    def denied(self: Path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with caplog.at_level(logging.WARNING, logger="simreg"):
        c = TargetCache(tmp_path / "ro", {"k": 1}, "t", 4)
        c.store(0, np.arange(3), np.ones((3, 4), np.float16))
        c.store(1, np.arange(3), np.ones((3, 4), np.float16))
    assert c.write_error is not None and "Permission denied" in c.write_error
    assert sum("cannot write to" in r.getMessage() for r in caplog.records) == 1
    tg, found = c.lookup(1, np.arange(3))  # still served in this process
    assert found.all() and (tg == 1).all()


def test_only_storage_errors_are_swallowed(tmp_path: Path, monkeypatch):
    c = TargetCache(tmp_path, {"k": 1}, "t", 4)

    def broken(self: Path, data: bytes) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(ValueError, match="a bug"):
        c.store(0, np.arange(3), np.ones((3, 4), np.float16))
