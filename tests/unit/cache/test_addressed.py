"""The target cache is addressed, not loaded: a lookup lists only the buckets of its ids and reads only the shards
holding them; the shards a process keeps are bounded in bytes; an older layout is named, never read; a store that
cannot be read costs a warning, never the run; `cache info` answers from the writers' records."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simreg.orchestrator.cache.admin import cache_entries, entries_table
from simreg.orchestrator.cache.memory import MALLOC_TRIM, SHARDS
from simreg.orchestrator.cache.targets import BUCKET_ROWS, CACHE_VERSION, TargetCache, key_digest
from simreg.orchestrator.cli.main import main
from simreg.orchestrator.storage import Store

DIM = 64
KEY = {"version": CACHE_VERSION, "teacher": {"arch": "t"}, "data": "d", "views": {"seed": 0}}


def _targets(ids: np.ndarray, v: int = 0) -> np.ndarray:
    """A distinct, checkable target per (view, id)."""
    return (np.outer(ids + 1000 * v, np.ones(DIM)) % 2048).astype(np.float16)


def _fill(root: Path, n: int, block: int = 128, views: int = 1, memory_mib: float = 256) -> TargetCache:
    """A cache of ``n`` ids (in the pipeline's blocks of ``block`` consecutive ids) for ``views`` view indices."""
    c = TargetCache(root, KEY, "t", DIM, memory_mib)
    for v in range(views):
        for s in range(0, n, block):
            ids = np.arange(s, min(s + block, n))
            c.store(v, ids, _targets(ids, v))
    c.flush()
    return c


@pytest.fixture(autouse=True)
def _fresh_memory():
    """Each test reads as a new process would: nothing of an earlier test in this process's shard memory."""
    SHARDS.clear()
    SHARDS.set_limit(256)
    yield
    SHARDS.clear()
    SHARDS.set_limit(256)


@pytest.fixture
def io_count(monkeypatch) -> dict[str, list[str]]:
    """Every shard read and every folder listing of the cache, by path."""
    seen: dict[str, list[str]] = {"read": [], "list": []}
    read, listdir = Store.read_bytes, Store.listdir

    def counted_read(self: Store) -> bytes:
        seen["read"].append(self.path)
        return read(self)

    def counted_list(self: Store, dirs_only: bool = False) -> list[str]:
        seen["list"].append(self.path)
        return listdir(self, dirs_only)

    monkeypatch.setattr(Store, "read_bytes", counted_read)
    monkeypatch.setattr(Store, "listdir", counted_list)
    return seen


def test_a_lookup_reads_only_the_shards_of_its_ids(tmp_path: Path, io_count):
    n = 12 * BUCKET_ROWS  # 12 buckets of 32 shards each
    _fill(tmp_path, n)
    assert len(list(tmp_path.rglob("part-*.parquet"))) == n // 128
    SHARDS.clear()
    io_count["read"].clear()
    io_count["list"].clear()
    reader = TargetCache(tmp_path, KEY, "t", DIM)  # a fresh process: nothing in memory
    ids = np.arange(5 * BUCKET_ROWS + 256, 5 * BUCKET_ROWS + 384)  # one pipeline block
    got, found = reader.lookup(0, ids)
    assert found.all() and np.array_equal(got, _targets(ids))
    assert len(io_count["read"]) == 1 and io_count["read"][0].endswith(
        f"/b{5:07d}/part-{ids[0]:012d}-{ids[-1]:012d}-0000128-" + io_count["read"][0].rsplit("-", 1)[1])
    assert io_count["list"] == [str(reader.dir.path) + f"/v00000/b{5:07d}"]  # one bucket listed, not the view
    # ids scattered over three buckets (a subset's block): three listings, one shard read per id's block
    scattered = np.array([3, 4100, 4101, 9000, 9100])
    got, found = reader.lookup(0, scattered)
    assert found.all() and np.array_equal(got, _targets(scattered))
    assert len(io_count["list"]) == 4 and len(io_count["read"]) == 1 + 4  # 3 // 128, 4100-4101 // 128, 9000 and 9100
    again = len(io_count["read"])
    reader.lookup(0, ids)  # held in memory now: no read
    assert len(io_count["read"]) == again


def test_a_miss_lists_one_bucket_and_finds_another_writers_shard(tmp_path: Path, io_count):
    reader = TargetCache(tmp_path, KEY, "t", DIM)
    ids = np.arange(100, 164)
    assert not reader.lookup(0, ids)[1].any()
    writer = TargetCache(tmp_path, KEY, "t", DIM)  # another process writes them meanwhile
    writer.store(0, ids, _targets(ids))
    SHARDS.clear()
    io_count["list"].clear()
    got, found = reader.lookup(0, ids)  # local disk: a miss lists that bucket again (one small folder)
    assert found.all() and np.array_equal(got, _targets(ids)) and len(io_count["list"]) == 1
    assert not reader.lookup(0, np.arange(BUCKET_ROWS * 7, BUCKET_ROWS * 7 + 3))[1].any()


def test_the_memory_bound_holds_and_evicted_shards_are_read_again(tmp_path: Path, io_count):
    n = 2 * BUCKET_ROWS
    _fill(tmp_path, n, views=3, memory_mib=1)  # 3 x 8192 x 64 x 2 B = 3 MiB of targets, 1 MiB kept
    assert SHARDS.bytes <= 2**20 and len(SHARDS) > 0
    reader = TargetCache(tmp_path, KEY, "t", DIM, memory_mib=1)
    rng = np.random.default_rng(0)
    for v in range(3):
        for _ in range(8):
            ids = rng.choice(n, 200, replace=False)
            got, found = reader.lookup(v, ids)
            assert found.all() and np.array_equal(got, _targets(ids, v))
            assert SHARDS.bytes <= 2**20
    SHARDS.set_limit(0)  # memory_mib=0: nothing kept, every lookup still answered from storage
    assert SHARDS.bytes == 0
    before = len(io_count["read"])
    got, found = reader.lookup(1, np.arange(10))
    assert found.all() and np.array_equal(got, _targets(np.arange(10), 1)) and SHARDS.bytes == 0
    assert len(io_count["read"]) == before + 1


READER = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from simreg.orchestrator.cache.targets import TargetCache

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

root, n, mib, dim, block = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), 96, 512
cache = TargetCache(root, {"version": 2, "teacher": {"arch": "t"}}, "t", dim, mib)
rng = np.random.default_rng(0)
io, forward = ThreadPoolExecutor(4), ThreadPoolExecutor(1)  # as a teacher actor: lookups in 4 I/O threads, stores in one
peaks = []
for epoch in range(2):  # the first computes and stores every target, the second reads them back
    peak = 0.0
    for b in rng.permutation(n // block):
        ids = np.arange(b * block, (b + 1) * block)
        got, found = io.submit(cache.lookup, 0, ids).result()
        if not found.all():
            forward.submit(cache.store, 0, ids[~found], rng.standard_normal((int((~found).sum()), dim)).astype(np.float16)).result()
        peak = max(peak, anon())
    peaks.append(peak)
print(json.dumps({"growth_mib": peaks[1] - peaks[0]}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or MALLOC_TRIM is None,
                    reason="reads the process's memory from /proc; glibc's heap")
def test_a_reader_past_its_bound_holds_about_its_bound(tmp_path: Path):
    """A process that stores 3.5 x its cache.memory_mib of targets (300,000 of dim 96 in shards of 512, a 16 MiB
    bound), then reads them all back through 4 threads, holds in the second pass what it held in the first: not
    what the allocators keep of the shards it dropped (Arrow's heap per thread, glibc's holes)."""
    out = subprocess.run([sys.executable, "-c", READER, str(tmp_path), "300000", "16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
    # measured: 15-16 MiB; 39-42 when the shards' memory stayed with the allocators
    assert growth <= 28, f"the second pass's peak anonymous memory is {growth:.0f} MiB above the first's, with a 16 MiB bound"


def test_closing_a_cache_frees_its_shards(tmp_path: Path):
    a = _fill(tmp_path / "a", 1024)
    b = _fill(tmp_path / "b", 1024)
    held = SHARDS.bytes
    a.close()
    assert 0 < SHARDS.bytes < held
    b.close()
    assert SHARDS.bytes == 0


def test_an_older_layout_is_named_once_and_never_read(tmp_path: Path, caplog, capsys):
    old_key = {**KEY, "version": 1}
    old = tmp_path / key_digest(old_key)
    (old / "v00000").mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"key": old_key, "teacher": "t", "dim": DIM, "created": "2026-11-01T00:00:00"}))
    (old / "v00000" / "part-0123456789abcdef.parquet").write_bytes(b"never read")
    c = TargetCache(tmp_path, KEY, "t", DIM)
    with caplog.at_level(logging.WARNING, logger="simreg"):
        assert not c.lookup(0, np.arange(4))[1].any()
        c.lookup(1, np.arange(4))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "layout of cache version 1, which this simreg does not read" in said[0]
    assert f"simreg cache clear --key {old.name}" in said[0] and c.dir.name in said[0]
    assert main(["cache", "info", "--dir", str(tmp_path)]) == 0
    assert f"cache version 1: not read by this simreg (simreg cache clear --key {old.name[:8]})" in capsys.readouterr().out


def test_a_store_that_cannot_be_read_warns_once_and_rows_are_computed(tmp_path: Path, caplog, monkeypatch):
    ids = np.arange(256)
    _fill(tmp_path, 256)
    SHARDS.clear()
    reader = TargetCache(tmp_path, KEY, "t", DIM)

    def unavailable(self: Store, dirs_only: bool = False) -> list[str]:
        raise OSError("AWS Error SLOW_DOWN during ListObjectsV2 operation: Please reduce your request rate (HTTP 503)")

    monkeypatch.setattr(Store, "listdir", unavailable)
    with caplog.at_level(logging.WARNING, logger="simreg"):
        for v in (0, 0, 1):
            assert not reader.lookup(v, ids)[1].any()  # no exception: the teacher computes them
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"cannot read from {reader.dir}" in said[0] and "HTTP 503" in said[0]
    monkeypatch.undo()
    assert reader.lookup(0, ids)[1].all()  # the store is back: read again


def test_cache_info_sums_the_writers_records_without_opening_a_shard(tmp_path: Path, monkeypatch):
    _fill(tmp_path, 1000, views=2)
    second = TargetCache(tmp_path, KEY, "t", DIM)  # another writer: other ids of view 0
    second.store(0, np.arange(5000, 5100), _targets(np.arange(5000, 5100)))
    second.flush()
    assert len(list((tmp_path / key_digest(KEY) / "writers").iterdir())) == 2
    recorded = cache_entries(tmp_path)
    scanned = cache_entries(tmp_path, scan=True)
    assert [(r["rows"], r["views"], r["counted"]) for r in recorded] == [(2100, 2, "recorded")]
    assert [(r["rows"], r["views"], r["counted"]) for r in scanned] == [(2100, 2, "scanned")]
    assert recorded[0]["bytes"] == scanned[0]["bytes"] > 0

    def no_shard(self: Store) -> bytes:
        assert not self.path.endswith(".parquet"), f"cache info opened a shard: {self.path}"
        return Store.read_bytes.__wrapped__(self)  # type: ignore[attr-defined]

    original = Store.read_bytes
    no_shard.__wrapped__ = original  # type: ignore[attr-defined]
    monkeypatch.setattr(Store, "read_bytes", no_shard)
    assert cache_entries(tmp_path)[0]["rows"] == 2100
    assert " 2100 " in entries_table(cache_entries(tmp_path))


def test_a_bad_shard_of_one_view_does_not_hide_the_same_ids_in_another(tmp_path: Path):
    """Shard names depend on the ids only: the same block stored for two views has one name in two folders."""
    ids = np.arange(128)
    _fill(tmp_path, 128, views=2)
    (bad,) = (tmp_path / key_digest(KEY) / "v00000").rglob("part-*.parquet")
    bad.write_bytes(bad.read_bytes()[:50])
    SHARDS.clear()
    reader = TargetCache(tmp_path, KEY, "t", DIM)
    assert not reader.lookup(0, ids)[1].any()
    got, found = reader.lookup(1, ids)
    assert found.all() and np.array_equal(got, _targets(ids, 1))
    reader.store(0, ids, _targets(ids, 0))  # computed again and stored: served from then on
    assert reader.lookup(0, ids)[1].all()


def test_a_closed_cache_still_stores_in_the_callers_thread(tmp_path: Path):
    c = TargetCache(tmp_path, KEY, "t", DIM)
    c.store(0, np.arange(4), _targets(np.arange(4)))
    c.close()
    c.store(0, np.arange(4, 8), _targets(np.arange(4, 8)))  # a request still queued with an evicted cache
    c.flush()
    SHARDS.clear()
    assert TargetCache(tmp_path, KEY, "t", DIM).lookup(0, np.arange(8))[1].all()
