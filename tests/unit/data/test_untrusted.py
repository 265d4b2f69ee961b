"""Files in user storage are data, never code: a pack or cache shard that declares Ray's pickled-object
Arrow type (live here: ray.data registers it) is refused before any value is read, and the pickle inside
never runs; a manifest's split and shard names stay inside the pack."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data  # noqa: F401  (registers ray.data.arrow_pickled_object with pyarrow: the exploit is live)
from ray.air.util.object_extensions.arrow import ArrowPythonObjectType

from simreg.models.errors import DataError
from simreg.orchestrator.cache.targets import TargetCache
from simreg.orchestrator.data.pack.format import MANIFEST, PACK_FORMAT, PACK_VERSION, SCHEMA
from simreg.orchestrator.data.pack.schema_guard import declared_columns
from simreg.orchestrator.data.packed import load_packed_splits


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # a pickle.loads of this object creates the marker file
        return (Path.touch, (self.marker,))


def _pickled(marker: Path, n: int = 1) -> pa.ExtensionArray:
    t = ArrowPythonObjectType()
    return t.wrap_array(pa.array([pickle.dumps(_WritesMarker(marker))] * n, type=t.storage_type))


def _manifest(shards: list[str], split: str = "all") -> dict:
    return {"format": PACK_FORMAT, "version": PACK_VERSION, "classes": ["a"], "train": split, "held_out": None,
            "splits": {split: {"rows": 1, "shards": shards, "bytes": 1, "fingerprint": "0" * 64}}}


def _pickled_pack(root: Path, marker: Path) -> Path:
    (root / "all").mkdir(parents=True)
    pq.write_table(pa.table({
        "sample_id": pa.array([0, 1], pa.int64()), "label": pa.array([0, 0], pa.int64()), "image": _pickled(marker, 2),
        "path": ["a/x.png", "a/y.png"], "mode": ["RGB", "RGB"],
    }), root / "all" / "part-00000.parquet")
    m = _manifest(["part-00000.parquet"])
    m["splits"]["all"]["rows"] = 2
    (root / MANIFEST).write_text(json.dumps(m))
    return root


def test_the_crafted_shard_is_live_without_the_guard(tmp_path: Path):
    """The exploit the guard stops: the same file read plainly runs the pickle (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    pack = _pickled_pack(tmp_path / "pack", marker)
    pq.read_table(pack / "all" / "part-00000.parquet")["image"].to_pylist()
    assert marker.exists()


@pytest.mark.parametrize("lazy", [False, True], ids=["in-memory", "streamed"])
def test_pickled_pack_shard_refused_and_never_unpickled(tmp_path: Path, lazy: bool):
    marker = tmp_path / "pwned"
    pack = _pickled_pack(tmp_path / "pack", marker)
    with pytest.raises(DataError) as e:
        train, _ = load_packed_splits(pack, 16, 0, 0.5, lazy=lazy)
        np.asarray(train.images)  # streamed: the images are read only now
    msg = str(e.value)
    assert "part-00000.parquet" in msg and "column 'image' is the Arrow extension type ray.data.arrow_pickled_object" in msg
    assert "(expected binary)" in msg and "simreg data pack" in msg and "\n" not in msg
    assert not marker.exists()


def test_schema_read_builds_no_extension_type(tmp_path: Path):
    """A registered extension type's own deserialiser runs on pq.read_schema; the guard's footer read never calls it."""
    calls = tmp_path / "deserialised"

    class Hostile(pa.ExtensionType):
        def __init__(self) -> None:
            super().__init__(pa.binary(), "simreg.test.hostile")

        def __arrow_ext_serialize__(self) -> bytes:
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            calls.touch()
            return cls()

    pa.register_extension_type(Hostile())
    try:
        f = tmp_path / "x.parquet"
        pq.write_table(pa.table({"sample_id": pa.array([0], pa.int64()), "target": Hostile().wrap_array(pa.array([b"x"]))}), f)
        types, exts, n = declared_columns(str(f))
        assert not calls.exists() and exts == {"target": ["simreg.test.hostile"]} and n == 1 and types["target"] == pa.binary()
        pq.read_schema(f)
        assert calls.exists()  # what the guard avoids
    finally:
        pa.unregister_extension_type("simreg.test.hostile")


def test_pickled_cache_shard_refused_and_never_unpickled(tmp_path: Path):
    marker = tmp_path / "pwned"
    cache = TargetCache(tmp_path / "cache", {"k": 1}, "t", 4)
    vdir = cache.dir.local_path / "v00000" / "b0000000"
    vdir.mkdir(parents=True)
    target = pa.FixedSizeListArray.from_arrays(_pickled(marker, 8), 4)  # the pickles nested in the target lists
    name = "part-000000000000-000000000001-0000002-0123456789abcdef.parquet"  # named as simreg names its shards
    pq.write_table(pa.table({"sample_id": pa.array([0, 1], pa.int64()), "target": target}), vdir / name)
    with pytest.raises(DataError, match=r"part-000000000000-000000000001-0000002-0123456789abcdef.parquet.*column 'target' is the Arrow extension type "
                                        r"ray.data.arrow_pickled_object \(expected fixed_size_list<item: halffloat>\[4\]\)"
                                        r".*simreg cache clear --key"):
        TargetCache(tmp_path / "cache", {"k": 1}, "t", 4).lookup(0, np.arange(2))
    assert not marker.exists()


def test_shard_with_other_columns_is_refused(tmp_path: Path):
    pack = tmp_path / "pack"
    (pack / "all").mkdir(parents=True)
    t = pa.table({"sample_id": pa.array([0], pa.int32()), "label": pa.array([0], pa.int64()), "image": [b"x"],
                  "path": ["a"], "extra": ["?"]})
    pq.write_table(t, pack / "all" / "part-00000.parquet")
    (pack / MANIFEST).write_text(json.dumps(_manifest(["part-00000.parquet"])))
    with pytest.raises(DataError) as e:
        load_packed_splits(pack, 16, 0, 0.5)
    msg = str(e.value)
    assert "column 'extra' (string) is not one simreg writes" in msg and "column 'mode' (string) is missing" in msg
    assert "column 'sample_id' is int32 (expected int64)" in msg


def test_real_shard_schema_is_accepted(tmp_path: Path):
    f = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"sample_id": [0], "label": [1], "image": [b"x"], "path": ["a"], "mode": ["L"]}, schema=SCHEMA), f)
    types, exts, n = declared_columns(str(f))
    assert types == {x.name: x.type for x in SCHEMA} and exts == {} and n == 0


