"""The worker's batcher: the blocks a Ray Data split hands a worker, cut into fixed-size batches."""
from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from simreg.orchestrator.train.batches import SeenIds, _batches, _checked, popcount


class Split:
    """Stands in for a ``DataIterator`` shard: ``iter_batches(batch_size=None)`` yields whole blocks."""

    def __init__(self, sizes: list[int], fail_after: int | None = None) -> None:
        self.sizes, self.fail_after = sizes, fail_after

    def iter_batches(self, **kw: Any) -> Iterator[dict[str, np.ndarray]]:
        assert kw["batch_size"] is None and kw["batch_format"] == "numpy"
        start = 0
        for i, n in enumerate(self.sizes):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("block fetch failed")
            ids = np.arange(start, start + n, dtype=np.int64)
            view = np.broadcast_to(ids[:, None, None, None].astype(np.float32), (n, 1, 2, 2))
            view.flags.writeable = False  # object-store arrays are read-only
            yield {"sample_id": ids, "view": view}
            start += n


@pytest.mark.parametrize("sizes", [[128] * 5, [128, 184], [56, 128, 3, 7, 128], [30], []])
def test_every_row_once_in_order_in_full_batches_then_the_rest(sizes: list[int]):
    batches = list(_batches(Split(sizes), 64, pin=False))
    total = sum(sizes)
    assert [len(b["sample_id"]) for b in batches] == [64] * (total // 64) + ([total % 64] if total % 64 else [])
    ids = torch.cat([b["sample_id"] for b in batches]) if batches else torch.zeros(0, dtype=torch.int64)
    assert ids.tolist() == list(range(total))
    for b in batches:  # columns stay aligned row by row, as writable torch tensors
        assert torch.equal(b["view"][:, 0, 0, 0], b["sample_id"].float())
        b["view"] += 1


def test_a_failed_fetch_raises_in_the_training_thread():
    it = _batches(Split([128, 128, 128], fail_after=2), 64, pin=False)
    got = [next(it) for _ in range(4)]
    assert len(got) == 4
    with pytest.raises(RuntimeError, match="block fetch failed"):
        next(it)


def test_recording_the_ids_keeps_no_batch_alive():
    """_checked records every id but lets each batch go once the step is done: holding a small piece of
    every batch (its sample_id tensor) until the epoch ends fragments glibc's heap, and a worker's memory
    then grows by ~100 KB per image of the epoch (see SeenIds)."""

    class WithEpoch(Split):
        def iter_batches(self, **kw: Any) -> Iterator[dict[str, np.ndarray]]:
            for b in super().iter_batches(**kw):
                yield {**b, "epoch": np.zeros(len(b["sample_id"]), np.int64)}

    seen, waits, alive = SeenIds(100), [], []  # capacity too small on purpose: the buffer grows
    for b in _checked(_batches(WithEpoch([128] * 6 + [20]), 64, pin=False), 0, seen, waits):
        alive.append([weakref.ref(t) for t in b.values()])
    del b
    gc.collect()
    assert not [r for refs in alive for r in refs if r() is not None]
    assert seen.ids().tolist() == list(range(6 * 128 + 20)) and len(seen) == 6 * 128 + 20 and seen.repeats == 0
    assert len(waits) == len(alive) + 1


def test_seen_ids_count_repeats_and_stay_one_bit_per_id():
    seen = SeenIds(10)
    seen.add(torch.tensor([5, 3, 5]))  # a repeat within a batch
    seen.add(torch.tensor([3, 999_999]))  # a repeat across batches; the bitmap grows to the largest id
    assert seen.ids().tolist() == [3, 5, 999_999] and len(seen) == 5 and seen.repeats == 2
    assert seen.bits.nbytes <= 2 * 1_000_000 // 8 + 1  # ~125 KB for a million ids, whatever was trained on
    assert popcount(seen.bits) == 3


def test_global_id_counts_over_two_ranks():
    """Two gloo ranks with overlapping ids: the union's size and the surplus occurrences."""
    import os

    import torch.multiprocessing as mp

    from tests.services import free_port

    os.environ["SIMREG_TEST_PORT"] = str(free_port())
    mp.start_processes(_two_ranks, nprocs=2, start_method="fork", join=True)


def _two_ranks(rank: int) -> None:
    import os

    import torch.distributed as dist

    from simreg.orchestrator.train.worker import _global_id_counts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["SIMREG_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        seen = SeenIds(4)
        seen.add(torch.tensor([0, 1, 2] if rank == 0 else [2, 3, 40_000, 40_000]))
        assert _global_id_counts(seen, 2, torch.device("cpu")) == (5, 2)  # {0,1,2,3,40000}; 2 and 40000 twice
    finally:
        dist.destroy_process_group()
