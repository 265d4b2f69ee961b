"""Labelled image sources: Fashion-MNIST (IDX files), ImageFolder trees and packed Parquet shards
(``simreg data pack``, orchestrator/pack.py), held in memory as uint8.

Every image keeps its index in its split as ``sample_id``; subsets keep the original ids.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import struct
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simreg.models.errors import DataError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
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
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_LAYOUTS = (("train", "val"), ("train", "test"))  # ROOT/train + ROOT/val (or test): a given held-out split


@dataclass
class ImageSet:
    """uint8 images (N, H, W) or (N, H, W, 3), int64 labels and ids, class names.

    ``source_fingerprint`` identifies the split the ids index into (its content hash), kept by subsets:
    the target cache keys on it, so every subset of one split shares cached targets per sample id."""

    images: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    classes: list[str]
    name: str
    source_fingerprint: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def streamed(self) -> bool:
        """Images still in a pack's Parquet shards (``data.stream``): the train pipeline reads them there."""
        return not isinstance(self.images, np.ndarray)

    def materialized(self) -> ImageSet:
        """The same set with its images decoded into memory (itself when they already are)."""
        if not self.streamed:
            return self
        return ImageSet(np.asarray(self.images), self.labels, self.sample_ids, self.classes, self.name, self.source_fingerprint)

    def blocks(self, rows: int) -> Iterator[dict[str, np.ndarray]]:
        """{sample_id, image} blocks of at most ``rows`` rows covering the set once; a streamed pack is
        read and decoded one block (a piece of one shard) at a time, so memory stays at one block."""
        if not self.streamed:
            for i in range(0, len(self), rows):
                yield {"sample_id": self.sample_ids[i : i + rows], "image": np.asarray(self.images[i : i + rows])}
            return
        from simreg.orchestrator.pack import PackedRows, read_packed_rows  # pack imports this module

        packed = self.images
        assert isinstance(packed, PackedRows)
        for shard, ids in packed.chunks(rows):
            got = read_packed_rows(shard, ids, packed.store_size)
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


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}. Re-download it or reinstall dataset-fashion-mnist") from e
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DataError(f"{str(path)!r} is not a uint8 IDX file: check data.root points at Fashion-MNIST's IDX files")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{str(path)!r} is truncated ({arr.size} of {int(np.prod(dims))} values): re-download it")
    return arr.reshape(dims)


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
    if all(_find_idx(DEBIAN_FMNIST, n[:-3]) for n in FMNIST_FILES):
        return DEBIAN_FMNIST
    cache = Path(os.environ.get("SIMREG_DATA_CACHE", Path.home() / ".cache" / "simreg")) / "fashion-mnist"
    if all(_find_idx(cache, n[:-3]) for n in FMNIST_FILES):
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


def is_image_file(p: Path) -> bool:
    """An image by its suffix (what an ImageFolder tree holds); a folder named ``x.png`` is not one."""
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()


def open_rgb(src: Path | bytes) -> tuple[Any, str]:
    """(the image fully decoded and converted to RGB, its original mode) from a file or its bytes.
    PIL's own errors propagate: the pre-scan of ``simreg data pack`` sorts them into its categories."""
    from PIL import Image

    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as f:
        f.load()  # the whole file now, so a truncated one fails here (unless ImageFile.LOAD_TRUNCATED_IMAGES)
        return f.convert("RGB"), f.mode


def decode_image(src: Path | bytes, size: int, name: str = "", fix: str = "Remove or replace the file") -> np.ndarray:
    """uint8 (size, size, 3) RGB: the centre square, bilinear-resized, from a file or its encoded bytes
    (a packed row; ``name`` says which in errors). The one decode of image-folder and packed sources."""
    from PIL import Image

    try:
        rgb, _ = open_rgb(src)
        w, h = rgb.size
        s = min(w, h)  # center square, then resize: every stored image has one shape
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return np.asarray(rgb.crop(box).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except Exception as e:
        what = name or (str(src) if isinstance(src, Path) else f"<{len(src)} encoded bytes>")
        raise DataError(f"cannot decode image {what!r}: {e}. {fix}") from e


def load_image_folder(root: Path, store_size: int, classes: list[str] | None = None) -> ImageSet:
    """An ImageFolder tree (one subfolder per class), decoded to RGB and stored at ``store_size`` px."""
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist: set data.root to a folder of class subfolders")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if classes is None:
        classes = [d.name for d in class_dirs]
    files: list[tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        d = root / c
        if d.is_dir():
            files += [(p, ci) for p in sorted(d.rglob("*")) if is_image_file(p)]
    if not files:
        raise DataError(
            f"image folder {str(root)!r} holds no images (looked for {sorted(IMAGE_SUFFIXES)} inside class "
            "subfolders): the layout is ROOT/<class>/<image>"
        )
    images = np.stack([decode_image(p, store_size) for p, _ in files])
    labels = np.array([c for _, c in files], dtype=np.int64)
    return ImageSet(
        images, labels, np.arange(len(files), dtype=np.int64), classes, f"image-folder:{root}", content_fingerprint(images, labels)
    )


def split_dirs(base: Path) -> tuple[str, str] | None:
    """(train, held-out) subfolder names when ``base`` holds a given split (train/ + val/ or test/)."""
    for train_name, val_name in SPLIT_LAYOUTS:
        if (base / train_name).is_dir() and (base / val_name).is_dir():
            return train_name, val_name
    return None


def holdout_split(full: ImageSet, seed: int, holdout: float, where: str) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) of one split: a seeded random ``holdout`` share held out; ids and fingerprint kept."""
    if len(full) < 2:
        raise DataError(f"image folder {where!r} has {len(full)} image: at least 2 are needed for a held-out split")
    perm = np.random.default_rng(seed).permutation(len(full))
    n_val = max(1, int(round(holdout * len(full))))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return full.take(train_idx, "train"), full.take(val_idx, "holdout")


def load_splits(
    source: str, root: str | None, download: bool, store_size: int, seed: int, holdout: float, lazy: bool = False,
) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) splits of a source. ``lazy`` (packed sources only): nothing decoded yet, see
    ``ImageSet.materialized``."""
    if source == "fashion-mnist":
        r = fmnist_root(root, download)
        return load_fashion_mnist(r, "train"), load_fashion_mnist(r, "test")
    assert root is not None  # the config validator requires data.root for image-folder and packed
    base = Path(root).expanduser()
    if source == "packed":
        from simreg.orchestrator.pack import load_packed_splits  # pack imports this module

        return load_packed_splits(base, store_size, seed, holdout, lazy=lazy)
    names = split_dirs(base)
    if names is not None:
        train = load_image_folder(base / names[0], store_size)
        return train, load_image_folder(base / names[1], store_size, classes=train.classes)
    return holdout_split(load_image_folder(base, store_size), seed, holdout, str(base))
