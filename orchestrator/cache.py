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

Shards are written to a temporary name and renamed (atomic on POSIX), so a concurrent reader (another
trial, another actor) sees a whole shard or none. Two writers of the same shard write the same bytes.
On a multi-node cluster ``cache.dir`` must be shared storage (NFS, a mounted bucket) for nodes to share it.
Pure numpy/pyarrow/torch: no Ray.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simreg.models.errors import DataError
from simreg.models.teachers import file_sha256

log = logging.getLogger("simreg")
CACHE_VERSION = 1
META = "meta.json"


def default_cache_dir() -> Path:
    env = os.environ.get("SIMREG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
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


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename to ``path``: readers never see a partial file; the temp file never stays."""
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}-{path.name}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TargetCache:
    """One teacher's targets under one key: ``lookup`` and ``store`` per (view index, sample ids)."""

    def __init__(self, root: str | Path, key: Mapping[str, Any], teacher_name: str, dim: int) -> None:
        self.key = dict(key)
        self.dim = dim
        self.dir = Path(root).expanduser() / key_digest(self.key)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / META
        if not meta.is_file():
            body = {"key": self.key, "teacher": teacher_name, "dim": dim, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_atomic(meta, lambda p: p.write_text(json.dumps(body, indent=2)))
        self._where: dict[int, dict[int, tuple[int, int]]] = {}  # view index -> sample id -> (chunk, row)
        self._chunks: dict[int, list[np.ndarray]] = {}  # view index -> (n, dim) fp16 arrays
        self._read: dict[int, set[str]] = {}  # view index -> shard names already indexed

    def _view_dir(self, v: int) -> Path:
        return self.dir / f"v{v:05d}"

    def _add(self, v: int, ids: np.ndarray, targets: np.ndarray) -> None:
        chunks = self._chunks.setdefault(v, [])
        where = self._where.setdefault(v, {})
        c = len(chunks)
        chunks.append(targets)
        for r, sid in enumerate(ids.tolist()):
            where.setdefault(sid, (c, r))  # duplicates across shards hold identical targets

    def _refresh(self, v: int) -> None:
        """Index shards of view ``v`` written since the last look (by this or any other process)."""
        d = self._view_dir(v)
        if not d.is_dir():
            return
        seen = self._read.setdefault(v, set())
        for p in sorted(p for p in d.glob("part-*.parquet") if p.name not in seen):
            seen.add(p.name)
            try:
                t = pq.read_table(p)
                ids = t["sample_id"].to_numpy()
                tg = np.asarray(t["target"].combine_chunks().flatten()).reshape(len(ids), -1)
            except Exception as e:  # an unreadable shard is recomputed, never trusted
                log.warning("target cache: skipping unreadable shard %s (%s)", p, e)
                continue
            if tg.shape[1] != self.dim or tg.dtype != np.float16:
                raise DataError(
                    f"target cache shard {p} holds {tg.dtype} targets of dim {tg.shape[1]}, expected float16 of dim "
                    f"{self.dim}: the cache directory is damaged; remove it with `simreg cache clear --key {self.dir.name}`"
                )
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
        """Write one shard atomically (and index it in memory)."""
        if len(sample_ids) == 0:
            return
        sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        targets = np.ascontiguousarray(targets, dtype=np.float16)
        d = self._view_dir(v)
        d.mkdir(parents=True, exist_ok=True)
        name = f"part-{hashlib.sha1(sample_ids.tobytes()).hexdigest()[:16]}.parquet"
        table = pa.table({
            "sample_id": pa.array(sample_ids),
            "target": pa.FixedSizeListArray.from_arrays(pa.array(targets.ravel()), self.dim),
        })
        write_atomic(d / name, lambda p: pq.write_table(table, p))
        self._read.setdefault(v, set()).add(name)
        self._add(v, sample_ids, targets.copy())


# ---------------------------------------------------------------- info / clear (the `simreg cache` command)


def cache_entries(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per key directory: digest, teacher, arch, views held, rows, bytes, created."""
    base = Path(root).expanduser() if root else default_cache_dir()
    rows: list[dict[str, Any]] = []
    if not base.is_dir():
        return rows
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        meta_path = d / META
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        views = sorted(p for p in d.glob("v*") if p.is_dir())
        n_rows = 0
        for vd in views:
            for shard in vd.glob("part-*.parquet"):
                try:
                    n_rows += pq.ParquetFile(shard).metadata.num_rows
                except Exception:
                    pass
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        t = meta.get("key", {}).get("teacher", {})
        rows.append({
            "key": d.name, "teacher": meta.get("teacher", "?"), "arch": t.get("arch", "?"), "dim": meta.get("dim"),
            "precision": t.get("precision", "?"), "views": len(views), "rows": n_rows, "bytes": size,
            "created": meta.get("created", "?"), "data": meta.get("key", {}).get("data", "?"),
        })
    return rows


def clear_cache(root: str | Path | None = None, keys: list[str] | None = None) -> list[str]:
    """Remove the given key directories (a unique prefix is enough), or all of them; returns what went."""
    base = Path(root).expanduser() if root else default_cache_dir()
    if not base.is_dir():
        return []
    present = sorted(p.name for p in base.iterdir() if p.is_dir() and (p / META).is_file())
    if keys is None:
        chosen = present
    else:
        chosen = []
        for k in keys:
            match = [p for p in present if p.startswith(k)]
            if len(match) != 1:
                raise DataError(
                    f"cache key {k!r} matches {len(match)} entries in {base}: give a unique prefix "
                    f"(see `simreg cache info`; present: {present})"
                )
            chosen.append(match[0])
    for k in chosen:
        shutil.rmtree(base / k)
    return chosen


def entries_table(rows: list[dict[str, Any]]) -> str:
    head = ("key", "teacher", "arch", "dim", "precision", "views", "rows", "MiB", "created")
    body = [(r["key"], str(r["teacher"]), str(r["arch"]), str(r["dim"]), str(r["precision"]), str(r["views"]), str(r["rows"]),
             f"{r['bytes'] / 2**20:.1f}", str(r["created"])) for r in rows]
    w = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), *map(line, body)])


def spec_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-able dict (tuples as lists), for keys."""
    return json.loads(json.dumps(asdict(obj)))


def warm_cache(cfg: Any, epochs: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fill the cache for ``cfg`` in this process (no Ray): every teacher, every view index a run of
    ``epochs`` (default ``train.epochs``) will use. Rows already cached are skipped."""
    from simreg.orchestrator.builders import cache_spec, teacher_options, view_plan
    from simreg.orchestrator.run import prepare
    from simreg.orchestrator.teacher_pool import TeacherInference, add_views
    from simreg.orchestrator.views import view_index

    prep = prepare(cfg, quiet=True)
    spec = cache_spec(cfg, prep.train)
    if spec is None:
        raise DataError("the target cache is off: pass cache.enabled=true (and optionally cache.dir=...)")
    plan = view_plan(cfg)
    n_epochs = epochs or cfg.train.epochs
    indices = sorted({view_index(e, plan.bank) for e in range(n_epochs)})
    tp = cfg.teacher_pool
    train = prep.train  # a streamed pack stays in its shards: read and decoded one block at a time
    report: dict[str, Any] = {"cache_dir": spec.root, "view_indices": indices, "images": len(train), "teachers": {}}
    t0 = time.perf_counter()
    infs = [TeacherInference(ts, tp.threads, **teacher_options(cfg, spec)) for ts in prep.specs]
    seconds = [0.0] * len(infs)
    done, next_log = 0, len(train) // 10
    for batch in train.blocks(tp.batch_size):  # each block decoded once, for every view index and teacher
        n = len(batch["sample_id"])
        for v in indices:
            todo = []
            for k, inf in enumerate(infs):
                assert inf.cache is not None
                if inf.cache.contains(v, batch["sample_id"]):  # skip rendering views nobody needs
                    inf.cached_rows += n
                else:
                    todo.append(k)
            if todo:
                views = add_views(batch, epoch=v, seed=cfg.seed, plan=plan)  # v < bank: view_index(v) == v
                for k in todo:
                    t1 = time.perf_counter()
                    infs[k](dict(views))
                    seconds[k] += time.perf_counter() - t1
        done += n
        if progress and done >= next_log:
            next_log += max(1, len(train) // 10)
            log.info("cache warm: %d / %d images x %d view(s); %s", done, len(train), len(indices),
                     ", ".join(f"{i.spec.name}: {i.forward_rows} computed, {i.cached_rows} already cached" for i in infs))
    for inf, s in zip(infs, seconds, strict=True):
        assert inf.cache is not None
        report["teachers"][inf.spec.name] = {
            "key": inf.cache.dir.name, "computed_rows": inf.forward_rows, "cached_rows": inf.cached_rows, "seconds": s,
        }
    report["wall_s"] = time.perf_counter() - t0
    return report
