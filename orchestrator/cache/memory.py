"""The decoded target shards a process holds: one least-recently-used set for every target cache in the process,
bounded in bytes (``cache.memory_mib``), so a teacher actor, a fleet actor or the driver holds at most that much
of the cache however many images, views and keys it serves. Pure numpy: no Ray.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

DEFAULT_MEMORY_MIB = 256
ENTRY_OVERHEAD = 256  # bytes of a dict entry, its key tuple and two array headers, counted per shard held

ShardKey = tuple[str, int, str]  # (cache folder, view index, shard name)


class ShardMemory:
    """Shards as (sorted sample ids (n,), targets (n, d) float16), the least recently used dropped past ``max_bytes``.
    Thread-safe: a fleet actor reads in its I/O threads while its forward thread stores."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_MIB << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._held: OrderedDict[ShardKey, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

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
                self._trim()
                return
            self._held[key] = (ids, targets)
            self.bytes += size
            self._trim()

    def drop(self, folder: str) -> int:
        """Forget every shard of the cache in ``folder`` (a cache closed); returns the bytes freed."""
        with self._lock:
            gone = [k for k in self._held if k[0] == folder]
            freed = 0
            for k in gone:
                ids, tg = self._held.pop(k)
                freed += ids.nbytes + tg.nbytes + ENTRY_OVERHEAD
            self.bytes -= freed
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


SHARDS = ShardMemory()  # this process's: every TargetCache in it shares the bound
