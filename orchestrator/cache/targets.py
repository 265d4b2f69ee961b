"""Teacher targets computed once: Parquet shards shared by epochs, runs and sweep trials.

A target is a pure function of (teacher, image, view). The key of a cache directory holds all three:
- the teacher fingerprint: arch, sha256 of the weights file, checkpoint layout, timm model arguments,
  input transform (size, mean, std) and the numeric precision it ran in (fp32 on CPU, bf16 on CUDA);
- the data fingerprint: the content hash of the split the sample ids index into (a subset of it
  shares the cache: shards are looked up per sample id);
- the views: the full augmentation recipe of the teachers' view and the seed of the view generator.
Anything that changes any of them gives another directory: a cache can only miss, never serve a stale
target. Inside, ``v<index>/part-<hash of ids>.parquet`` holds (sample_id int64, target fp16[d]) for one
view index; the view index is the epoch, or ``epoch mod augment.view_bank`` with a bank of K views.

``cache.dir`` is a local folder or an object-store URI (``s3://bucket/cache``, storage.py): on a
multi-node cluster, a bucket (or NFS) lets every node share it. A shard is written atomically (a local
file: temporary name, fsync, rename; an object: visible only once its upload completes), so a concurrent reader
(another trial, another actor, another node) sees a whole shard or none. Two writers of the same shard
write the same bytes. Pure numpy/pyarrow: no Ray.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simreg.models.errors import DataError, first_line
from simreg.models.teachers import file_sha256
from simreg.orchestrator.data.pack.schema_guard import UnreadableParquet, read_checked
from simreg.orchestrator.storage import Store, open_store

log = logging.getLogger("simreg")


CACHE_VERSION = 1
RELIST_S = 30.0  # object stores: the least time between two listings of one view's shards
MAX_PENDING_UPLOADS = 32  # object stores: shards waiting to upload before the teacher waits for the oldest


META = "meta.json"


def default_cache_dir() -> Path | str:
    env = os.environ.get("SIMREG_CACHE_DIR")
    if env:
        return env if "://" in env else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "simreg" / "targets"


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | Path) -> str:
    """``file_sha256`` of a weights file, remembered per (path, size, mtime) within a process."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        _SHA_MEMO[memo] = file_sha256(p)
    return _SHA_MEMO[memo]


@dataclass(frozen=True)
class CacheSpec:
    """What a teacher stage needs to find its cache: the root, the data and view parts of the key.
    The teacher part is completed where the teacher runs (it knows its device and precision)."""

    root: str
    data_fingerprint: str
    views: dict[str, Any] = field(default_factory=dict)  # the teachers' view recipe + the view seed

    def key(self, teacher: Mapping[str, Any]) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "teacher": dict(teacher), "data": self.data_fingerprint, "views": self.views}


def shard_schema(dim: int) -> pa.Schema:
    """The exact columns of a shard: a shard with any other schema is refused before it is read."""
    return pa.schema([("sample_id", pa.int64()), ("target", pa.list_(pa.float16(), dim))])


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


KEY_NAME = re.compile(r"[0-9a-f]{20}")  # a key folder's name: key_digest of the key in its meta.json


