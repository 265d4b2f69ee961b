"""A teacher's targets are stored under the sha256 of the bytes it loaded, whatever the file held when a key was
built before; the driver's hash of a file is never one of an earlier file at that path."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from simreg.models import InputTransform, load_teacher
from simreg.models.teachers import random_teacher
from simreg.orchestrator import weights_fetch
from simreg.orchestrator.cache.targets import CacheSpec
from simreg.orchestrator.pipeline.teacher import TeacherInference, TeacherSpec, teacher_fingerprint
from simreg.orchestrator.weights_fetch import weights_sha256

TF = InputTransform(32, (0.5,) * 3, (0.25,) * 3)


def _weights(path: Path, seed: int) -> bytes:
    """``test_resnet`` under ``seed`` as a safetensors file (every seed: the same tensors, so the same size)."""
    save_file(random_teacher("t", "test_resnet", seed, TF).backbone.state_dict(), str(path))
    return path.read_bytes()


def _replace_keeping_size_and_mtime(path: Path, seed: int) -> bytes:
    """Other weights at ``path``, written beside it and renamed over it, with the old file's mtime."""
    st = path.stat()
    new = _weights(path.with_name("next.safetensors"), seed)
    os.replace(path.with_name("next.safetensors"), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    return new


@pytest.fixture
def remembered(monkeypatch):
    """Hashes remembered however recent the file (a file of a test is seconds old)."""
    monkeypatch.setattr(weights_fetch, "_SHA_MEMO", {})
    monkeypatch.setattr(weights_fetch, "RACY_NS", 0)


def test_a_teacher_stores_under_the_hash_of_the_bytes_it_loaded(tmp_path: Path, remembered):
    path = tmp_path / "w.safetensors"
    old = _weights(path, 0)
    spec = TeacherSpec("t", "test_resnet", str(path), 32, (0.5,) * 3, (0.25,) * 3)
    driver = teacher_fingerprint(spec, False, True)  # the driver's key, before any teacher loads
    assert driver["weights_sha256"] == hashlib.sha256(old).hexdigest()
    new = _replace_keeping_size_and_mtime(path, 1)
    inf = TeacherInference(spec, threads=1, device="cpu", cache=CacheSpec(str(tmp_path / "cache"), "data"))
    assert inf.fingerprint()["weights_sha256"] == hashlib.sha256(new).hexdigest()
    assert inf.cache is not None and inf.cache.key["teacher"]["weights_sha256"] == hashlib.sha256(new).hexdigest()
    runs, again = inf.teacher.state_dict(), load_teacher("t", "test_resnet", path, TF).state_dict()
    assert runs.keys() == again.keys() and all(torch.equal(runs[k], again[k]) for k in runs)  # those bytes are what it runs


def test_the_driver_hashes_a_replaced_file_again(tmp_path: Path, remembered):
    path = tmp_path / "w.safetensors"
    old = _weights(path, 0)
    assert weights_sha256(path) == hashlib.sha256(old).hexdigest()
    assert weights_sha256(path) == hashlib.sha256(old).hexdigest()  # remembered
    new = _replace_keeping_size_and_mtime(path, 1)
    assert weights_sha256(path) == hashlib.sha256(new).hexdigest()


def test_a_file_just_written_is_not_remembered(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(weights_fetch, "_SHA_MEMO", {})
    path = tmp_path / "w.safetensors"
    data = _weights(path, 0)
    assert weights_sha256(path) == hashlib.sha256(data).hexdigest()
    assert weights_fetch._SHA_MEMO == {}  # a change within the filesystem's time resolution could keep every stat field