@pytest.mark.parametrize("name", ["../../outside.parquet", "/etc/passwd", "sub/part-00000.parquet", "..", "part-1.parquet",
                                  "part-00000.parquet\x00", 7])
def test_manifest_shard_names_stay_in_the_pack(tmp_path: Path, name):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / MANIFEST).write_text(json.dumps(_manifest([name])))
    with pytest.raises(DataError, match=r"manifest.json' is not a manifest this simreg writes: splits.all.shards holds .*"
                                        r"plain file name part-NNNNN.parquet"):
        load_packed_splits(pack, 16, 0, 0.5)


@pytest.mark.parametrize("split", ["..", "/tmp", "a/b", ".hidden"])
def test_manifest_split_names_stay_in_the_pack(tmp_path: Path, split: str):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / MANIFEST).write_text(json.dumps(_manifest(["part-00000.parquet"], split=split)))
    with pytest.raises(DataError, match=r"split name .* is not a plain folder name"):
        load_packed_splits(pack, 16, 0, 0.5)


def test_manifest_field_types_are_checked_all_at_once(tmp_path: Path):
    pack = tmp_path / "pack"
    pack.mkdir()
    m = _manifest(["part-00000.parquet"])
    m["classes"] = "a"
    m["splits"]["all"].update(rows="1", fingerprint=None)
    m["held_out"] = "val"
    (pack / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        load_packed_splits(pack, 16, 0, 0.5)
    msg = str(e.value)
    for part in ("classes is not a non-empty list", "splits.all.rows is '1', not an integer", "splits.all.fingerprint is None",
                 "held_out='val' is not another of its splits"):
        assert part in msg, part


def test_truncated_shard_is_named_unreadable(tmp_path: Path):
    pack = _pickled_pack(tmp_path / "pack", tmp_path / "pwned")
    shard = pack / "all" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"pack shard '.*part-00000.parquet' is unreadable: it does not end in a plain "
                                        r"Parquet footer .*simreg data pack"):
        load_packed_splits(pack, 16, 0, 0.5)
