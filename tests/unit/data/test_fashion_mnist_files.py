"""Fashion-MNIST IDX files that are empty, header-only or cut short: one DataError naming the file."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from simreg.models.errors import DataError
from simreg.orchestrator.config import DataConfig
from simreg.orchestrator.data.fashion_mnist import load_fashion_mnist
from simreg.orchestrator.data.sources import load_splits, resolve_source

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx(dims: tuple[int, ...], values: bytes = b"") -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + values


def _write(root: Path, images: bytes, labels: bytes, gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        data = images if "images" in name else labels
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("images, words", [
    (b"", r"is empty or cut short in its header \(0 bytes\)"),
    (b"\x00\x00\x08", r"is empty or cut short in its header \(3 bytes\)"),
    (bytes([0, 0, 8, 3, 0, 0]), r"is empty or cut short in its header \(6 bytes\)"),
    (_idx((0, 28, 28)), r"holds no items \(a header of 16 bytes only\)"),
])
def test_empty_or_header_only_idx_is_a_data_error(images: bytes, words: str, tmp_path: Path):
    root = _write(tmp_path / "fm", images, _idx((2,), b"\x00\x01"))
    with pytest.raises(DataError, match=rf"IDX file '{root / 'train-images-idx3-ubyte'}' {words}: re-download it"):
        load_fashion_mnist(root, "train")


def test_gzipped_empty_idx_and_a_good_one(tmp_path: Path):
    root = _write(tmp_path / "gz", b"", b"", gz=True)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz' is empty"):
        load_fashion_mnist(root, "train")
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8)
    good = _write(tmp_path / "good", _idx((2, 4, 4), pixels.tobytes()), _idx((2,), b"\x03\x07"), gz=True)
    s = load_fashion_mnist(good, "test")
    assert s.images.shape == (2, 4, 4) and s.labels.tolist() == [3, 7]


def test_a_folder_of_idx_files_is_read_as_fashion_mnist(tmp_path: Path):
    root = _write(tmp_path / "fm", _idx((0, 28, 28)), _idx((0,)))
    assert resolve_source(str(root)) == ("fashion-mnist", str(root))
    assert resolve_source(str(tmp_path)) == ("image-folder", str(tmp_path))  # no IDX files there
    with pytest.raises(DataError, match="holds no items"):
        load_splits(DataConfig(source="fashion-mnist", root=str(root)), 0)
