"""``data.source=packed``: a pack decoded into memory (checked against its fingerprint), or indexed lazily
as ``PackedRows`` whose train rows the Ray Data view stage reads and decodes (``data.stream``).
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simreg.models.errors import DataError
from simreg.orchestrator.data.image_folder import holdout_split
from simreg.orchestrator.data.imageset import ImageSet, ids_of, piece_ids
from simreg.orchestrator.data.pack.format import MANIFEST, _row_digest
from simreg.orchestrator.data.pack.read import (
    _decode_into,
    read_manifest,
    read_packed_rows,
    read_table,
    repack_hint,
    shard_paths,
)
from simreg.orchestrator.data.pack.scan import default_workers
from simreg.orchestrator.data.sources import DataSource, register_source
from simreg.orchestrator.storage import open_store

if TYPE_CHECKING:
    from simreg.orchestrator.config import DataConfig


def load_packed_split(root: str | Path, split: str, store_size: int, *, workers: int | None = None,
                      manifest: Mapping[str, Any] | None = None) -> ImageSet:
    """One split of a pack decoded into memory: uint8 (N, S, S, 3), the pack's labels and sample ids. The
    rows are checked against the manifest's fingerprint, which (with ``store_size``) keys the target cache."""
    root = open_store(root)  # a local folder or an object-store URI
    m = manifest if manifest is not None else read_manifest(root)
    paths = shard_paths(root, m, split)
    info = m["splits"][split]
    n, n_classes = int(info["rows"]), len(m["classes"])
    images = np.empty((n, store_size, store_size, 3), np.uint8)  # (N, S, S, 3)
    labels, ids = np.empty(n, np.int64), np.empty(n, np.int64)
    h, pos = hashlib.sha256(), 0
    damaged = repack_hint(root)
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for p in paths:
            t = read_table(p, ["sample_id", "label", "image", "path"], f"The pack is damaged or not simreg's: {damaged}")
            k = t.num_rows
            if pos + k > n:
                raise DataError(f"shard {str(p)!r} holds more rows than {MANIFEST} says ({n}): {damaged}")
            ids[pos : pos + k] = t["sample_id"].to_numpy()
            labels[pos : pos + k] = t["label"].to_numpy()
            blobs = t["image"].to_pylist()
            for sid, lab, b in zip(ids[pos : pos + k].tolist(), labels[pos : pos + k].tolist(), blobs, strict=True):
                _row_digest(h, sid, lab, hashlib.sha256(b).digest())
            names = [f"{p}: {q}" for q in t["path"].to_pylist()]
            _decode_into(pool, blobs, names, store_size, images[pos : pos + k])
            pos += k
    if pos != n or not np.array_equal(ids, np.arange(n)) or (n and not 0 <= labels.min() <= labels.max() < n_classes):
        raise DataError(f"split {split!r} of pack {str(root)!r} does not hold ids 0..{n - 1} with labels of its "
                        f"{n_classes} classes: the pack is damaged; {damaged}")
    if h.hexdigest() != info["fingerprint"]:
        raise DataError(f"split {split!r} of pack {str(root)!r} does not match the fingerprint in its {MANIFEST}: a shard "
                        f"was changed or replaced; {damaged}")
    return ImageSet(images, labels, ids, list(m["classes"]), f"packed:{root}/{split}", _cache_fingerprint(info, store_size))


