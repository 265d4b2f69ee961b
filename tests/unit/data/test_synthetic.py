"""``data.source=synthetic``: images and labels as pure functions of (seed, split, index), lazy rows, O(1) pieces."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from simreg.models.errors import ConfigError
from simreg.orchestrator.config import load_config
from simreg.orchestrator.data.imageset import StreamedImages, ids_of
from simreg.orchestrator.data.sources import load_splits, resolve_source
from simreg.orchestrator.data.synthetic import GENERATOR_VERSION, SyntheticGenerator, SyntheticRows, synthetic_split

GEN = SyntheticGenerator(seed=0, split=0, size=32, channels=3, classes=10)

# sha256 of SyntheticGenerator(0, 0, 32, 3, 10).images(arange(64)) at GENERATOR_VERSION 1: a change to the rendering must bump
# the version (the target cache keys on it), then update this digest
GOLDEN = {1: "7017282722ee18e6388fe3dcdba840763c93a9f23f7587f0660678042f1922d9"}


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_an_image_does_not_depend_on_its_batch():
    ids = np.arange(300)
    whole = GEN.images(ids)
    assert whole.shape == (300, 32, 32, 3) and whole.dtype == np.uint8
    assert np.array_equal(GEN.images(ids, batch=7), whole)  # other batch boundaries
    picked = np.array([299, 5, 17, 5, 120])
    assert np.array_equal(GEN.images(picked), whole[picked])  # other neighbours, any order, repeats
    assert np.array_equal(GEN.labels(picked), GEN.labels(ids)[picked])
    assert whole.std() > 20  # images, not a constant
    assert not np.array_equal(whole[0], whole[1])


def test_the_same_bytes_in_a_fresh_process_and_as_pinned():
    code = ("import hashlib, numpy as np; from simreg.orchestrator.data.synthetic import SyntheticGenerator; "
            "print(hashlib.sha256(SyntheticGenerator(0, 0, 32, 3, 10).images(np.arange(64)[::-1]).tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == _digest(GEN.images(np.arange(64)[::-1]))
    assert _digest(GEN.images(np.arange(64))) == GOLDEN[GENERATOR_VERSION], "the images changed: bump GENERATOR_VERSION"


def test_lazy_rows_select_without_rendering_and_pieces_read_the_same_rows():
    full = synthetic_split(GEN, 1000)
    rows = full.images
    assert isinstance(rows, SyntheticRows) and isinstance(rows, StreamedImages) and full.streamed
    assert rows.shape == (1000, 32, 32, 3) and len(full) == 1000
    assert rows[100:228].ids is None and rows[100:228].start == 100  # a slice stays a range
    sub = full.subset(150, seed=3)
    assert isinstance(sub.images, SyntheticRows) and len(sub.images) == 150
    assert np.array_equal(sub.sample_ids, sub.images.ids)
    dense = np.asarray(sub.images)
    assert np.array_equal(dense, GEN.images(sub.sample_ids)) and np.array_equal(sub.labels, GEN.labels(sub.sample_ids))
    for lazy in (rows[100:400], sub.images):
        pieces = lazy.pieces(64)
        rows_of = pa.Table.from_pylist(pieces).to_pylist()  # one Arrow schema, as Ray Data's from_items blocks hold them
        got = [SyntheticRows.read_piece(p) for p in rows_of]
        ids = np.concatenate([g["sample_id"] for g in got])
        assert sorted(ids.tolist()) == sorted(np.asarray(lazy._ids()).tolist()) and max(len(g["sample_id"]) for g in got) <= 64
        order = np.argsort(ids)
        want = np.asarray(lazy[np.argsort(np.asarray(lazy._ids()))])
        assert np.array_equal(np.concatenate([g["image"] for g in got])[order], want)
        assert np.array_equal(np.concatenate([g["label"] for g in got]), GEN.labels(ids))
    blocks = list(sub.blocks(64))  # what `simreg cache warm` reads
    assert sum(len(b["sample_id"]) for b in blocks) == 150


def test_pieces_of_a_million_images_are_small_and_fast():
    t0 = time.perf_counter()
    full = synthetic_split(SyntheticGenerator(0, 0, 96, 3, 10), 1_000_000)
    pieces = full.images.pieces(128)  # teacher_pool.batch_size rows each
    text = json.dumps(pieces)
    took = time.perf_counter() - t0
    assert len(pieces) == 7813 and max(len(json.dumps(p)) for p in pieces) < 64  # O(1) each: {gen, start, stop}
    # 0.1 s here; the bound only catches a structural slip (rendering the 1,000,000 images would take minutes)
    assert len(text) < 500_000 and took < 5.0, (len(text), took)
    assert full.labels.dtype == np.int64 and full.labels.nbytes == 8_000_000  # the labels are all it holds per image
    assert SyntheticRows.read_piece(pieces[-1])["image"].shape == (1_000_000 - 7812 * 128, 96, 96, 3)


def test_labels_are_balanced():
    counts = np.bincount(GEN.labels(np.arange(100_000)), minlength=10)
    assert counts.min() > 9_500 and counts.max() < 10_500, counts
    assert set(SyntheticGenerator(0, 0, 32, 3, 3).labels(np.arange(100)).tolist()) == {0, 1, 2}


def test_a_pixel_knn_is_well_above_chance_and_below_perfect():
    from simreg.orchestrator.evaluation.knn import knn_top1

    held = SyntheticGenerator(0, 1, 32, 3, 10)
    bank, query = GEN.images(np.arange(2000)), held.images(np.arange(1000))
    fb = torch.nn.functional.normalize(torch.tensor(bank.reshape(2000, -1), dtype=torch.float32), dim=1)
    fq = torch.nn.functional.normalize(torch.tensor(query.reshape(1000, -1), dtype=torch.float32), dim=1)
    acc = knn_top1(fb, torch.tensor(GEN.labels(np.arange(2000))), fq, torch.tensor(held.labels(np.arange(1000))), ks=(20,))[20]
    assert 20.0 < acc < 90.0, acc  # chance: 10%


def test_fingerprint_names_the_generator_and_the_split():
    fp = synthetic_split(GEN, 1000).source_fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert synthetic_split(SyntheticGenerator(0, 0, 32, 3, 10), 1000).source_fingerprint == fp
    others = [synthetic_split(SyntheticGenerator(1, 0, 32, 3, 10), 1000), synthetic_split(SyntheticGenerator(0, 1, 32, 3, 10), 1000),
              synthetic_split(SyntheticGenerator(0, 0, 64, 3, 10), 1000), synthetic_split(SyntheticGenerator(0, 0, 32, 1, 10), 1000),
              synthetic_split(SyntheticGenerator(0, 0, 32, 3, 7), 1000), synthetic_split(GEN, 999)]
    assert len({fp, *(o.source_fingerprint for o in others)}) == 7


def test_config_loads_through_load_splits_and_subsets_stay_lazy():
    cfg = load_config(None, ["data.source=synthetic", "data.synthetic.images=1000", "data.synthetic.held_out=200",
                             "data.store_size=32", "data.train_size=300", "data.stream=false"])
    train_full, held = load_splits(cfg.data, cfg.seed)
    assert len(train_full) == 1000 and len(held) == 200 and train_full.streamed  # streamed whatever data.stream says
    assert train_full.classes == [f"class-{c}" for c in range(10)] and train_full.name == "synthetic:0/train"
    train = train_full.subset(cfg.data.train_size, cfg.seed)
    assert len(train) == 300 and train.streamed and train.source_fingerprint == train_full.source_fingerprint
    pieces = train.images.pieces(128)
    assert all(isinstance(p["ids"], bytes) and 0 < len(ids_of(p)) <= 128 for p in pieces)  # a subset's ids: 8 bytes each
    assert np.array_equal(np.sort(np.concatenate([ids_of(p) for p in pieces])), np.sort(train.sample_ids))
    bank = train_full.subset(100, cfg.seed + 1).materialized()
    assert isinstance(bank.images, np.ndarray) and bank.images.shape == (100, 32, 32, 3)
    # the held-out split: ids of its own, images of another hash stream
    assert held.source_fingerprint != train_full.source_fingerprint
    assert not np.array_equal(np.asarray(held.images[:4]), np.asarray(train_full.images[:4]))
    assert resolve_source("synthetic") == ("synthetic", None)  # simreg eval --data synthetic


def test_one_channel_images_go_through_the_views():
    from simreg.orchestrator.data.views import ViewPlan, ViewSpec, add_views

    gray = SyntheticGenerator(0, 0, 32, 1, 10)
    rows = synthetic_split(gray, 100).images
    assert rows.shape == (100, 32, 32) and np.asarray(rows[:5]).shape == (5, 32, 32)
    batch = SyntheticRows.read_piece(rows.pieces(16)[0])
    out = add_views(batch, epoch=0, seed=0, plan=ViewPlan(ViewSpec(size=24)))
    assert out["view"].shape == (16, 1, 24, 24)


@pytest.mark.parametrize(("override", "key", "why"), [
    ("data.synthetic.channels=2", "data.synthetic.channels", "1 or 3"),
    ("data.synthetic.classes=1", "data.synthetic.classes", "greater than or equal to 2"),
    ("data.synthetic.images=0", "data.synthetic.images", "greater than or equal to 2"),
    ("data.synthetic.held_out=-1", "data.synthetic.held_out", "greater than or equal to 1"),
    ("data.synthetic.pictures=5", "data.synthetic.pictures", "valid keys here: ['channels', 'classes', 'held_out', 'images', 'seed']"),
])
def test_bad_values_name_the_key(override: str, key: str, why: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=synthetic", override])
    line = next(ln for ln in str(e.value).splitlines() if ln.startswith("  - "))
    assert line.startswith(f"  - {key}: ") and why in line, str(e.value)
