"""Reading a pack: its manifest, its shards, and rows decoded with the image folder's decode.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from simreg.models.errors import DataError, first_line
from simreg.orchestrator.data.image_folder import decode_image
from simreg.orchestrator.data.pack.format import MANIFEST, PACK_FORMAT, PACK_VERSION, SCHEMA
from simreg.orchestrator.data.pack.schema_guard import read_checked
from simreg.orchestrator.storage import Store, open_store

SHARD_NAME = re.compile(r"part-\d{5,}\.parquet")  # what ``write`` names a shard: a plain file name in its split folder
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a plain folder name in the pack


def repack_hint(root: object) -> str:
    return f"re-pack with `simreg data pack IMAGE_FOLDER {root} --overwrite`"


def read_table(shard: str | Store, columns: list[str], fix: str | None = None, **kw: Any) -> pa.Table:
    """``columns`` of a pack shard, local or in an object store (a Store or its URI), once its schema is
    checked to be exactly the pack's ``SCHEMA`` (schema_guard: nothing in another file is read)."""
    fix = fix or "The pack is damaged or not simreg's: re-pack with `simreg data pack --overwrite`"
    try:
        return read_checked(shard, SCHEMA, "pack shard", fix, columns=columns, **kw)
    except DataError:
        raise
    except Exception as e:  # pyarrow: OSError, ArrowInvalid, ... on a damaged file
        raise DataError(f"cannot read pack shard {str(open_store(shard))!r}: {first_line(e)}. {fix}") from e


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _split_problems(name: Any, info: Any) -> list[str]:
    if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
        return [f"split name {name!r} is not a plain folder name (letters, digits, _ and -)"]
    if not isinstance(info, dict):
        return [f"splits.{name} is {type(info).__name__}, not an object"]
    out = [f"splits.{name}.{k} is {info.get(k)!r}, not an integer >= 0" for k in ("rows", "bytes") if not _is_int(info.get(k))]
    fp = info.get("fingerprint")
    if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{64}", fp):
        out.append(f"splits.{name}.fingerprint is {fp!r}, not a sha256 hex digest")
    shards = info.get("shards")
    if not isinstance(shards, list) or not shards:
        return [*out, f"splits.{name}.shards is {shards!r}, not a list of shard file names"]
    bad = [s for s in shards if not isinstance(s, str) or not SHARD_NAME.fullmatch(s)]
    if bad:
        out.append(f"splits.{name}.shards holds {bad[:3]!r}{' ...' if len(bad) > 3 else ''}: a shard is a plain file name "
                   "part-NNNNN.parquet inside its split folder (no path separators, no '..', not absolute)")
    elif len(set(shards)) != len(shards):
        out.append(f"splits.{name}.shards lists a shard twice")
    return out


