"""Teacher targets computed once: Parquet shards shared by epochs, runs and sweep trials, addressed by sample id.

A target is a pure function of (teacher, image, view). The key of a cache directory holds all three:
- the teacher fingerprint: arch, sha256 of the weights it loaded, checkpoint layout, timm model arguments,
  input transform (size, mean, std) and the numeric precision it ran in (fp32 on CPU, bf16 on CUDA);
- the data fingerprint: the content hash of the split the sample ids index into (a subset of it
  shares the cache: shards are looked up per sample id);
- the views: the full augmentation recipe of the teachers' view and the seed of the view generator.
Anything that changes any of them gives another directory: a cache can only miss, never serve a stale
target. The view index is the epoch, or ``epoch mod augment.view_bank`` with a bank of K views.

Layout (``CACHE_VERSION`` 2): ``v<view>/b<id // BUCKET_ROWS>/part-<first id>-<last id>-<rows>-<hash>.parquet``,
each shard (sample_id int64 sorted, target fp16[d]) holding rows of one bucket of ``BUCKET_ROWS`` consecutive
sample ids. A lookup of some ids lists only the bucket folders of those ids (kept, and listed again on a miss:
on an object store at most every ``RELIST_S`` seconds per bucket) and reads only the shards whose id range
holds them, each in one request; nothing in a process grows with the images or views of a cache: decoded
shards live in one LRU per process (``cache/memory.py``, ``cache.memory_mib``), listings in a bounded one.
A folder of the older layout (version 1: every shard of a view in one folder, read whole) is never read: a
run names it once, and its targets are computed again under the new key.

``cache.dir`` is a local folder or an object-store URI (``s3://bucket/cache``, storage.py): on a
multi-node cluster, a bucket (or NFS) lets every node share it. A shard is written atomically (a local
file: temporary name, fsync, rename; an object: visible only once its upload completes), so a concurrent reader
(another trial, another actor, another node) sees a whole shard or none. Two writers of the same shard
write the same bytes. Each writing process also keeps a small record of what it wrote under ``writers/``:
``simreg cache info`` sums those instead of listing every shard. Pure numpy/pyarrow: no Ray.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simreg.models.errors import DataError, first_line
from simreg.orchestrator.cache.memory import DEFAULT_MEMORY_MIB, SHARDS, release_arrow
from simreg.orchestrator.data.pack.schema_guard import UnreadableParquet, read_checked
from simreg.orchestrator.storage import Store, open_store

log = logging.getLogger("simreg")


CACHE_VERSION = 2  # 1: one folder per view, read whole (never read since)
BUCKET_ROWS = 4096  # consecutive sample ids per bucket folder: a lookup lists the buckets of its ids, never a view
RELIST_S = 30.0  # object stores: the least time between two listings of one bucket
MAX_PENDING_UPLOADS = 32  # object stores: shards waiting to upload before the teacher waits for the oldest
LISTINGS = 2048  # bucket listings a cache keeps (a listing: a few dozen names)
RECORD_EVERY_S = 30.0  # a writer's record of what it wrote (writers/), rewritten at most this often and at flush

META = "meta.json"
WRITERS = "writers"


def default_cache_dir() -> Path | str:
    env = os.environ.get("SIMREG_CACHE_DIR")
    if env:
        return env if "://" in env else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "simreg" / "targets"


@dataclass(frozen=True)
class CacheSpec:
    """What a teacher stage needs to find its cache: the root, the data and view parts of the key.
    The teacher part is completed where the teacher runs (it knows its device and precision)."""

    root: str
    data_fingerprint: str
    views: dict[str, Any] = field(default_factory=dict)  # the teachers' view recipe + the view seed
    memory_mib: float = DEFAULT_MEMORY_MIB  # decoded shards a process keeps (cache.memory_mib; not part of the key)

    def key(self, teacher: Mapping[str, Any]) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "teacher": dict(teacher), "data": self.data_fingerprint, "views": self.views}


def shard_schema(dim: int) -> pa.Schema:
    """The exact columns of a shard: a shard with any other schema is refused before it is read."""
    return pa.schema([("sample_id", pa.int64()), ("target", pa.list_(pa.float16(), dim))])


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


KEY_NAME = re.compile(r"[0-9a-f]{20}")  # a key folder's name: key_digest of the key in its meta.json
STATS_DIR = "stats"  # beside the key folders: target statistics of teachers[i].normalize (train/target_stats.py)
STATS_FILE = re.compile(r"[0-9a-f]{20}\.safetensors")


class TargetCache:
    """One teacher's targets under one key: ``lookup`` and ``store`` per (view index, sample ids).

    Thread-safe: a fleet actor looks up in its I/O threads while its forward thread stores. Opening one does no
    I/O; the key folder and its meta.json are written with the first shard."""

    def __init__(self, root: str | Path | Store, key: Mapping[str, Any], teacher_name: str, dim: int,
                 memory_mib: float | None = None) -> None:
        self.key = dict(key)
        self.dim = dim
        self.teacher_name = teacher_name
        self.root = open_store(root)
        self.dir = self.root / key_digest(self.key)
        self.write_error: str | None = None  # why writing stopped (disk full, no permission): the run goes on without it
        self.read_error: str | None = None  # the first read that failed (an unreachable store): those rows were computed
        if memory_mib is not None:
            SHARDS.set_limit(memory_mib)
        self._lock = threading.Lock()  # listings, counts, the once-only steps
        self._lists: OrderedDict[tuple[int, int], tuple[float, list[ShardEntry]]] = OrderedDict()  # (view, bucket) -> (listed at, shards)
        self._bad: set[tuple[int, str]] = set()  # (view, shard) found unreadable: recomputed, not read again by this process
        self._read_paused_until = 0.0  # an object store that refused a read: no shard read before then (memory still serves)
        self._record_lock = threading.Lock()  # one record written at a time, the newest last
        self._closed = False
        self._meta_written = False
        self._old_checked = False
        self._written: dict[str, dict[str, int]] = {"rows": {}, "shards": {}, "bytes": {}}  # per view index (str), what this process wrote
        self._stats_dirty = False
        self._stats_at = time.monotonic()
        self._writer_name = f"{_safe(socket.gethostname())}-{os.getpid()}-{secrets.token_hex(4)}.json"
        # In an object store a shard uploads in the background: the teacher goes on with the next block
        # instead of waiting for a request round trip per block; ``flush`` waits for them.
        self._uploads: ThreadPoolExecutor | None = ThreadPoolExecutor(1, "simreg-cache-upload") if self.dir.remote else None
        self._pending: list[Future[None]] = []
        self._pending_lock = threading.Lock()

    def _view_dir(self, v: int) -> Store:
        return self.dir / f"v{v:05d}"

    def _bucket_dir(self, v: int, b: int) -> Store:
        return self._view_dir(v) / f"b{b:07d}"

    # ------------------------------------------------------------------ reads
    def lookup(self, v: int, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets (B, dim) fp16, found mask (B,)): rows not found are zero and must be computed. Reads only the
        bucket listings and shards of these ids; a store that cannot be read warns once and finds nothing."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        out = np.zeros((len(ids), self.dim), np.float16)
        found = np.zeros(len(ids), bool)
        if len(ids) == 0:
            return out, found
        self._check_old_layout()
        buckets = ids // BUCKET_ROWS
        order = np.argsort(buckets, kind="stable")
        sorted_b = buckets[order]
        for s, e in _runs(sorted_b):
            b, rows = int(sorted_b[s]), order[s:e]
            listed_now = self._fill(v, b, ids, rows, out, found, relist=False)
            if not found[rows].all() and self._may_relist(v, b, listed_now):
                self._fill(v, b, ids, rows, out, found, relist=True)
        return out, found

    def contains(self, v: int, sample_ids: np.ndarray) -> bool:
        """Whether every id has a stored target for view ``v``."""
        return bool(self.lookup(v, sample_ids)[1].all())

    def _fill(self, v: int, b: int, ids: np.ndarray, rows: np.ndarray, out: np.ndarray, found: np.ndarray, relist: bool) -> bool:
        """Fill ``out`` for ``rows`` (ids of bucket ``b``) from the shards holding them; whether the bucket was listed now."""
        entries, listed_now = self._listing(v, b, relist)
        need = rows[~found[rows]]
        if need.size == 0 or not entries:
            return listed_now
        nid = ids[need]
        lo, hi = int(nid.min()), int(nid.max())
        for first, last, _, name in entries:
            if last < lo or first > hi or (v, name) in self._bad:
                continue
            got = self._shard(v, b, name)
            if got is None:
                continue
            sids, tg = got
            pos = np.minimum(np.searchsorted(sids, nid), len(sids) - 1)
            hit = sids[pos] == nid
            if hit.any():
                out[need[hit]] = tg[pos[hit]]
                found[need[hit]] = True
                need, nid = need[~hit], nid[~hit]
                if need.size == 0:
                    break
                lo, hi = int(nid.min()), int(nid.max())
        return listed_now

    def _may_relist(self, v: int, b: int, listed_now: bool) -> bool:
        """Whether a miss in bucket ``b`` lists it again: on local disk always (one small folder), on an object store
        at most every ``RELIST_S`` seconds (a shard another process wrote since is then recomputed, the same bytes)."""
        if listed_now:
            return False
        if not self.dir.remote:
            return True
        with self._lock:
            held = self._lists.get((v, b))
        return held is None or time.monotonic() - held[0] >= RELIST_S

    def _listing(self, v: int, b: int, relist: bool) -> tuple[list[ShardEntry], bool]:
        """The shards of bucket ``b`` of view ``v`` (first id, last id, rows, name), from the listing kept or listed now;
        a listing adds to what this process already knows (its own shards may still be uploading)."""
        with self._lock:
            held = self._lists.get((v, b))
            if held is not None:
                self._lists.move_to_end((v, b))
                if not relist and held[0] > -math.inf:
                    return held[1], False
        if self._read_paused():
            return (held[1] if held is not None else []), False
        try:
            names = self._bucket_dir(v, b).listdir()
        except Exception as e:  # noqa: BLE001  (an unreachable store: its rows are computed; the run goes on)
            self.cannot_read(e)
            names = []
        listed = [entry for n in names if (entry := parse_shard_name(n)) is not None]
        with self._lock:
            before = self._lists.pop((v, b), (0.0, []))[1]
            merged = sorted({*before, *listed})
            self._lists[(v, b)] = (time.monotonic(), merged)
            while len(self._lists) > LISTINGS:
                self._lists.popitem(last=False)
        return merged, True

    def _shard(self, v: int, b: int, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A shard's (sorted ids, targets), from this process's memory or read in one request; None when it is gone
        or unreadable (its rows are computed). A shard of another schema is refused (DataError naming the fix)."""
        key = (self.dir.path, v, name)
        got = SHARDS.get(key)
        if got is not None and got[1].shape[1:] == (self.dim,):
            return got
        if self._read_paused():
            return None
        p = self._bucket_dir(v, b) / name
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # removed since it was listed (`simreg cache clear`), or still uploading: computed
            self._forget(v, b, name)  # a later listing brings it back if it is there
            return None
        except Exception as e:  # noqa: BLE001  (an unreachable store, a 503: computed this time, read again later)
            self.cannot_read(e)
            return None
        fix = f"The cache directory is damaged or not simreg's: remove it with `simreg cache clear --key {self.dir.name}`"
        try:  # the schema first, from the footer alone: a shard simreg did not write is never deserialised
            # decoded in this thread (a ~100 kB shard gains nothing from Arrow's pool of threads, whose allocators
            # would each keep pages of it)
            t = read_checked(data, shard_schema(self.dim), "target cache shard", fix, name=str(p), use_threads=False)
            target = t["target"].combine_chunks()
            if t["sample_id"].null_count or target.null_count or target.values.null_count:
                raise UnreadableParquet("it holds null ids or targets")
            # numpy's own copies: the Arrow buffers are freed here, in the thread that made them, and what the LRU
            # holds and frees is what it counts
            sids = np.array(t["sample_id"].to_numpy(), copy=True)
            tg = np.array(target.flatten(), copy=True)
            del t, target
            release_arrow()
            if tg.size != len(sids) * self.dim:
                raise UnreadableParquet(f"it holds {tg.size} target values for {len(sids)} rows of dim {self.dim}")
            tg = tg.reshape(len(sids), self.dim)
            entry = parse_shard_name(name)
            if entry is None or len(sids) != entry[2] or (len(sids) and (sids[0] != entry[0] or sids[-1] != entry[1])) or (
                    np.any(np.diff(sids) < 0)):
                raise UnreadableParquet("its rows do not match its name (ids, count or order)")
        except Exception as e:  # noqa: BLE001  (a footer that parses over damaged pages: recomputed too)
            if isinstance(e, DataError) and not isinstance(e, UnreadableParquet):
                raise  # a schema simreg does not write: refused, naming the fix
            log.warning("target cache: skipping unreadable shard %s (%s)", p, first_line(e, 300))
            self._bad.add((v, name))
            return None
        SHARDS.put(key, sids, tg)
        return sids, tg

    def _read_paused(self) -> bool:
        return self.dir.remote and time.monotonic() < self._read_paused_until

    def _forget(self, v: int, b: int, name: str) -> None:
        """Drop a shard from the kept listing of its bucket (gone from the store, or not there yet)."""
        with self._lock:
            held = self._lists.get((v, b))
            if held is not None:
                self._lists[(v, b)] = (held[0], [e for e in held[1] if e[3] != name])

    def cannot_read(self, e: BaseException) -> None:
        """A read from the store failed: logged once; the rows it would have served are computed by the teacher. An
        object store is not read again for ``RELIST_S`` seconds (each read would wait out the client's retries)."""
        if self.dir.remote:
            self._read_paused_until = time.monotonic() + RELIST_S
        with self._lock:
            if self.read_error is not None:
                return
            self.read_error = first_line(e, 200)
        log.warning("target cache: cannot read from %s (%s); the targets it could not read are computed by the teacher "
                    "(this warning is shown once per cache)", self.dir, self.read_error)

    def _check_old_layout(self) -> None:
        """Once: say when the folder of this key in the older layout (version 1) exists; it is never read."""
        with self._lock:
            if self._old_checked:
                return
            self._old_checked = True
        if self.key.get("version") != CACHE_VERSION:
            return
        old = key_digest({**self.key, "version": 1})
        try:
            there = (self.root / old / META).is_file()
        except Exception:  # noqa: BLE001  (a read error here costs only the notice)
            return
        if there:
            log.warning("target cache: %s holds these targets in the layout of cache version 1, which this simreg does not "
                        "read: they are computed again into %s. Remove the old folder with `simreg cache clear --key %s`",
                        self.root / old, self.dir.name, old)

    # ------------------------------------------------------------------ writes
    def store(self, v: int, sample_ids: np.ndarray, targets: np.ndarray) -> None:
        """Write the rows as one shard per bucket of ids, atomically (and keep them in this process's memory). A write
        that fails (disk full, no permission) is logged once and writing stops: the run goes on computing targets."""
        if len(sample_ids) == 0:
            return
        ids = np.asarray(sample_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        ids, tg = ids[order], np.asarray(targets, dtype=np.float16)[order]  # copies: the caller's arrays stay theirs
        buckets = ids // BUCKET_ROWS
        runs = _runs(buckets)
        for s, e in runs:
            if len(runs) == 1:  # the whole block in one bucket: the sorted copies above are the shard's own
                self._store_shard(v, int(buckets[s]), ids, tg)
            else:  # copies: a slice would keep the whole block alive in memory, which counts only the slice
                self._store_shard(v, int(buckets[s]), ids[s:e].copy(), tg[s:e].copy())
        self._maybe_record()

    def _store_shard(self, v: int, b: int, ids: np.ndarray, tg: np.ndarray) -> None:
        name = f"part-{int(ids[0]):012d}-{int(ids[-1]):012d}-{len(ids):07d}-{hashlib.sha1(ids.tobytes()).hexdigest()[:16]}.parquet"
        entry = (int(ids[0]), int(ids[-1]), len(ids), name)
        self._bad.discard((v, name))
        SHARDS.put((self.dir.path, v, name), ids, tg)
        with self._lock:
            held = self._lists.get((v, b))
            if held is not None:
                if entry not in held[1]:  # a new list: a lookup in another thread may be reading the old one
                    self._lists[(v, b)] = (held[0], sorted([*held[1], entry]))
            else:  # listed on the next lookup, and merged with this
                self._lists[(v, b)] = (-math.inf, [entry])
                while len(self._lists) > LISTINGS:
                    self._lists.popitem(last=False)
        if self.write_error is not None:
            return
        table = pa.table({
            "sample_id": pa.array(ids),
            "target": pa.FixedSizeListArray.from_arrays(pa.array(tg.ravel()), self.dim),
        }, schema=shard_schema(self.dim))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        del table
        release_arrow()
        dest = self._bucket_dir(v, b) / name
        with self._pending_lock:
            background = self._uploads is not None and not self._closed  # a closed cache (evicted) writes in the caller's thread
        if not background:
            self._write(dest, buf.getvalue(), v, len(ids))
            return
        assert self._uploads is not None
        with self._pending_lock:  # a fleet actor stores from its forward thread and flushes from its loop
            self._pending = [f for f in self._pending if not f.done()]
            oldest = self._pending.pop(0) if len(self._pending) >= MAX_PENDING_UPLOADS else None
        if oldest is not None:  # a store slower than the teacher: wait, do not pile up bytes
            oldest.result()
        with self._pending_lock:
            if not self._closed:  # close() sets the flag under this lock before it shuts the uploads down
                self._pending.append(self._uploads.submit(self._write, dest, buf.getvalue(), v, len(ids)))
                return
        self._write(dest, buf.getvalue(), v, len(ids))

    def _ensure_meta(self) -> None:
        """The key folder and its meta.json, before the first shard (once per process)."""
        with self._lock:
            if self._meta_written:
                return
            self._meta_written = True
        meta = self.dir / META
        self.dir.mkdir()
        if not meta.is_file():
            body = {"key": self.key, "teacher": self.teacher_name, "dim": self.dim, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "layout": {"version": CACHE_VERSION, "bucket_rows": BUCKET_ROWS}}
            meta.write_text(json.dumps(body, indent=2))

    def _write(self, dest: Store, data: bytes, v: int, rows: int) -> None:
        """One shard, whole or not at all (Store.write_bytes: a temporary name renamed locally, one object remotely)."""
        if self.write_error is not None:
            return
        try:
            self._ensure_meta()
            dest.write_bytes(data)
        except Exception as e:  # noqa: BLE001  (the cache is optional; an object store's client raises more than OSError)
            if not (isinstance(e, OSError) or self.dir.remote):
                raise
            self.cannot_write(e)
            return
        with self._lock:
            for what, n in (("rows", rows), ("shards", 1), ("bytes", len(data))):
                self._written[what][str(v)] = self._written[what].get(str(v), 0) + n
            self._stats_dirty = True

    def cannot_write(self, e: BaseException) -> None:
        """Stop writing (the first error is kept and logged once); targets stored go on being served from memory
        while this process's ``cache.memory_mib`` holds them."""
        with self._lock:
            if self.write_error is not None:
                return
            self.write_error = first_line(e, 200)
        log.warning("target cache: cannot write to %s (%s); this run goes on computing targets without caching them. Free "
                    "space there or fix its permissions, point cache.dir elsewhere, or set cache.enabled=false",
                    self.dir, self.write_error)

    def _maybe_record(self) -> None:
        with self._lock:
            if not self._stats_dirty or time.monotonic() - self._stats_at < RECORD_EVERY_S:
                return
            self._stats_at = time.monotonic()  # one record queued at a time
        with self._pending_lock:
            if self._uploads is not None and not self._closed:
                self._pending.append(self._uploads.submit(self._record))
                return
        self._record()

    def _record(self) -> None:
        """This process's record of what it wrote under this key (``writers/``): what `simreg cache info` sums. One at
        a time, so the newest snapshot is the one written last."""
        with self._record_lock:
            with self._lock:
                if not self._stats_dirty or self.write_error is not None:
                    return
                self._stats_dirty = False
                self._stats_at = time.monotonic()
                body = {"host": socket.gethostname(), "pid": os.getpid(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        **{k: dict(d) for k, d in self._written.items()}}
            try:
                (self.dir / WRITERS / self._writer_name).write_text(json.dumps(body))
            except Exception as e:  # noqa: BLE001
                if not (isinstance(e, OSError) or self.dir.remote):
                    raise
                self.cannot_write(e)

    def flush(self) -> None:
        """Wait until every shard stored so far is in the store, then record what this process wrote."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        self._record()

    def close(self, free_memory: bool = True) -> None:
        """Wait for every upload, record what was written, and free this cache's shards from the process's memory
        (``free_memory``: no other open cache of the process shares its folder). A store after this writes in the
        caller's thread (a request still queued with an evicted cache)."""
        with self._pending_lock:
            self._closed = True
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)  # every upload submitted before the flag, done
        self.flush()
        if free_memory:
            SHARDS.drop(self.dir.path)


ShardEntry = tuple[int, int, int, str]  # (first id, last id, rows, name)
SHARD_NAME = re.compile(r"part-(\d{12})-(\d{12})-(\d{7})-[0-9a-f]{16}\.parquet")


def _runs(sorted_keys: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in a sorted array."""
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]).tolist()
    return list(zip(starts, [*starts[1:], len(sorted_keys)], strict=True))


def parse_shard_name(name: str) -> ShardEntry | None:
    """(first id, last id, rows, name) of a shard simreg names, else None (any other file is never read)."""
    m = SHARD_NAME.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), name


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)[:64]


def spec_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-able dict (tuples as lists), for keys."""
    return json.loads(json.dumps(asdict(obj)))