class TargetCache:
    """One teacher's targets under one key: ``lookup`` and ``store`` per (view index, sample ids)."""

    def __init__(self, root: str | Path | Store, key: Mapping[str, Any], teacher_name: str, dim: int) -> None:
        self.key = dict(key)
        self.dim = dim
        self.dir = open_store(root) / key_digest(self.key)
        self.write_error: str | None = None  # why writing stopped (disk full, no permission): the run goes on without it
        self._write_lock = threading.Lock()
        self._index_lock = threading.Lock()  # a fleet actor stores from its forward thread while its loop looks up
        meta = self.dir / META
        try:
            self.dir.mkdir()
            if not meta.is_file():
                body = {"key": self.key, "teacher": teacher_name, "dim": dim, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                meta.write_text(json.dumps(body, indent=2))
        except OSError as e:
            self.cannot_write(e)
        self._where: dict[int, dict[int, tuple[int, int]]] = {}  # view index -> sample id -> (chunk, row)
        self._chunks: dict[int, list[np.ndarray]] = {}  # view index -> (n, dim) fp16 arrays
        self._read: dict[int, set[str]] = {}  # view index -> shard names already indexed
        self._listed: dict[int, float] = {}  # view index -> when its shards were last listed (object stores)
        # In an object store a shard uploads in the background: the teacher goes on with the next block
        # instead of waiting for a request round trip per block; ``flush`` waits for them.
        self._uploads: ThreadPoolExecutor | None = ThreadPoolExecutor(1, "simreg-cache-upload") if self.dir.remote else None
        self._pending: list[Future[None]] = []
        self._pending_lock = threading.Lock()

    def _view_dir(self, v: int) -> Store:
        return self.dir / f"v{v:05d}"

    def _add(self, v: int, ids: np.ndarray, targets: np.ndarray) -> None:
        with self._index_lock:
            chunks = self._chunks.setdefault(v, [])
            where = self._where.setdefault(v, {})
            c = len(chunks)
            chunks.append(targets)
            for r, sid in enumerate(ids.tolist()):
                where.setdefault(sid, (c, r))  # duplicates across shards hold identical targets

    def _refresh(self, v: int) -> None:
        """Index shards of view ``v`` written since the last look (by this or any other process). In an object
        store at most every ``RELIST_S`` seconds per view: a shard another process wrote since is then
        recomputed (the same bytes), never missed for good."""
        if self.dir.remote:
            now = time.monotonic()
            if now - self._listed.get(v, -RELIST_S) < RELIST_S:
                return
            self._listed[v] = now
        d = self._view_dir(v)
        seen = self._read.setdefault(v, set())
        for name in d.listdir():  # one listing, local or remote; empty when the view has no shard yet
            if not (name.startswith("part-") and name.endswith(".parquet")) or name in seen:
                continue
            seen.add(name)
            p = d / name
            fix = f"The cache directory is damaged or not simreg's: remove it with `simreg cache clear --key {self.dir.name}`"
            try:  # the schema first, from the footer alone: a shard simreg did not write is never deserialised
                t = read_checked(p, shard_schema(self.dim), "target cache shard", fix)
                ids = t["sample_id"].to_numpy()
                tg = np.asarray(t["target"].combine_chunks().flatten()).reshape(len(ids), -1)
            except UnreadableParquet as e:  # an unreadable shard is recomputed, never trusted
                log.warning("target cache: skipping unreadable shard %s (%s)", p, first_line(e, 300))
                continue
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001  (a footer that parses over damaged pages: recomputed too)
                log.warning("target cache: skipping unreadable shard %s (%s)", p, first_line(e, 300))
                continue
            self._add(v, ids, tg)

    def lookup(self, v: int, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets (B, dim) fp16, found mask (B,)): rows not found are zero and must be computed."""
        out = np.zeros((len(sample_ids), self.dim), np.float16)
        found = self._find(v, sample_ids, out)
        if not found.all():
            self._refresh(v)
            found = self._find(v, sample_ids, out)
        return out, found

    def contains(self, v: int, sample_ids: np.ndarray) -> bool:
        """Whether every id has a stored target for view ``v``."""
        return bool(self.lookup(v, sample_ids)[1].all())

    def _find(self, v: int, sample_ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        where, chunks = self._where.get(v, {}), self._chunks.get(v, [])
        found = np.zeros(len(sample_ids), bool)
        for i, sid in enumerate(sample_ids.tolist()):
            hit = where.get(sid)
            if hit is not None:
                out[i] = chunks[hit[0]][hit[1]]
                found[i] = True
        return found

    def store(self, v: int, sample_ids: np.ndarray, targets: np.ndarray) -> None:
        """Write one shard atomically (and index it in memory). A write that fails (disk full, no permission)
        is logged once and writing stops: the targets stay in memory, the run goes on."""
        if len(sample_ids) == 0:
            return
        sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        targets = np.ascontiguousarray(targets, dtype=np.float16)
        name = f"part-{hashlib.sha1(sample_ids.tobytes()).hexdigest()[:16]}.parquet"
        self._read.setdefault(v, set()).add(name)
        self._add(v, sample_ids, targets.copy())
        if self.write_error is not None:
            return
        table = pa.table({
            "sample_id": pa.array(sample_ids),
            "target": pa.FixedSizeListArray.from_arrays(pa.array(targets.ravel()), self.dim),
        }, schema=shard_schema(self.dim))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        dest = self._view_dir(v) / name
        if self._uploads is None:
            self._write(dest, buf.getvalue())
            return
        with self._pending_lock:  # a fleet actor stores from its forward thread and flushes from its loop
            self._pending = [f for f in self._pending if not f.done()]
            oldest = self._pending.pop(0) if len(self._pending) >= MAX_PENDING_UPLOADS else None
        if oldest is not None:  # a store slower than the teacher: wait, do not pile up bytes
            oldest.result()
        with self._pending_lock:
            self._pending.append(self._uploads.submit(self._write, dest, buf.getvalue()))

    def _write(self, dest: Store, data: bytes) -> None:
        """One shard, whole or not at all (Store.write_bytes: a temporary name renamed locally, one object remotely)."""
        if self.write_error is not None:
            return
        try:
            dest.write_bytes(data)
        except Exception as e:  # noqa: BLE001  (the cache is optional; an object store's client raises more than OSError)
            if not (isinstance(e, OSError) or self.dir.remote):
                raise
            self.cannot_write(e)

    def cannot_write(self, e: BaseException) -> None:
        """Stop writing (the first error is kept and logged once); targets stored go on being served from memory."""
        with self._write_lock:
            if self.write_error is not None:
                return
            self.write_error = first_line(e, 200)
        log.warning("target cache: cannot write to %s (%s); this run goes on computing targets without caching them. Free "
                    "space there or fix its permissions, point cache.dir elsewhere, or set cache.enabled=false",
                    self.dir, self.write_error)

    def flush(self) -> None:
        """Wait until every shard stored so far is in the store (a no-op on local disk)."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()


def spec_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-able dict (tuples as lists), for keys."""
    return json.loads(json.dumps(asdict(obj)))
