"""Teacher weights from a bucket (moto's S3 server), an https URL (a server on 127.0.0.1) and the Hugging Face
Hub (a cache laid out in a temporary folder, offline): fetched once per node into a content-addressed cache,
fetched again when the object changed, a sha256 pin checked, every failure one line; the teacher built from
them is the real one."""
from __future__ import annotations

import hashlib
import http.server
import threading
import uuid
from functools import partial
from pathlib import Path

import pytest

from simreg.models.errors import TeacherLoadError
from simreg.orchestrator.config import WEIGHTS_DIR, load_config
from simreg.orchestrator.pipeline.teacher import TeacherSpec
from simreg.orchestrator.storage import Store
from simreg.orchestrator.weights_fetch import local_weights

BUILTIN = WEIGHTS_DIR / "fmnist_simclr_resnet10t.safetensors"
FM = ((0.286,) * 3, (0.353,) * 3)


@pytest.fixture(autouse=True)
def weights_cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "weights-cache"
    monkeypatch.setenv("SIMREG_WEIGHTS_CACHE", str(d))
    return d


def _spec(ref: str, sha256: str | None = None) -> TeacherSpec:
    return TeacherSpec("t", "resnet10t", ref, 64, *FM, key="teachers.0", sha256=sha256)


def test_weights_from_a_bucket_are_fetched_once_per_node_and_again_when_changed(s3, weights_cache, monkeypatch):
    uri = f"s3://simreg-test/teachers/{uuid.uuid4().hex[:8]}/r10t.safetensors"
    data = BUILTIN.read_bytes()
    Store(uri).write_bytes(data)
    teacher = _spec(uri).build()
    assert teacher.feature_dim == 512 and teacher.weights_sha256 == hashlib.sha256(data).hexdigest()
    assert (weights_cache / f"{teacher.weights_sha256}.safetensors").read_bytes() == data

    from simreg.orchestrator import weights_fetch

    def no_read(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("fetched again")

    with monkeypatch.context() as m:  # the second time: from this node's cache, not the bucket
        m.setattr(weights_fetch, "_chunks", no_read)
        assert local_weights(uri) == str(weights_cache / f"{teacher.weights_sha256}.safetensors")
    changed = data[:-4] + b"\0\0\0\0"  # the object replaced: fetched again
    Store(uri).write_bytes(changed)
    assert Path(local_weights(uri)).read_bytes() == changed


def test_a_pin_is_checked_before_use(s3):
    uri = f"s3://simreg-test/teachers/{uuid.uuid4().hex[:8]}/r10t.safetensors"
    Store(uri).write_bytes(BUILTIN.read_bytes())
    good = hashlib.sha256(BUILTIN.read_bytes()).hexdigest()
    assert _spec(uri, sha256=good.upper()).build().weights_sha256 == good
    from simreg.orchestrator import weights_fetch

    def no_store(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the store was asked")

    with pytest.MonkeyPatch.context() as m:  # pinned and on this node already: the store is not asked at all
        m.setattr(weights_fetch, "_fetched", no_store)
        assert Path(local_weights(uri, good)).name == f"{good}.safetensors"
    with pytest.raises(TeacherLoadError) as e:
        _spec(uri, sha256="0" * 64).build()
    assert str(e.value).startswith(f"teachers.0.weights='{uri}' has sha256 {good}, not the pinned teachers.0.sha256=000")
    with pytest.raises(TeacherLoadError, match=r"does not exist \(or is not a file\): check the URI"):
        _spec(uri + ".missing").build()
    from simreg.models.errors import ConfigError

    with pytest.raises(ConfigError, match="this URI holds credentials"):
        load_config(None, ["teachers.0.weights=https://h/w.safetensors?X-Amz-Signature=abc"])
    cfg = load_config(None, [f"teachers.0.weights={uri}", f"teachers.0.sha256={good}"])
    assert cfg.teachers[0].weights_ref() == uri  # a URI stays one (it is fetched where it is loaded)


def test_weights_from_an_https_url(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "r10t.safetensors").write_bytes(BUILTIN.read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert _spec(f"{base}/r10t.safetensors").build().feature_dim == 512
        with pytest.raises(TeacherLoadError, match=r"cannot fetch it \(HTTP Error 404"):
            _spec(f"{base}/missing.safetensors").build()
        # a URL is fetched once; a new pin for new bytes behind it fetches them again
        data = BUILTIN.read_bytes()
        changed = data[:-4] + b"\0\0\0\0"
        (served / "r10t.safetensors").write_bytes(changed)
        pin = hashlib.sha256(changed).hexdigest()
        assert Path(local_weights(f"{base}/r10t.safetensors", pin)).read_bytes() == changed
    finally:
        server.shutdown()


def test_weights_from_the_hub_offline_from_its_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "models--simreg--fmnist-r10t" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(BUILTIN.read_bytes())
    (cache / "models--simreg--fmnist-r10t" / "refs").mkdir()
    (cache / "models--simreg--fmnist-r10t" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _spec("hf-hub:simreg/fmnist-r10t").build().feature_dim == 512
    with pytest.raises(TeacherLoadError) as e:
        _spec("hf-hub:simreg/not-cached").build()
    assert "is in the local Hugging Face cache and HF_HUB_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TeacherLoadError, match="write hf-hub:ORG/NAME"):
        _spec("hf-hub:no-org").build()
