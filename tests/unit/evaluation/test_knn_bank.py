"""k-NN never cuts k to the bank: a bank smaller than k is an error naming k, the bank and the fix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from simreg.models.errors import DataError
from simreg.orchestrator.evaluation.knn import knn_report, knn_top1


def test_bank_smaller_than_k_is_an_error():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(5, 8, generator=g), torch.tensor([0, 1, 0, 1, 0])
    query, truth = torch.randn(3, 8, generator=g), torch.tensor([0, 1, 1])
    with pytest.raises(DataError, match=r"^k-NN with k=20 needs at least 20 images in its bank, which holds 5: raise the bank size"):
        knn_top1(bank, labels, query, truth)
    with pytest.raises(DataError, match=r"which holds 5: use more$"):
        knn_top1(bank, labels, query, truth, ks=(1, 6), fix="use more")
    assert set(knn_top1(bank, labels, query, truth, ks=(1, 5))) == {1, 5}  # k = the bank size: fine


def test_knn_report_refuses_a_small_bank_before_any_feature():
    calls = []

    def encode(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[0])
        return torch.zeros(v.shape[0], 4)

    images = np.zeros((19, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match=r"k=20 .* which holds 19: set data.knn_bank_size"):
        knn_report(encode, images, np.zeros(19, np.int64), images[:2], np.zeros(2, np.int64), 8, fix="set data.knn_bank_size")
    assert calls == []
