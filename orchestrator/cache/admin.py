"""``simreg cache info|clear``: the key folders of a cache root, listed or removed.

Only a key folder simreg wrote counts: its name is the digest of the key in its ``meta.json`` (``key_digest``).
Other folders and files under the root are never listed, read or removed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from simreg.models.errors import DataError
from simreg.orchestrator.cache.targets import KEY_NAME, META, default_cache_dir, key_digest
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


def cache_entries(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per key directory: digest, teacher, arch, views held, rows, bytes, created (local or object store)."""
    base = _root(root)
    rows: list[dict[str, Any]] = []
    for name, meta in cache_keys(base).items():
        d = base / name
        files = _files(d)
        views = {i.path[len(d.path) + 1:].split("/", 1)[0] for i in files if i.path[len(d.path) + 1:].startswith("v")}
        n_rows = 0
        for i in files:
            if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"):
                try:  # the footer's row count only: nothing in the shard is deserialised
                    n_rows += footer_metadata(d.at(i.path)).num_rows
                except UnreadableParquet:
                    pass
        t = meta["key"].get("teacher")
        t = t if isinstance(t, dict) else {}
        rows.append({
            "key": name, "teacher": meta["teacher"], "arch": t.get("arch", "?"), "dim": meta["dim"],
            "precision": t.get("precision", "?"), "views": len(views), "rows": n_rows, "bytes": sum(i.size or 0 for i in files),
            "created": meta["created"], "data": meta["key"].get("data", "?"),
        })
    return rows


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
    others = len(base.listdir()) - len(present)
    if chosen:
        log.info("cache clear: removing %d key folder(s), %.1f MiB, from %s: %s%s", len(chosen), sum(sizes.values()) / 2**20,
                 base, ", ".join(f"{k} ({sizes[k] / 2**20:.1f} MiB)" for k in chosen),
                 f"; {others} other entr{'y' if others == 1 else 'ies'} there, not simreg cache keys, left alone" if others else "")
    for k in chosen:
        (base / k).delete()
    return chosen


def entries_table(rows: list[dict[str, Any]]) -> str:
    head = ("key", "teacher", "arch", "dim", "precision", "views", "rows", "MiB", "created")
    body = [(r["key"], str(r["teacher"]), str(r["arch"]), str(r["dim"]), str(r["precision"]), str(r["views"]), str(r["rows"]),
             f"{r['bytes'] / 2**20:.1f}", str(r["created"])) for r in rows]
    w = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), *map(line, body)])
