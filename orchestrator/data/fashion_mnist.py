"""Fashion-MNIST from its four IDX files: the Debian package ``dataset-fashion-mnist``, ``data.root``, or a
download cache.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simreg.models.errors import DataError
from simreg.orchestrator.data.imageset import ImageSet, content_fingerprint
from simreg.orchestrator.data.sources import DataSource, register_source

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")

if TYPE_CHECKING:
    from simreg.orchestrator.config import DataConfig


FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


# md5 of the *decompressed* IDX content (the .gz bytes differ between mirrors and Debian's package).
FMNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}


FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}. Re-download it or reinstall dataset-fashion-mnist") from e
    if len(data) < 4 or len(data) < 4 + 4 * data[3]:
        raise DataError(f"IDX file {str(path)!r} is empty or cut short in its header ({len(data)} bytes): re-download it")
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DataError(f"{str(path)!r} is not a uint8 IDX file: check data.root points at Fashion-MNIST's IDX files")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    if ndim == 0 or dims[0] == 0:
        raise DataError(f"IDX file {str(path)!r} holds no items (a header of {len(data)} bytes only): re-download it")
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{str(path)!r} is truncated ({arr.size} of {int(np.prod(dims))} values): re-download it")
    return arr.reshape(dims)


IDX_STEMS = [name[: -len(".gz")] for name in FMNIST_FILES]


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _content_md5(path: Path) -> str | None:
    try:
        with gzip.open(path, "rb") as f:
            return hashlib.md5(f.read()).hexdigest()
    except (OSError, EOFError):
        return None


def _download_fmnist(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in FMNIST_FILES.items():
        target = dest / name
        if target.is_file() and _content_md5(target) == md5:
            continue
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(FMNIST_URL + name, timeout=30) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"Fashion-MNIST is not installed and downloading {FMNIST_URL + name} failed ({e}). "
                "Install it with `sudo apt-get install dataset-fashion-mnist`, or set data.root to a folder "
                "holding the four IDX files"
            ) from e
        if _content_md5(tmp) != md5:
            tmp.unlink()
            raise DataError(f"downloaded {name} has the wrong checksum: retry, or set data.root to a local copy")
        os.replace(tmp, target)


def fmnist_root(root: str | None, download: bool) -> Path:
    """Resolve the folder with the four IDX files: data.root, the Debian package, or a download cache."""
    if root is not None:
        p = Path(root).expanduser()
        if not p.is_dir():
            raise DataError(f"data.root={root!r} does not exist: point it at a folder with Fashion-MNIST's four IDX files")
        return p
    if all(_find_idx(DEBIAN_FMNIST, n) for n in IDX_STEMS):
        return DEBIAN_FMNIST
    cache = Path(os.environ.get("SIMREG_DATA_CACHE", Path.home() / ".cache" / "simreg")) / "fashion-mnist"
    if all(_find_idx(cache, n) for n in IDX_STEMS):
        return cache
    if not download:
        raise DataError(
            f"Fashion-MNIST not found in {DEBIAN_FMNIST} or {cache}: install it with "
            "`sudo apt-get install dataset-fashion-mnist`, set data.root, or set data.download=true"
        )
    _download_fmnist(cache)
    return cache


def load_fashion_mnist(root: Path, split: str) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    paths = {kind: _find_idx(root, f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte") for kind in ("images", "labels")}
    for kind, p in paths.items():
        if p is None:
            raise DataError(
                f"data.root={str(root)!r} has no {prefix}-{kind} IDX file: it needs train-images-idx3-ubyte(.gz), "
                "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
            )
    images = _read_idx(paths["images"])  # type: ignore[arg-type]
    labels = _read_idx(paths["labels"]).astype(np.int64)  # type: ignore[arg-type]
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{str(root)!r}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return ImageSet(
        images, labels, np.arange(len(labels), dtype=np.int64), FMNIST_CLASSES, f"fashion-mnist/{split}",
        content_fingerprint(images, labels),
    )


@register_source("fashion-mnist")
class FashionMnistSource(DataSource):
    """Train split (60,000) distilled on, test split (10,000) held out; ``data.root`` optional."""

    def load(self, data: DataConfig, seed: int, *, stream: bool = False) -> tuple[ImageSet, ImageSet]:
        root = fmnist_root(data.root, data.download)
        return load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A folder holding the four IDX files (``simreg eval --data /path/to/fashion-mnist``)."""
        return path.is_dir() and all(_find_idx(path, n) for n in IDX_STEMS)
