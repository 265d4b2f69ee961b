"""``simreg data pack``: an ImageFolder tree -> ``OUT/<split>/part-NNNNN.parquet`` + ``OUT/manifest.json``.

A row: ``sample_id`` int64 (0..n-1 per split, in the ImageFolder's class-then-sorted-path order: a clean
folder gets the ids ``load_image_folder`` gives it), ``label`` int64, ``image`` binary (the file's bytes
as encoded), ``path`` (relative to the split root) and ``mode`` (PIL's, before the RGB conversion).
Shards and the manifest are written to a temporary name and renamed; the manifest goes last, so a
folder without one is no pack.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simreg.models.errors import DataError
from simreg.orchestrator.data.pack.format import ALL_SPLIT, MANIFEST, PACK_FORMAT, PACK_VERSION, SCHEMA, _row_digest
from simreg.orchestrator.data.pack.read import manifest_at
from simreg.orchestrator.data.pack.scan import (
    ScannedImage,
    ScanReport,
    SplitScan,
    _columns,
    default_workers,
    scan_image_folder,
)
from simreg.orchestrator.storage import Store, is_remote, open_store, write_atomic

log = logging.getLogger("simreg")


def _check_out_dir(src: Path, out: Path, overwrite: bool) -> list[Store]:
    """What ``--overwrite`` will remove from ``out`` (``_old_pack``); refuses an OUT_DIR inside ``src``."""
    if out == src or src in out.parents:
        raise DataError(f"output folder {str(out)!r} is inside the image folder {str(src)!r}: it would be read as a "
                        "class folder; choose an OUT_DIR outside it")
    if out.exists() and not out.is_dir():
        raise DataError(f"output {str(out)!r} is a file: give a folder for the pack")
    return _old_pack(open_store(out), overwrite)


def _old_pack(out: Store, overwrite: bool) -> list[Store]:
    """The files of the pack simreg wrote in ``out`` (the shards its manifest lists, then the manifest):
    what ``--overwrite`` removes, and nothing else. Empty for an empty or absent folder; a non-empty folder
    without ``--overwrite``, or without a valid simreg manifest, is refused."""
    if not out.listdir():
        return []
    if not overwrite:
        raise DataError(f"output folder {str(out)!r} is not empty: choose a new or empty folder, or pass --overwrite "
                        "(overwrite=True) to replace the pack there")
    m, why = manifest_at(out)
    if m is None:
        raise DataError(f"--overwrite replaces only a pack simreg wrote, and {why}: nothing was removed. Choose a new or "
                        "empty OUT_DIR, or empty this folder yourself (a pack interrupted while writing has no manifest yet)")
    return [out / split / shard for split, info in m["splits"].items() for shard in info["shards"]] + [out / MANIFEST]


def _remove_old_pack(out: Store, files: list[Store]) -> None:
    """``files`` of the old pack (``_old_pack``: its shards, then its manifest), in a local folder or a bucket:
    the manifest first (a reader then finds no pack, never a half-replaced one), then the shards, and a split
    folder left empty. Nothing else is touched. Logs what it removes before removing it."""
    if not files:
        return
    shards = [f for f in files[:-1] if f.is_file()]
    names = [f.path[len(out.path) + 1:] for f in shards]
    size = sum(f.fs.get_file_info(f.path).size or 0 for f in shards)
    log.info("data pack --overwrite: removing the old pack in %s: %s and %d shard(s), %.1f MiB (%s)", out, MANIFEST, len(shards),
             size / 2**20, ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else ""))
    files[-1].delete()
    for f in shards:
        f.delete()
    if out.local_path is not None:
        for d in {Path(f.path).parent for f in shards}:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def _read_scanned(split_root: Path, im: ScannedImage) -> bytes:
    p = split_root / im.path
    again = "leave the folder alone while packing and run `simreg data pack` again (with --overwrite)"
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"{str(p)!r} became unreadable between the pre-scan and packing ({e}): {again}") from e
    if hashlib.sha256(data).hexdigest() != im.sha256:
        raise DataError(f"{str(p)!r} changed between the pre-scan and packing: {again}")
    return data


def _write_split(sc: SplitScan, dest: Path, shard_rows: int, pool: ThreadPoolExecutor) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    shards: list[str] = []
    nbytes = 0
    read = functools.partial(_read_scanned, sc.root)
    for k, start in enumerate(range(0, len(sc.images), shard_rows)):
        rows = sc.images[start : start + shard_rows]
        blobs = list(pool.map(read, rows))
        ids = np.arange(start, start + len(rows), dtype=np.int64)
        for sid, im in zip(ids.tolist(), rows, strict=True):
            _row_digest(h, sid, im.label, bytes.fromhex(im.sha256))
        table = pa.table({
            "sample_id": ids, "label": np.array([im.label for im in rows], np.int64), "image": blobs,
            "path": [im.path for im in rows], "mode": [im.mode for im in rows],
        }, schema=SCHEMA)
        name = f"part-{k:05d}.parquet"
        # Encoded images do not compress further: only the small columns are.
        write_atomic(dest / name, functools.partial(pq.write_table, table, compression={
            "sample_id": "zstd", "label": "zstd", "image": "none", "path": "zstd", "mode": "zstd"}))
        shards.append(name)
        nbytes += (dest / name).stat().st_size
    return {"rows": len(sc.images), "shards": shards, "bytes": nbytes, "fingerprint": h.hexdigest(),
            "class_counts": sc.class_counts}


def _strict_message(report: ScanReport) -> str:
    bad = report.bad
    listed = "; ".join(f"{b.split}/{b.path} ({b.kind}: {b.reason})" for b in bad[:10])
    more = f"; and {len(bad) - 10} more (`simreg data scan {report.root}` lists them all)" if len(bad) > 10 else ""
    return (f"{len(bad)} bad image file(s) in {report.root}: {listed}{more}. Remove or replace them, or drop --strict "
            "(strict=False) to leave them out of the pack")


def pack_image_folder(
    src: str | Path, out_dir: str | Path, *, strict: bool = False, shard_rows: int = 1024, overwrite: bool = False,
    workers: int | None = None, on_scan: Callable[[ScanReport], Any] | None = None,
) -> dict[str, Any]:
    """Pre-scan ``src`` (``scan_image_folder``; ``on_scan`` sees the report first), then write
    ``OUT/<split>/part-NNNNN.parquet`` of at most ``shard_rows`` rows and ``OUT/manifest.json``; returns
    the manifest. Bad files are left out and reported (``strict``: a DataError naming them). Empty class
    folders keep their class (labels stay stable); a split without any decodable image is an error."""
    if is_remote(str(out_dir)):
        return _pack_to_store(src, Store(str(out_dir)), strict=strict, shard_rows=shard_rows, overwrite=overwrite,
                              workers=workers, on_scan=on_scan)
    src, out = Path(src).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if shard_rows < 1:
        raise DataError(f"shard_rows={shard_rows} must be >= 1 (--shard-rows)")
    old = _check_out_dir(src, out, overwrite)
    report = scan_image_folder(src, workers=workers)
    if on_scan is not None:
        on_scan(report)
    if strict and report.bad:
        raise DataError(_strict_message(report))
    if not report.classes:
        raise DataError(f"image folder {str(src)!r} has no class subfolders: the layout is ROOT/<class>/<image> "
                        "(or ROOT/train/<class>/<image> + ROOT/val/<class>/<image>)")
    for sc in report.splits.values():
        if not sc.images:
            raise DataError(f"{'split ' + repr(sc.name) + ' of ' if report.held_out else ''}image folder {str(sc.root)!r} "
                            f"holds no decodable image ({sc.files} image file(s), {len(sc.bad)} bad; looked for "
                            "image suffixes inside class subfolders): the layout is ROOT/<class>/<image>")
    if report.bad:
        log.warning("data pack: %d bad file(s) left out of the pack (%s)", len(report.bad), report.summary())
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_pack(open_store(out), old)
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        splits = {n: _write_split(sc, out / n, shard_rows, pool) for n, sc in report.splits.items()}
    manifest = {
        "format": PACK_FORMAT, "version": PACK_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": str(src), "classes": report.classes, "train": next(iter(splits)), "held_out": report.held_out,
        "shard_rows": shard_rows, "splits": splits, "scan": report.to_dict(),
    }
    write_atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest


def _pack_to_store(src: str | Path, dest: Store, **options: Any) -> dict[str, Any]:
    """A pack written to an object store: packed in a local temporary folder (the size of the pack), then
    uploaded shards first and the manifest last, so a reader finds a whole pack or none."""
    old = _old_pack(dest, options["overwrite"])
    with tempfile.TemporaryDirectory(prefix="simreg-pack-") as tmp:
        local = Path(tmp) / "pack"
        manifest = pack_image_folder(src, local, **{**options, "overwrite": False})
        _remove_old_pack(dest, old)
        for split in manifest["splits"]:
            (dest / split).upload(local / split)
        (dest / MANIFEST).upload(local / MANIFEST)
    return manifest


def manifest_summary(manifest: Mapping[str, Any], root: str | Path) -> str:
    head = ("split", "rows", "shards", "MiB", "fingerprint")
    body = [(n, str(s["rows"]), str(len(s["shards"])), f"{s['bytes'] / 2**20:.1f}", s["fingerprint"][:16])
            for n, s in manifest["splits"].items()]
    held = (f"held-out split: {manifest['held_out']}" if manifest["held_out"]
            else f"held-out split: drawn from '{ALL_SPLIT}' at load (data.holdout_fraction)")
    return f"pack {root}: {len(manifest['classes'])} classes, {held}\n" + _columns(head, body)
