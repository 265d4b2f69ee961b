"""The decoded target shards a process holds: one least-recently-used set for every target cache in the process,
bounded in bytes (``cache.memory_mib``), so a teacher actor, a fleet actor or the driver holds at most that much
of the cache however many images, views and keys it serves, and gives the memory of what it drops back to the
system (the allocators would keep it). No Ray.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections import OrderedDict

import numpy as np
import pyarrow as pa

DEFAULT_MEMORY_MIB = 256
ENTRY_OVERHEAD = 256  # bytes of a dict entry, its key tuple and two array headers, counted per shard held

ShardKey = tuple[str, int, str]  # (cache folder, view index, shard name)
TRIM_FRACTION = 0.25  # the heap is given back to the system each time this fraction of the bound was evicted (at least 8 MiB)


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's ``malloc_trim``, or None (another C library). Shards are ~100 kB arrays made and freed by several threads
    in an order the LRU decides: glibc keeps the holes they leave in its per-thread heaps (with Arrow's pages below, a
    process reading past its bound held ~2.4 x the bound); ``malloc_trim(0)`` hands free pages back."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def release_arrow() -> None:
    """Hand back the pages Arrow's allocator (mimalloc) keeps for this thread, after a shard is encoded or decoded
    in it (well under a microsecond). mimalloc keeps freed pages in a heap per thread, and only the thread itself can
    hand them back (a reader of 4 I/O threads kept most of what it freed)."""
    pa.default_memory_pool().release_unused()


class ShardMemory:
    """Shards as (sorted sample ids (n,), targets (n, d) float16), the least recently used dropped past ``max_bytes``.
    Thread-safe: a fleet actor reads in its I/O threads while its forward thread stores."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_MIB << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._held: OrderedDict[ShardKey, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0  # bytes dropped past the bound since the heap was last trimmed
        self.trims = 0
        self.trim_s = 0.0

    def set_limit(self, mib: float) -> None:
        """The bound of this process: the latest cache opened sets it (``cache.memory_mib`` of its run)."""
        with self._lock:
            self.max_bytes = int(mib * 2**20)
            self._trim()

    def get(self, key: ShardKey) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            got = self._held.get(key)
            if got is not None:
                self._held.move_to_end(key)
            return got

    def put(self, key: ShardKey, ids: np.ndarray, targets: np.ndarray) -> None:
        size = ids.nbytes + targets.nbytes + ENTRY_OVERHEAD
        with self._lock:
            old = self._held.pop(key, None)
            if old is not None:
                self.bytes -= old[0].nbytes + old[1].nbytes + ENTRY_OVERHEAD
            if size > self.max_bytes:  # larger than the whole bound (memory_mib=0): used once, never held
                self.evicted += size
            else:
                self._held[key] = (ids, targets)
                self.bytes += size
            self._trim()
            trim = self.evicted >= max(self.max_bytes * TRIM_FRACTION, 8 << 20)
            if trim:
                self.evicted = 0
        if trim:
            self._give_back()

    def _give_back(self) -> None:
        """Hand the heap's free pages back to the system (glibc), outside the lock: other threads go on reading."""
        if MALLOC_TRIM is None:
            return
        t0 = time.perf_counter()
        MALLOC_TRIM(0)
        self.trims += 1
        self.trim_s += time.perf_counter() - t0

    def drop(self, folder: str) -> int:
        """Forget every shard of the cache in ``folder`` (a cache closed); returns the bytes freed."""
        with self._lock:
            gone = [k for k in self._held if k[0] == folder]
            freed = 0
            for k in gone:
                ids, tg = self._held.pop(k)
                freed += ids.nbytes + tg.nbytes + ENTRY_OVERHEAD
            self.bytes -= freed
        if freed:
            self._give_back()
        return freed

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def _trim(self) -> None:
        while self.bytes > self.max_bytes and self._held:
            ids, tg = self._held.popitem(last=False)[1]
            self.bytes -= ids.nbytes + tg.nbytes + ENTRY_OVERHEAD
            self.evicted += ids.nbytes + tg.nbytes


SHARDS = ShardMemory()  # this process's: every TargetCache in it shares the bound
