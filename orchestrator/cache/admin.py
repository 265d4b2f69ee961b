"""``simreg cache info|clear``: the key folders of a cache root, listed or removed.

Only a key folder simreg wrote counts: its name is the digest of the key in its ``meta.json`` (``key_digest``).
Clearing the whole cache also removes the target statistics simreg wrote (``stats/<digest>.safetensors``). Other
folders and files under the root are never listed, read or removed.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from simreg.models.errors import DataError
from simreg.orchestrator.cache.targets import (
    CACHE_VERSION,
    KEY_NAME,
    META,
    STATS_DIR,
    STATS_FILE,
    WRITERS,
    default_cache_dir,
    key_digest,
    parse_shard_name,
)
from simreg.orchestrator.data.pack.schema_guard import UnreadableParquet, footer_metadata
from simreg.orchestrator.storage import Store, open_store

log = logging.getLogger("simreg")


def _root(root: str | Path | None) -> Store:
    return open_store(root if root else default_cache_dir())


def read_meta(d: Store) -> dict[str, Any] | None:
    """The meta.json of key folder ``d`` when simreg wrote it (its fields typed, its key digesting to the
    folder's name), else None."""
    if not KEY_NAME.fullmatch(d.name):
        return None
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(meta, dict) and isinstance(meta.get("key"), dict) and isinstance(meta.get("teacher"), str)
          and isinstance(meta.get("dim"), int) and not isinstance(meta.get("dim"), bool) and isinstance(meta.get("created"), str))
    return meta if ok and key_digest(meta["key"]) == d.name else None


def cache_keys(base: Store) -> dict[str, dict[str, Any]]:
    """{key folder name: its meta} for every key folder simreg wrote under ``base``."""
    return {name: meta for name in base.listdir(dirs_only=True) if (meta := read_meta(base / name)) is not None}


def _files(d: Store) -> list[Any]:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(d.path, allow_not_found=True, recursive=True)
    return [i for i in d.fs.get_file_info(sel) if i.type == pafs.FileType.File]


def _recorded(d: Store) -> dict[str, Any] | None:
    """What the writers of key folder ``d`` recorded (``writers/``: one small file per writing process), summed:
    {"views", "rows", "bytes", "writers"}; None when no writer left a readable record."""
    views: set[str] = set()
    rows = size = writers = 0
    for name in (d / WRITERS).listdir():
        try:
            rec = json.loads((d / WRITERS / name).read_text())
            r, b = rec["rows"], rec["bytes"]
            if not (isinstance(r, dict) and isinstance(b, dict)):
                continue
            rows += sum(int(x) for x in r.values())
            size += sum(int(x) for x in b.values())
            views.update(k for k, x in r.items() if int(x) > 0)
            writers += 1
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return {"views": len(views), "rows": rows, "bytes": size, "writers": writers} if writers else None


def _scanned(d: Store, bar: Any | None) -> dict[str, Any]:
    """Views, rows and bytes of key folder ``d`` counted from its shards' names and sizes (one listing per bucket
    folder; no shard is opened). A folder of the older layout counts rows from each shard's footer."""
    import pyarrow.fs as pafs

    views = rows = size = 0
    for vname in d.listdir(dirs_only=True):
        if not (vname.startswith("v") and vname[1:].isdigit()):
            continue
        vdir, held = d / vname, 0
        for i in vdir.fs.get_file_info(pafs.FileSelector(vdir.path, allow_not_found=True, recursive=False)):
            if i.type == pafs.FileType.Directory:  # a bucket: its shards' names hold their row counts
                for j in vdir.fs.get_file_info(pafs.FileSelector(i.path, allow_not_found=True, recursive=False)):
                    e = parse_shard_name(j.base_name)
                    if e is not None:
                        held += e[2]
                        size += j.size or 0
                if bar is not None:
                    bar.update(1)
            elif i.base_name.startswith("part-") and i.base_name.endswith(".parquet"):
                try:  # version 1: shards directly in the view folder; the footer's row count only
                    held += footer_metadata(d.at(i.path)).num_rows
                    size += i.size or 0
                except UnreadableParquet:
                    pass
        rows += held
        views += held > 0
    return {"views": views, "rows": rows, "bytes": size}


def cache_entries(root: str | Path | None = None, scan: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """One row per key directory: digest, teacher, arch, version, views held, rows, bytes, created (local or object
    store). Rows, views and bytes come from what the writers recorded (``writers/``; a shard two processes both
    wrote counts twice); ``scan``, or a key without a record, lists every bucket instead (a progress bar with
    ``progress``)."""
    base = _root(root)
    out: list[dict[str, Any]] = []
    for name, meta in cache_keys(base).items():
        d = base / name
        counted = None if scan else _recorded(d)
        how = "recorded"
        if counted is None:
            how = "scanned"
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(desc=f"scanning {name}", unit=" buckets", leave=False, file=sys.stderr)
            try:
                counted = _scanned(d, bar)
            finally:
                if bar is not None:
                    bar.close()
        t = meta["key"].get("teacher")
        t = t if isinstance(t, dict) else {}
        version = meta["key"].get("version", "?")
        out.append({
            "key": name, "teacher": meta["teacher"], "arch": t.get("arch", "?"), "dim": meta["dim"],
            "precision": t.get("precision", "?"), "version": version, "read": version in (CACHE_VERSION, "?"),
            "views": counted["views"], "rows": counted["rows"], "bytes": counted["bytes"], "counted": how,
            "created": meta["created"], "data": meta["key"].get("data", "?"),
        })
    return out


def clear_cache(root: str | Path | None = None, keys: list[str] | None = None) -> list[str]:
    """Remove the given key directories (a unique prefix is enough), or all of them; returns what went.
    Logs what it removes (each key and its size) before removing it."""
    base = _root(root)
    present = sorted(cache_keys(base))
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
    sizes = {k: sum(i.size or 0 for i in _files(base / k)) for k in chosen}
    # the whole cache: the target statistics go too (only simreg's files: <key digest>.safetensors)
    stats = [n for n in (base / STATS_DIR).listdir() if STATS_FILE.fullmatch(n)] if keys is None else []
    others = len(base.listdir()) - len(present) - int(bool(stats))
    if chosen:
        log.info("cache clear: removing %d key folder(s), %.1f MiB, from %s: %s%s", len(chosen), sum(sizes.values()) / 2**20,
                 base, ", ".join(f"{k} ({sizes[k] / 2**20:.1f} MiB)" for k in chosen),
                 f"; {others} other entr{'y' if others == 1 else 'ies'} there, not simreg cache keys, left alone" if others else "")
    for k in chosen:
        (base / k).delete()
    if stats:
        log.info("cache clear: removing %d target statistics file(s) from %s", len(stats), base / STATS_DIR)
        for n in stats:
            (base / STATS_DIR / n).delete()
        if not (base / STATS_DIR).listdir():
            (base / STATS_DIR).delete()
    return chosen


def entries_table(rows: list[dict[str, Any]]) -> str:
    """The table of ``simreg cache info``; a key of an older layout says it is not read and how to remove it."""
    head = ("key", "teacher", "arch", "dim", "precision", "views", "rows", "MiB", "created", "")
    body = [(r["key"], str(r["teacher"]), str(r["arch"]), str(r["dim"]), str(r["precision"]), str(r["views"]), str(r["rows"]),
             f"{r['bytes'] / 2**20:.1f}", str(r["created"]),
             "" if r["read"] else f"cache version {r['version']}: not read by this simreg (simreg cache clear --key {r['key'][:8]})")
            for r in rows]
    w = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(head), *map(line, body)])
