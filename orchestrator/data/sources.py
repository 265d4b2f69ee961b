"""The seam for labelled image sources: a ``DataSource`` per ``data.source`` name, in one registry.

Built in: ``fashion-mnist`` (data/fashion_mnist.py), ``image-folder`` (data/image_folder.py), ``packed``
(data/packed.py) and ``synthetic`` (data/synthetic.py). A new source is one class in a module of this
package, registered with ``@register_source("name")`` and imported in ``data/__init__.py``;
``data.source=name`` then selects it in configs, sweeps and ``simreg eval --data``. Everything downstream
(the target cache, the Ray Data pipeline, evaluation) sees only the ``ImageSet`` it returns.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from simreg.models.errors import ConfigError
from simreg.orchestrator.data.imageset import ImageSet

if TYPE_CHECKING:
    from simreg.orchestrator.config import DataConfig


class DataSource:
    """A labelled image source. Subclass it, set nothing but what differs, register it.

    ``load`` returns (train, held-out) ``ImageSet``s. Their ``source_fingerprint`` must be a content hash
    of the split the sample ids index into (the target cache keys on it: two different splits must never
    share one); ``sample_ids`` are indices into that split. With ``stream`` a source may leave the train
    images in storage as a ``StreamedImages`` object (data/imageset.py): the Ray Data view stage then reads
    its pieces. ``needs_root``: the hint shown when ``data.root`` is missing (None: no root needed)."""

    name: ClassVar[str] = ""
    needs_root: ClassVar[str | None] = None

    def load(self, data: DataConfig, seed: int, *, stream: bool = False) -> tuple[ImageSet, ImageSet]:
        raise NotImplementedError

    @classmethod
    def detect(cls, path: Path) -> bool:
        """Whether ``simreg eval --data PATH`` should read ``path`` with this source (a folder no source
        claims is read as an image folder)."""
        return False


SOURCES: dict[str, type[DataSource]] = {}


def register_source(name: str) -> Callable[[type[DataSource]], type[DataSource]]:
    """Class decorator: ``@register_source("my-source")`` makes ``data.source=my-source`` valid."""

    def deco(cls: type[DataSource]) -> type[DataSource]:
        if name in SOURCES and SOURCES[name] is not cls:
            raise ValueError(f"data source {name!r} is registered twice ({SOURCES[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        SOURCES[name] = cls
        return cls

    return deco


def source_names() -> list[str]:
    return sorted(SOURCES)


def get_source(name: str) -> DataSource:
    if name not in SOURCES:
        raise ConfigError(f"data.source={name!r} is unknown: use one of {source_names()}")
    return SOURCES[name]()


def load_splits(data: DataConfig, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) of ``data.source``; the train images may stay in storage when ``data.stream``."""
    return get_source(data.source).load(data, seed, stream=data.stream)


def resolve_source(spec: str) -> tuple[str, str | None]:
    """``simreg eval --data SPEC``: a registered name that needs no root (``fashion-mnist``), or a path that
    a source recognises (a pack has a manifest); any other folder is read as an image folder."""
    if spec in SOURCES and SOURCES[spec].needs_root is None:
        return spec, None
    if "://" in spec:  # an object-store URI: only packs are read from there (an image folder: pack it first)
        return "packed", spec
    path = Path(spec).expanduser()
    for name in source_names():
        if SOURCES[name].detect(path):
            return name, spec
    return "image-folder", spec
