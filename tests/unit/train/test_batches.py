"""The worker's batcher: the blocks a Ray Data split hands a worker, cut into fixed-size batches."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from simreg.orchestrator.train.batches import _batches


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
