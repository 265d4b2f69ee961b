"""``simreg cache info|clear``: the key folders of a cache root, listed or removed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from simreg.models.errors import DataError
from simreg.orchestrator.cache.targets import META, default_cache_dir


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