def load_packed_splits(root: str | Path, store_size: int, seed: int, holdout: float,
                       *, workers: int | None = None, lazy: bool = False) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) of a pack: its given held-out split (val/test), or a seeded ``holdout`` share of
    its single split, drawn as ``load_splits`` draws it for an image folder. ``lazy``: images are
    ``PackedRows`` (labels and ids read, nothing decoded until asked; subsets stay lazy)."""
    root = open_store(root)  # a local folder or an object-store URI
    m = read_manifest(root)
    load = index_packed_split if lazy else functools.partial(load_packed_split, workers=workers)
    train = load(root, m["train"], store_size, manifest=m)
    if m["held_out"]:
        return train, load(root, m["held_out"], store_size, manifest=m)
    return holdout_split(train, seed, holdout, str(root))


def _cache_fingerprint(info: Mapping[str, Any], store_size: int) -> str:
    # The cache keys on this: targets depend on the decoded pixels, so on store_size as well as the bytes.
    return hashlib.sha256(f"{info['fingerprint']}:{store_size}:center-crop-bilinear".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PackedRows:
    """Rows of one pack split as a lazy uint8 (N, S, S, 3) array: indexing selects rows without decoding,
    ``np.asarray`` decodes just those rows, ``pieces`` plans a streamed read ({shard, start, stop, ids,
    store_size} per piece of one shard: ``piece_ids``) that ``read_piece`` reads in a Ray Data view task (``StreamedImages``)."""

    root: str
    split: str
    store_size: int
    shards: tuple[str, ...]
    shard_of: np.ndarray  # split row (= sample id) -> index into shards
    rows: np.ndarray  # the selected sample ids, in order

    dtype = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.store_size, self.store_size, 3)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: Any) -> PackedRows:
        return PackedRows(self.root, self.split, self.store_size, self.shards, self.shard_of, np.atleast_1d(self.rows[idx]))

    def chunks(self, rows_per_chunk: int) -> list[tuple[str, np.ndarray]]:
        """(shard path, sorted ids) pieces of at most ``rows_per_chunk`` rows, each within one shard."""
        out: list[tuple[str, np.ndarray]] = []
        ids = np.sort(self.rows)
        if not len(ids):
            return out
        order = np.argsort(self.shard_of[ids], kind="stable")  # by shard, ids sorted within: one pass, not one per shard
        ids = ids[order]
        owner = self.shard_of[ids]
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        for s, e in zip(starts.tolist(), [*starts[1:].tolist(), len(ids)], strict=True):
            mine = ids[s:e]
            out += [(self.shards[int(owner[s])], mine[i : i + rows_per_chunk]) for i in range(0, len(mine), rows_per_chunk)]
        return out

    def pieces(self, rows: int) -> list[dict[str, Any]]:
        return [{"shard": shard, **piece_ids(ids), "store_size": self.store_size} for shard, ids in self.chunks(rows)]

    @staticmethod
    def read_piece(piece: dict[str, Any]) -> dict[str, np.ndarray]:
        """One piece, read and decoded: {sample_id, label, image uint8 (B, S, S, 3)} in shard order."""
        return read_packed_rows(str(piece["shard"]), ids_of(piece), int(piece["store_size"]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, np.uint8)
        where = {int(sid): i for i, sid in enumerate(self.rows)}
        for shard, ids in self.chunks(4096):
            got = read_packed_rows(shard, ids, self.store_size)
            out[[where[int(s)] for s in got["sample_id"]]] = got["image"]
        return out if dtype is None else out.astype(dtype)


def index_packed_split(root: str | Path, split: str, store_size: int, *, manifest: Mapping[str, Any] | None = None) -> ImageSet:
    """One split of a pack without decoding: its labels and ids (the small columns only) and lazy
    ``PackedRows`` images. Nothing is verified against the fingerprint here (that needs every image's
    bytes; ``load_packed_split`` does it); a decode error names the shard and the file."""
    root = open_store(root)  # a local folder or an object-store URI
    m = manifest if manifest is not None else read_manifest(root)
    paths = shard_paths(root, m, split)
    info = m["splits"][split]
    n = int(info["rows"])
    labels, ids, shard_of = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    pos = 0
    for k, p in enumerate(paths):
        t = read_table(p, ["sample_id", "label"], f"The pack is damaged or not simreg's: {repack_hint(root)}")
        k_rows = t.num_rows
        if pos + k_rows > n:
            raise DataError(f"shard {str(p)!r} holds more rows than {MANIFEST} says ({n}): re-pack the folder")
        ids[pos : pos + k_rows], labels[pos : pos + k_rows] = t["sample_id"].to_numpy(), t["label"].to_numpy()
        shard_of[pos : pos + k_rows] = k
        pos += k_rows
    if pos != n or not np.array_equal(ids, np.arange(n)):
        raise DataError(f"split {split!r} of pack {str(root)!r} does not hold ids 0..{n - 1}: re-pack the folder")
    rows = PackedRows(str(root), split, store_size, tuple(p.uri for p in paths), shard_of, ids.copy())
    return ImageSet(rows, labels, ids, list(m["classes"]), f"packed:{root}/{split}", _cache_fingerprint(info, store_size))


@register_source("packed")
class PackedSource(DataSource):
    """The OUT_DIR of ``simreg data pack``; with ``data.stream`` the train split stays in its shards."""

    needs_root = "data.source=packed needs data.root=/path/to/pack (the OUT_DIR of `simreg data pack IMAGE_FOLDER OUT_DIR`)"

    def load(self, data: DataConfig, seed: int, *, stream: bool = False) -> tuple[ImageSet, ImageSet]:
        assert data.root is not None  # needs_root: the config refuses a missing root
        return load_packed_splits(data.root, data.store_size, seed, data.holdout_fraction, lazy=stream)

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / MANIFEST).is_file()
