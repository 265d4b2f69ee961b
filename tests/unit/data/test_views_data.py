from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simreg.models import DataError
from simreg.orchestrator.config import DataConfig
from simreg.orchestrator.data.fashion_mnist import fmnist_root, load_fashion_mnist
from simreg.orchestrator.data.image_folder import load_image_folder
from simreg.orchestrator.data.sources import load_splits
from simreg.orchestrator.data.views import ViewSpec, eval_views, make_views, view_params
from simreg.orchestrator.evaluation.knn import knn_top1


def test_view_params_reproducible_and_vary():
    spec = ViewSpec(64)
    a = view_params(0, 1, 42, 28, 28, spec)
    assert a == view_params(0, 1, 42, 28, 28, spec)
    assert a != view_params(0, 2, 42, 28, 28, spec)
    top, left, h, w, _ = a
    assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 28
    areas = [view_params(0, e, 1, 28, 28, spec)[2] * view_params(0, e, 1, 28, 28, spec)[3] / 784 for e in range(300)]
    assert 0.15 < min(areas) < 0.35 and max(areas) > 0.85  # scale (0.2, 1)
    flips = [view_params(0, e, 1, 28, 28, spec)[4] for e in range(300)]
    assert 0.35 < np.mean(flips) < 0.65


def test_make_views_shape_and_range(fmnist_small):
    v = make_views(fmnist_small.images[:4], fmnist_small.sample_ids[:4], 0, 0, ViewSpec(64))
    assert v.shape == (4, 1, 64, 64) and v.dtype == np.float32
    assert 0.0 <= v.min() and v.max() <= 1.0
    np.testing.assert_array_equal(v, make_views(fmnist_small.images[:4], fmnist_small.sample_ids[:4], 0, 0, ViewSpec(64)))


def test_full_crop_without_flip_equals_eval_transform(fmnist_small):
    spec = ViewSpec(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0)
    v = make_views(fmnist_small.images[:2], fmnist_small.sample_ids[:2], 0, 0, spec)
    np.testing.assert_allclose(v, eval_views(fmnist_small.images[:2], 64), atol=1e-6)


def test_fashion_mnist_real(fmnist_root):
    test = load_fashion_mnist(fmnist_root, "test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    sub = test.subset(100, 0)
    assert len(sub) == 100 and np.array_equal(test.images[sub.sample_ids], sub.images)


def test_missing_data_folder(tmp_path: Path):
    with pytest.raises(DataError, match=r"data.root='.*nope' does not exist"):
        fmnist_root(str(tmp_path / "nope"), download=False)
    with pytest.raises(DataError, match="t10k-images"):
        load_fashion_mnist(tmp_path, "test")


def test_truncated_idx(tmp_path: Path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path, "test")


def test_image_folder(tmp_path: Path):
    for c, col in (("cat", 30), ("dog", 200)):
        (tmp_path / c).mkdir()
        for i in range(5):
            mode = "L" if i % 2 else "RGBA"
            Image.new(mode, (40 + i, 30), color=col if mode == "L" else (col, col, col, 255)).save(tmp_path / c / f"{i}.png")
    train, held = load_splits(DataConfig(source="image-folder", root=str(tmp_path), download=False, store_size=16, holdout_fraction=0.2, stream=False), 0)
    assert len(train) + len(held) == 10 and len(held) == 2
    assert train.images.shape[1:] == (16, 16, 3) and train.classes == ["cat", "dog"]


def test_empty_image_folder(tmp_path: Path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path, 16)


def test_knn_hand_example():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.6, 0.4]])
    acc = knn_top1(bank, labels, query, torch.tensor([0, 0]), ks=(1, 5))
    assert acc[1] == 100.0  # both nearest neighbours are class 0
    assert acc[5] == 0.0  # majority of 5 is class 1 (3 of 5)
    acc2 = knn_top1(bank, labels, query, torch.tensor([0, 0]), ks=(2,))
    assert acc2[2] == 100.0  # top-2 of each query are both class 0
