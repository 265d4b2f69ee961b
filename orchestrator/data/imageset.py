"""Labelled images in memory (or streamed from storage): ``ImageSet`` and the content fingerprint.

Every image keeps its index in its split as ``sample_id``; subsets keep the original ids.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


def piece_ids(ids: np.ndarray) -> dict[str, Any]:
    """Sorted sample ids of a piece, compactly: ``start`` and ``stop`` for a run of consecutive ids (a whole split's
    piece: O(1)), else ``ids``, the bytes of little-endian int64 (8 bytes an id where a list of Python ints costs ~36
    in the driver and in Ray Data's item blocks). The same three keys either way (one schema for every block);
    ``ids_of`` reads them back."""
    ids = np.asarray(ids, np.int64)
    if len(ids) and int(ids[-1]) - int(ids[0]) + 1 == len(ids) and bool(np.all(np.diff(ids) == 1)):
        return {"start": int(ids[0]), "stop": int(ids[-1]) + 1, "ids": b""}
    return {"start": 0, "stop": 0, "ids": ids.astype("<i8").tobytes()}


def ids_of(piece: dict[str, Any]) -> np.ndarray:
    """The int64 sample ids of a piece: ``ids`` bytes when set, else the range [start, stop)."""
    raw = piece.get("ids")
    if raw is not None and len(raw):
        return np.frombuffer(bytes(raw), "<i8").astype(np.int64)
    return np.arange(int(piece["start"]), int(piece["stop"]), dtype=np.int64)


@runtime_checkable
class StreamedImages(Protocol):
    """Images a source leaves in storage: a lazy uint8 (N, H, W, C) array the Ray Data view stage reads.

    Indexing selects rows without reading them (subsets stay lazy); ``np.asarray`` reads and decodes the
    selected rows (the k-NN sets). ``pieces(rows)`` plans a streamed read: descriptions of at
    most ``rows`` rows each (one Ray Data block each); ``read_piece(piece)``, a static method, reads one in a
    view-stage task -> {"sample_id" (B,), "label" (B,), "image" uint8 (B, H, W, C)}."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, idx: Any) -> StreamedImages: ...

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray: ...

    def pieces(self, rows: int) -> list[dict[str, Any]]: ...

    @staticmethod
    def read_piece(piece: dict[str, Any]) -> dict[str, np.ndarray]: ...


@dataclass
class ImageSet:
    """uint8 images (N, H, W) or (N, H, W, 3), int64 labels and ids, class names.

    ``source_fingerprint`` identifies the split the ids index into (its content hash), kept by subsets:
    the target cache keys on it, so every subset of one split shares cached targets per sample id."""

    images: np.ndarray  # or StreamedImages
    labels: np.ndarray
    sample_ids: np.ndarray
    classes: list[str]
    name: str
    source_fingerprint: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def streamed(self) -> bool:
        """Images left in storage (``StreamedImages``, e.g. a pack's shards with ``data.stream``): the train
        pipeline reads them there."""
        return isinstance(self.images, StreamedImages)

    def materialized(self) -> ImageSet:
        """The same set with its images decoded into memory (itself when they already are)."""
        if not self.streamed:
            return self
        return ImageSet(np.asarray(self.images), self.labels, self.sample_ids, self.classes, self.name, self.source_fingerprint)

    def blocks(self, rows: int) -> Iterator[dict[str, np.ndarray]]:
        """{sample_id, image} blocks of at most ``rows`` rows covering the set once; a streamed pack is
        read and decoded one piece at a time, so memory stays at one block."""
        if not self.streamed:
            for i in range(0, len(self), rows):
                yield {"sample_id": self.sample_ids[i : i + rows], "image": np.asarray(self.images[i : i + rows])}
            return
        lazy = self.images
        assert isinstance(lazy, StreamedImages)
        for piece in lazy.pieces(rows):
            got = lazy.read_piece(piece)
            yield {"sample_id": got["sample_id"], "image": got["image"]}

    def subset(self, n: int | None, seed: int) -> ImageSet:
        """A class-stratified-by-chance random subset of ``n`` images (all when n is None or >= N)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return ImageSet(self.images[idx], self.labels[idx], self.sample_ids[idx], self.classes, self.name, self.source_fingerprint)

    def split_two(self, n_a: int, n_b: int, seed: int) -> tuple[ImageSet, ImageSet]:
        """Two disjoint random subsets of sizes n_a and n_b (shrunk proportionally when N is smaller)."""
        if n_a + n_b > len(self):
            n_a = max(1, len(self) * n_a // (n_a + n_b))
            n_b = len(self) - n_a
        perm = np.random.default_rng(seed).permutation(len(self))
        return self.take(np.sort(perm[:n_a]), "a"), self.take(np.sort(perm[n_a : n_a + n_b]), "b")

    def take(self, idx: np.ndarray, tag: str) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx], self.sample_ids[idx], self.classes, f"{self.name}/{tag}", self.source_fingerprint)


def content_fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
