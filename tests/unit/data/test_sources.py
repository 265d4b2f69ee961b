"""The data-source seam: a registered source is selected by ``data.source`` everywhere; unknown names are refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simreg.models.errors import ConfigError, DataError
from simreg.orchestrator.config import load_config
from simreg.orchestrator.data.imageset import ImageSet, content_fingerprint
from simreg.orchestrator.data.sources import SOURCES, DataSource, register_source, resolve_source


@pytest.fixture
def noise_source():
    @register_source("noise-test")
    class NoiseSource(DataSource):
        needs_root = "data.source=noise-test needs data.root=ANY (a test source)"

        def load(self, data, seed, *, stream=False):
            rng = np.random.default_rng(123)
            imgs = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
            labels = np.arange(40, dtype=np.int64) % 4
            full = ImageSet(imgs, labels, np.arange(40, dtype=np.int64), list("abcd"), "noise", content_fingerprint(imgs, labels))
            return full.take(np.arange(30), "train"), full.take(np.arange(30, 40), "held")

        @classmethod
        def detect(cls, path: Path) -> bool:
            return path.name.endswith(".noise")

    yield NoiseSource
    SOURCES.pop("noise-test")


def test_unknown_source_is_refused_with_the_registered_names():
    with pytest.raises(ConfigError, match=r"data\.source: unknown data source; use one of \['fashion-mnist', 'image-folder', 'packed', 'synthetic'\]"):
        load_config(None, ["data.source=imagenet"])


def test_a_registered_source_runs_through_prepare(noise_source):
    from simreg.orchestrator.train.prepare import prepare

    with pytest.raises(ConfigError, match="noise-test needs data.root=ANY"):
        load_config(None, ["data.source=noise-test"])
    small = ["data.source=noise-test", "data.root=x", "data.train_size=20", "data.knn_query_size=5", "eval.val_every=0", "data.view_size=16"]
    with pytest.raises(DataError, match=r"k-NN with k=20 needs at least 20 images in its bank, which holds 10: raise data.knn_bank_size \(now 10\)"):
        prepare(load_config(None, [*small, "data.knn_bank_size=10"]), quiet=True)  # before any training, not after it
    cfg = load_config(None, [*small, "data.knn_bank_size=20"])
    prep = prepare(cfg, quiet=True)
    assert len(prep.train) == 20 and prep.train.name == "noise/train"
    assert len(prep.final_eval.query) == 5 and set(prep.final_eval.query.sample_ids.tolist()) <= set(range(30, 40))
    assert prep.train.source_fingerprint  # the target cache keys on it


def test_resolve_source_asks_each_source(noise_source, tmp_path: Path):
    assert resolve_source("fashion-mnist") == ("fashion-mnist", None)
    assert resolve_source(str(tmp_path / "x.noise")) == ("noise-test", str(tmp_path / "x.noise"))
    assert resolve_source(str(tmp_path)) == ("image-folder", str(tmp_path))


def test_the_documented_source_example_works(tmp_path: Path, monkeypatch):
    """docs/architecture.md's "Add a data source" example, as a module of its own, through prepare()."""
    import importlib
    import re
    import sys

    doc = (Path(__file__).resolve().parents[3] / "docs" / "architecture.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "register_source" in b)
    (tmp_path / "doc_source_example.py").write_text(code.replace('"my-source"', '"doc-example"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("doc_source_example")
    try:
        data = tmp_path / "d"
        data.mkdir()
        rng = np.random.default_rng(0)
        np.save(data / "images.npy", rng.integers(0, 256, (50, 20, 20, 3), dtype=np.uint8))
        np.save(data / "labels.npy", np.arange(50) % 5)
        (data / "classes.txt").write_text("a b c d e")
        from simreg.orchestrator.train.prepare import prepare

        cfg = load_config(None, ["data.source=doc-example", f"data.root={data}", "data.train_size=30", "data.knn_bank_size=20",
                                 "data.knn_query_size=5", "eval.val_every=0", "data.view_size=16"])
        prep = prepare(cfg, quiet=True)
        assert len(prep.train) == 30 and prep.train.classes == list("abcde") and prep.train.source_fingerprint
        assert resolve_source(str(data)) == ("doc-example", str(data))
    finally:
        SOURCES.pop("doc-example", None)
        sys.modules.pop("doc_source_example", None)
