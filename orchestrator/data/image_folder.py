"""ImageFolder trees (``ROOT/<class>/<image>``, or ``ROOT/train`` + ``ROOT/val``): decoded to RGB, centre
square, resized to ``data.store_size``; the one decode that packed sources share.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simreg.models.errors import DataError
from simreg.orchestrator.data.imageset import ImageSet, content_fingerprint
from simreg.orchestrator.data.sources import DataSource, register_source

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

if TYPE_CHECKING:
    from simreg.orchestrator.config import DataConfig


SPLIT_LAYOUTS = (("train", "val"), ("train", "test"))  # ROOT/train + ROOT/val (or test): a given held-out split


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


@register_source("image-folder")
class ImageFolderSource(DataSource):
    """``ROOT/<class>/<image>`` (a seeded ``data.holdout_fraction`` held out) or ``ROOT/train`` + ``ROOT/val``."""

    needs_root = "data.source=image-folder needs data.root=/path/to/folder (one subfolder per class)"

    def load(self, data: DataConfig, seed: int, *, stream: bool = False) -> tuple[ImageSet, ImageSet]:
        assert data.root is not None  # needs_root: the config refuses a missing root
        base = Path(data.root).expanduser()
        names = split_dirs(base)
        if names is not None:
            train = load_image_folder(base / names[0], data.store_size)
            return train, load_image_folder(base / names[1], data.store_size, classes=train.classes)
        return holdout_split(load_image_folder(base, data.store_size), seed, data.holdout_fraction, str(base))
