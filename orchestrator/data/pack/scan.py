"""The pre-scan of `simreg data scan|pack`: every file of an ImageFolder tree read and decoded once, sorted.

    simreg data scan ~/images                     # count corrupt, truncated, unreadable files, modes, empty classes
    simreg data pack ~/images ~/packs/images      # OUT/<split>/part-00000.parquet ... + OUT/manifest.json
    simreg distill data.source=packed data.root=~/packs/images

The pre-scan reads and fully decodes every file once (PIL, with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off).
Files that fail are counted and reported, and left out of the pack (``strict``: the pack fails naming
them), so every packed row decodes: the rows of a split are settled before any training starts and no
rank ever skips a sample on its own. Grayscale, RGBA, CMYK and palette images are counted per mode;
they are converted to RGB on decode, as ``load_image_folder`` does.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simreg.models.errors import DataError
from simreg.orchestrator.data.image_folder import is_image_file, open_rgb, split_dirs
from simreg.orchestrator.data.pack.format import ALL_SPLIT

BAD_KINDS = ("corrupt", "truncated", "unreadable")


_CHUNK = 4096  # files in flight per thread-pool round: bounded memory on folders of millions


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class BadFile:
    split: str
    path: str  # relative to the split root
    kind: str  # corrupt | truncated | unreadable
    reason: str


@dataclass(frozen=True)
class ScannedImage:
    """A file that decoded: what packing needs, and the sha256 that proves it packs the bytes scanned."""

    path: str
    label: int
    mode: str
    sha256: str


@dataclass
class SplitScan:
    """One split's scan: its decodable images (what a pack holds) and its bad files."""

    name: str
    root: Path
    classes: list[str]
    images: list[ScannedImage] = field(default_factory=list, repr=False)  # decodable, in sample-id order
    bad: list[BadFile] = field(default_factory=list)
    ignored: int = 0  # files in class folders without an image suffix (.txt, .heic, ...): never read
    unknown_classes: list[str] = field(default_factory=list)  # held-out class folders train/ lacks: not packed

    @property
    def files(self) -> int:
        return len(self.images) + len(self.bad)

    @property
    def modes(self) -> dict[str, int]:
        return dict(sorted(Counter(i.mode for i in self.images).items()))

    @property
    def class_counts(self) -> list[int]:
        n = [0] * len(self.classes)
        for i in self.images:
            n[i.label] += 1
        return n

    @property
    def empty_classes(self) -> list[str]:
        """Classes with no decodable image here (an empty or absent folder, or only bad files)."""
        return [c for c, n in zip(self.classes, self.class_counts, strict=True) if n == 0]

    def counts(self) -> dict[str, int]:
        kinds = Counter(b.kind for b in self.bad)
        return {"files": self.files, "ok": len(self.images), **{k: kinds[k] for k in BAD_KINDS},
                "empty_classes": len(self.empty_classes), "ignored": self.ignored}