def manifest_problems(m: Any) -> list[str]:
    """How a parsed manifest differs from one simreg writes (the fields a reader or ``--overwrite`` uses)."""
    if not isinstance(m, dict):
        return [f"it holds a JSON {type(m).__name__}, not an object"]
    if m.get("format") != PACK_FORMAT or m.get("version") != PACK_VERSION:
        return [f"it is format {m.get('format')!r} version {m.get('version')!r}; this simreg reads {PACK_FORMAT!r} version {PACK_VERSION}"]
    missing = [k for k in ("classes", "train", "held_out", "splits") if k not in m]
    if missing:
        return [f"it lacks {missing}"]
    out: list[str] = []
    classes, splits = m["classes"], m["splits"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        out.append("classes is not a non-empty list of class names")
    if not isinstance(splits, dict) or not splits:
        return [*out, "splits is not a non-empty object"]
    for name, info in splits.items():
        out += _split_problems(name, info)
    if m["train"] not in splits:
        out.append(f"train={m['train']!r} is not one of its splits {sorted(splits)}")
    if m["held_out"] is not None and (m["held_out"] not in splits or m["held_out"] == m["train"]):
        out.append(f"held_out={m['held_out']!r} is not another of its splits {sorted(splits)}")
    return out


def manifest_at(root: Store) -> tuple[dict[str, Any] | None, str]:
    """(the manifest, "") when ``root`` holds one simreg writes, checked field by field (types, split and
    shard names); else (None, why not)."""
    path = root / MANIFEST
    if not path.is_file():
        return None, f"{str(root)!r} has no {MANIFEST}"
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"cannot read {str(path)!r}: {first_line(e)}"
    problems = manifest_problems(m)
    return (None, f"{str(path)!r} is not a manifest this simreg writes: {'; '.join(problems)}") if problems else (m, "")


def read_manifest(root: str | Path | Store) -> dict[str, Any]:
    root = open_store(root)
    m, why = manifest_at(root)
    if m is not None:
        return m
    if not (root / MANIFEST).is_file():
        raise DataError(f"{why}: it is not a packed dataset, or its packing did not finish. Run "
                        f"`simreg data pack IMAGE_FOLDER {root}` first (or use data.source=image-folder for a plain folder)")
    raise DataError(f"{why}; {repack_hint(root)}")


def shard_paths(root: str | Path | Store, manifest: Mapping[str, Any], split: str) -> list[Store]:
    root = open_store(root)
    if split not in manifest["splits"]:
        raise DataError(f"pack {str(root)!r} has no split {split!r}: it has {sorted(manifest['splits'])}")
    paths = [root / split / s for s in manifest["splits"][split]["shards"]]
    for p in paths:
        if not p.is_file():
            raise DataError(f"shard {str(p)!r} listed in {str(root / MANIFEST)!r} is missing: the pack is incomplete; copy "
                            f"the whole folder again or {repack_hint(root)}")
    return paths


def _decode_into(pool: ThreadPoolExecutor, blobs: list[bytes], names: list[str], size: int, out: np.ndarray) -> None:
    fix = "The pack is damaged: re-pack with `simreg data pack --overwrite`"
    for i, img in enumerate(pool.map(lambda j: decode_image(blobs[j], size, names[j], fix), range(len(blobs)))):
        out[i] = img


def read_packed_rows(shard: str, ids: np.ndarray, store_size: int) -> dict[str, np.ndarray]:
    """Rows ``ids`` of one shard, decoded: {sample_id, label, image uint8 (B, S, S, 3)} in shard order.
    Reads only the row groups that can hold them (the ids are sorted within a shard)."""
    t = read_table(shard, columns=["sample_id", "label", "image", "path"],
                   filters=[("sample_id", ">=", int(ids.min())), ("sample_id", "<=", int(ids.max()))])
    keep = np.isin(t["sample_id"].to_numpy(), ids)
    t = t.filter(pa.array(keep))
    if t.num_rows != len(ids):
        raise DataError(f"shard {shard!r} lacks {len(ids) - t.num_rows} of the rows asked for: re-pack with `simreg data pack --overwrite`")
    return decode_batch({k: t[k].to_numpy(zero_copy_only=False) for k in ("sample_id", "label", "image", "path")}, store_size)


def decode_batch(batch: dict[str, np.ndarray], store_size: int) -> dict[str, np.ndarray]:
    """Packed rows -> {sample_id (B,), label (B,), image uint8 (B, S, S, 3)}: the decode stage of
    ``read_packed_dataset``, the same decode as ``load_packed_split``."""
    fix = "The pack is damaged: re-pack with `simreg data pack --overwrite`"
    imgs = [decode_image(bytes(b), store_size, str(p), fix) for b, p in zip(batch["image"], batch["path"], strict=True)]
    return {
        "sample_id": np.asarray(batch["sample_id"], np.int64), "label": np.asarray(batch["label"], np.int64),
        "image": np.stack(imgs) if imgs else np.empty((0, store_size, store_size, 3), np.uint8),
    }
