"""The labelled image sources a run reads: ``fashion-mnist``, ``image-folder`` and ``packed``."""
from __future__ import annotations

from pathlib import Path

from simreg.orchestrator.data.fashion_mnist import fmnist_root, load_fashion_mnist
from simreg.orchestrator.data.image_folder import holdout_split, load_image_folder, split_dirs
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.packed import load_packed_splits


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
        return load_packed_splits(base, store_size, seed, holdout, lazy=lazy)
    names = split_dirs(base)
    if names is not None:
        train = load_image_folder(base / names[0], store_size)
        return train, load_image_folder(base / names[1], store_size, classes=train.classes)
    return holdout_split(load_image_folder(base, store_size), seed, holdout, str(base))
