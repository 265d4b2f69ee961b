"""``simreg cache info|clear``: the key folders of a cache root, listed or removed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from simreg.models.errors import DataError
from simreg.orchestrator.cache.targets import META, default_cache_dir
from simreg.orchestrator.storage import Store, open_store


def _root(root: str | Path | None) -> Store:
    return open_store(root if root else default_cache_dir())


def cache_entries(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per key directory: digest, teacher, arch, views held, rows, bytes, created (local or object store)."""
    import pyarrow.fs as pafs

    base = _root(root)
    rows: list[dict[str, Any]] = []
    for name in base.listdir(dirs_only=True):
        d = base / name
        files = [i for i in d.fs.get_file_info(pafs.FileSelector(d.path, allow_not_found=True, recursive=True))
                 if i.type == pafs.FileType.File]
        if not files:
            continue
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            meta = {}
        views = {i.path[len(d.path) + 1:].split("/", 1)[0] for i in files if i.path[len(d.path) + 1:].startswith("v")}
        n_rows = 0
        for i in files:
            if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"):
                try:
                    with d.fs.open_input_file(i.path) as fh:
                        n_rows += pq.ParquetFile(fh).metadata.num_rows
                except Exception:
                    pass
        t = meta.get("key", {}).get("teacher", {})
        rows.append({
            "key": name, "teacher": meta.get("teacher", "?"), "arch": t.get("arch", "?"), "dim": meta.get("dim"),
            "precision": t.get("precision", "?"), "views": len(views), "rows": n_rows, "bytes": sum(i.size or 0 for i in files),
            "created": meta.get("created", "?"), "data": meta.get("key", {}).get("data", "?"),
        })
    return rows


def clear_cache(root: str | Path | None = None, keys: list[str] | None = None) -> list[str]:
    """Remove the given key directories (a unique prefix is enough), or all of them; returns what went."""
    base = _root(root)
    present = [name for name in base.listdir(dirs_only=True) if (base / name / META).is_file()]
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
        (base / k).delete()
    return chosen


def entries_table(rows: list[dict[str, Any]]) -> str:
    head = ("key", "teacher", "arch", "dim", "precision", "views", "rows", "MiB", "created")
    body = [(r["key"], str(r["teacher"]), str(r["arch"]), str(r["dim"]), str(r["precision"]), str(r["views"]), str(r["rows"]),
             f"{r['bytes'] / 2**20:.1f}", str(r["created"])) for r in rows]
    w = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), *map(line, body)])
