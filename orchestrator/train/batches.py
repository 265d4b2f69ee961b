"""The worker's batches: cut from the blocks Ray Data's split hands it, as they arrive (no Ray import).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from simreg.models.errors import DataError


class SeenIds:
    """The sample ids one rank trained on in an epoch: one bit per id of the split (a bitmap grown to the largest
    id seen) and how many ids this rank saw again. 1M ids take 125 KB whatever the rank trains on, where a
    buffer of the ids took 8 bytes per image, and gathering them from every rank 8 bytes per image per rank.

    Nothing of a batch is kept: every batch's ``sample_id`` tensor held until the epoch ends (a 64-row array, its
    TensorImpl and StorageImpl) would be one small block per step placed by glibc malloc among the step's large
    transient buffers; the freed large chunks can then neither merge nor fit the next step's buffers, and a
    worker's heap grew by ~100 KB per image trained on (measured: 4.4-5.1 GiB per worker after 60k images against
    1.1 GiB with one buffer; benchmarks/RESULTS.md, "Memory against the data size")."""

    def __init__(self, capacity: int = 0) -> None:
        self.bits = np.zeros(max(capacity, 8) // 8 + 1, dtype=np.uint8)
        self._n = 0
        self.repeats = 0  # ids this rank saw more than once

    def add(self, ids: torch.Tensor) -> None:
        a = ids.cpu().numpy().astype(np.int64, copy=False)
        if a.size == 0:
            return
        top = int(a.max())
        if top >= 8 * len(self.bits):
            grown = np.zeros(max(2 * len(self.bits), top // 8 + 1), dtype=np.uint8)
            grown[: len(self.bits)] = self.bits
            self.bits = grown
        distinct = np.unique(a)
        byte, mask = distinct >> 3, np.left_shift(1, distinct & 7).astype(np.uint8)
        new = int(np.count_nonzero((self.bits[byte] & mask) == 0))
        self.repeats += a.size - new
        np.bitwise_or.at(self.bits, byte, mask)
        self._n += a.size

    def __len__(self) -> int:
        return self._n

    def ids(self) -> np.ndarray:
        """The distinct ids seen, sorted."""
        return np.flatnonzero(np.unpackbits(self.bits, bitorder="little"))


def popcount(bits: np.ndarray) -> int:
    """Set bits of a uint8 array."""
    return int(np.unpackbits(bits).sum(dtype=np.int64))


def _checked(
    batches: Iterator[dict[str, torch.Tensor]], epoch: int, seen: SeenIds, waits: list[float],
) -> Iterator[dict[str, torch.Tensor]]:
    """Refuse a batch rendered for another epoch, record the sample ids this rank trained on and the
    seconds spent waiting for each batch (``waits[0]``: for the first one)."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        b = next(it, None)
        waits.append(time.perf_counter() - t0)
        if b is None:
            return
        ep = b["epoch"]
        if ep.numel() and (int(ep.min()) != epoch or int(ep.max()) != epoch):
            raise DataError(f"pipeline produced views of epoch {sorted(set(ep.tolist()))} during epoch {epoch}")
        seen.add(b["sample_id"])  # copied: keeping the batch's tensor would fragment the heap (SeenIds)
        yield b


def _batches(shard: Any, batch_size: int, pin: bool, ahead: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """This epoch's batches of ``batch_size`` rows (the last one shorter), cut from the blocks the split hands
    this worker as they arrive; a thread fetches up to ``ahead`` blocks in advance.

    ``iter_torch_batches(prefetch_batches=1)`` holds a block back until the worker's next block has arrived,
    so an epoch's first batch waited for ~5 teacher batches (1.4 s per epoch on 2 cores); without prefetching
    each fetch blocked the step instead. Here the first batch leaves with the first block."""
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    blocks = shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    for block in in_thread(blocks, ahead, "simreg-block-fetch"):
        pending.append(block)
        rows += _num_rows(block)
        while rows >= batch_size:
            batch, pending = _cut(pending, batch_size)
            rows -= batch_size
            yield _to_torch(batch, pin)
    if rows:
        yield _to_torch(_cut(pending, rows)[0], pin)


def in_thread(items: Iterable[Any], ahead: int, name: str) -> Iterator[Any]:
    """``items``, produced by a thread of their own up to ``ahead`` in advance; an error there is raised here. The
    thread stops once the consumer does (a closed generator)."""
    out: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:  # False once the consumer has stopped listening
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001  # re-raised in the consumer's thread
            put(e)

    threading.Thread(target=produce, name=name, daemon=True).start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _num_rows(block: dict[str, np.ndarray]) -> int:
    return len(next(iter(block.values())))


def _cut(pending: list[dict[str, np.ndarray]], n: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The first ``n`` rows of the pending blocks, and the blocks left."""
    take: list[dict[str, np.ndarray]] = []
    need = n
    rest = list(pending)
    while need:
        b = rest.pop(0)
        k = _num_rows(b)
        if k <= need:
            take.append(b)
            need -= k
        else:
            take.append({c: v[:need] for c, v in b.items()})
            rest.insert(0, {c: v[need:] for c, v in b.items()})
            need = 0
    batch = take[0] if len(take) == 1 else {c: np.concatenate([t[c] for t in take]) for c in take[0]}
    return batch, rest


def _to_torch(batch: dict[str, np.ndarray], pin: bool) -> dict[str, torch.Tensor]:
    out = {c: torch.from_numpy(np.array(v)) for c, v in batch.items()}  # a copy: object-store arrays are read-only
    return {c: t.pin_memory() for c, t in out.items()} if pin else out
