"""Reading a pack: its manifest, its shards, and rows decoded with the image folder's decode.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simreg.models.errors import DataError
from simreg.orchestrator.data.image_folder import decode_image
from simreg.orchestrator.data.pack.format import MANIFEST, PACK_FORMAT, PACK_VERSION
from simreg.orchestrator.storage import Store, open_store


def read_table(shard: str | Store, **kw: Any) -> pa.Table:
    """A Parquet shard of a pack, local or in an object store (a Store or its URI)."""
    s = open_store(shard)
    return pq.read_table(s.path, filesystem=s.fs, **kw)


def read_manifest(root: str | Path | Store) -> dict[str, Any]:
    root = open_store(root)
    path = root / MANIFEST
    repack = f"`simreg data pack IMAGE_FOLDER {root} --overwrite`"
    if not path.is_file():
        raise DataError(f"{str(root)!r} has no {MANIFEST}: it is not a packed dataset, or its packing did not finish. "
                        f"Run `simreg data pack IMAGE_FOLDER {root}` first (or use data.source=image-folder for a plain folder)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {str(path)!r}: {e}. Re-pack with {repack}") from e
    if not isinstance(m, dict) or m.get("format") != PACK_FORMAT or m.get("version") != PACK_VERSION:
        got = (m.get("format"), m.get("version")) if isinstance(m, dict) else (None, None)
        raise DataError(f"{str(path)!r} is format {got[0]!r} version {got[1]!r}; this simreg reads {PACK_FORMAT!r} "
                        f"version {PACK_VERSION}: re-pack with {repack}")
    missing = [k for k in ("classes", "train", "held_out", "splits") if k not in m]
    if missing:
        raise DataError(f"{str(path)!r} lacks {missing}: the manifest is damaged; re-pack with {repack}")
    return m


def shard_paths(root: str | Path | Store, manifest: Mapping[str, Any], split: str) -> list[Store]:
    root = open_store(root)
    if split not in manifest["splits"]:
        raise DataError(f"pack {str(root)!r} has no split {split!r}: it has {sorted(manifest['splits'])}")
    paths = [root / split / s for s in manifest["splits"][split]["shards"]]
    for p in paths:
        if not p.is_file():
            raise DataError(f"shard {str(p)!r} listed in {str(root / MANIFEST)!r} is missing: the pack is incomplete; copy "
                            f"the whole folder again or re-pack with `simreg data pack IMAGE_FOLDER {root} --overwrite`")
    return paths


def _decode_into(pool: ThreadPoolExecutor, blobs: list[bytes], names: list[str], size: int, out: np.ndarray) -> None:
    fix = "The pack is damaged: re-pack with `simreg data pack --overwrite`"
    for i, img in enumerate(pool.map(lambda j: decode_image(blobs[j], size, names[j], fix), range(len(blobs)))):
        out[i] = img


def read_packed_rows(shard: str, ids: np.ndarray, store_size: int) -> dict[str, np.ndarray]:
    """Rows ``ids`` of one shard, decoded: {sample_id, label, image uint8 (B, S, S, 3)} in shard order.
    Reads only the row groups that can hold them (the ids are sorted within a shard)."""
    try:
        t = read_table(shard, columns=["sample_id", "label", "image", "path"],
                          filters=[("sample_id", ">=", int(ids.min())), ("sample_id", "<=", int(ids.max()))])
    except Exception as e:
        raise DataError(f"cannot read shard {shard!r}: {e}. The pack is damaged: re-pack with `simreg data pack --overwrite`") from e
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