@dataclass
class ScanReport:
    """What ``scan_image_folder`` found, per split; ``table()`` prints it, ``to_dict()`` goes in the manifest."""

    root: Path
    classes: list[str]
    held_out: str | None  # the given held-out split (val or test); None: one split, ALL_SPLIT
    splits: dict[str, SplitScan]
    seconds: float = 0.0

    @property
    def bad(self) -> list[BadFile]:
        return [b for s in self.splits.values() for b in s.bad]

    @property
    def modes(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.splits.values():
            total.update(s.modes)
        return dict(sorted(total.items()))

    def counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.splits.values():
            total.update(s.counts())
        return {k: total[k] for k in ("files", "ok", *BAD_KINDS, "empty_classes", "ignored")}

    @property
    def clean(self) -> bool:
        """No bad file and every split holds images (empty class folders are reported, not errors)."""
        return not self.bad and all(s.images for s in self.splits.values())

    def summary(self) -> str:
        c = self.counts()
        bad = ", ".join(f"{c[k]} {k}" for k in BAD_KINDS)
        return (f"{c['files']} image files in {self.root}: {c['ok']} decodable, {bad}; "
                f"{c['empty_classes']} empty class folder(s) of {len(self.classes)} classes")

    def table(self, max_bad: int = 50) -> str:
        layout = f"train split {next(iter(self.splits))}/ + held-out {self.held_out}/" if self.held_out else (
            f"one split ({ALL_SPLIT}: the held-out share is drawn at load, data.holdout_fraction)")
        head = ("split", "files", "ok", *BAD_KINDS, "empty classes", "ignored")
        body = [(s.name, *(str(v) for v in s.counts().values())) for s in self.splits.values()]
        lines = [f"image folder {self.root}: {len(self.classes)} classes, {layout}; scanned in {self.seconds:.1f} s",
                 _columns(head, body)]
        if self.modes:
            modes = ", ".join(f"{m} {n}" for m, n in self.modes.items())
            lines.append(f"image modes (converted to RGB on decode): {modes}")
        for s in self.splits.values():
            if s.empty_classes:
                lines.append(f"{s.name}: no decodable image of class(es) {', '.join(s.empty_classes)} (kept in the class list)")
            if s.unknown_classes:
                lines.append(f"{s.name}: class folder(s) {', '.join(s.unknown_classes)} are not in the train split: not packed")
        bad = self.bad
        if bad:
            lines.append(f"bad files ({len(bad)}; left out of a pack, `simreg data pack --strict` fails on them):")
            lines += [f"  {b.split}/{b.path}  {b.kind}: {b.reason}" for b in bad[:max_bad]]
            if len(bad) > max_bad:
                lines.append(f"  ... and {len(bad) - max_bad} more (all of them in the manifest's scan.bad)")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, without the per-image list (the pack holds it)."""
        return {
            "root": str(self.root), "classes": self.classes, "held_out": self.held_out, "seconds": round(self.seconds, 3),
            "counts": self.counts(), "modes": self.modes,
            "splits": {n: {**s.counts(), "modes": s.modes, "class_counts": s.class_counts, "empty_classes": s.empty_classes,
                           "unknown_classes": s.unknown_classes} for n, s in self.splits.items()},
            "bad": [asdict(b) for b in self.bad],
        }


def _columns(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    w = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in (head, *body))


@contextmanager
def _truncated_images_fail() -> Iterator[None]:
    """PIL decodes a truncated file without error when some library set LOAD_TRUNCATED_IMAGES: not here."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def check_image(path: Path) -> tuple[str, str, str]:
    """(kind, mode, sha256 or reason): kind ``ok`` with the file's mode and the sha256 of its bytes, or
    ``unreadable`` (reading failed), ``truncated`` or ``corrupt`` (decoding failed) with the reason."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return "unreadable", "", f"{type(e).__name__}: {e.strerror or e}"
    from PIL import UnidentifiedImageError

    try:
        _, mode = open_rgb(data)
    except UnidentifiedImageError:
        return "corrupt", "", "not an image (PIL identifies no format in it)" if data else "empty file"
    except EOFError as e:
        return "truncated", "", f"ends early (EOFError: {e})"
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        if "truncated" in str(e).lower():
            return "truncated", "", str(e)
        return "corrupt", "", f"{type(e).__name__}: {e}"
    return "ok", mode, hashlib.sha256(data).hexdigest()


def _in_chunks(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
    for start in range(0, len(items), _CHUNK):
        yield from pool.map(fn, items[start : start + _CHUNK])


def _scan_split(name: str, split_root: Path, classes: list[str], pool: ThreadPoolExecutor, check_classes: bool) -> SplitScan:
    sc = SplitScan(name, split_root, classes)
    if check_classes:
        known = set(classes)
        sc.unknown_classes = sorted(d.name for d in split_root.iterdir() if d.is_dir() and d.name not in known)
    files: list[tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        d = split_root / c
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):  # the order (and the filter) of load_image_folder
            if is_image_file(p):
                files.append((p, ci))
            elif p.is_file():
                sc.ignored += 1
    for (p, ci), (kind, mode, info) in zip(files, _in_chunks(pool, check_image, [p for p, _ in files]), strict=True):
        rel = p.relative_to(split_root).as_posix()
        if kind == "ok":
            sc.images.append(ScannedImage(rel, ci, mode, info))
        else:
            sc.bad.append(BadFile(name, rel, kind, info))
    return sc


def scan_image_folder(root: str | Path, *, workers: int | None = None) -> ScanReport:
    """Read and fully decode every image of an ImageFolder tree (ROOT/<class>/<image>, or ROOT/train +
    ROOT/val (or test) of such trees): counts per category, per mode, empty class folders, bad files."""
    t0 = time.perf_counter()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist: give a folder of class subfolders (ROOT/<class>/<image>)")
    names = split_dirs(root)
    layout = [(names[0], root / names[0]), (names[1], root / names[1])] if names else [(ALL_SPLIT, root)]
    classes = sorted(d.name for d in layout[0][1].iterdir() if d.is_dir())
    with _truncated_images_fail(), ThreadPoolExecutor(workers or default_workers()) as pool:
        splits = {n: _scan_split(n, d, classes, pool, check_classes=i > 0) for i, (n, d) in enumerate(layout)}
    return ScanReport(root, classes, names[1] if names else None, splits, time.perf_counter() - t0)
