"""Your own images at scale: an ImageFolder tree -> Parquet shards of encoded images, after a pre-scan.

    simreg data scan ~/images                     # count corrupt, truncated, unreadable files, modes, empty classes
    simreg data pack ~/images ~/packs/images      # OUT/<split>/part-00000.parquet ... + OUT/manifest.json
    simreg distill data.source=packed data.root=~/packs/images

The pre-scan reads and fully decodes every file once (PIL, with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off).
Files that fail are counted and reported, and left out of the pack (``strict``: the pack fails naming
them), so every packed row decodes: the rows of a split are settled before any training starts and no
rank ever skips a sample on its own. Grayscale, RGBA, CMYK and palette images are counted per mode;
they are converted to RGB on decode, as ``load_image_folder`` does.

A row: ``sample_id`` int64 (0..n-1 per split, in the ImageFolder's class-then-sorted-path order: a clean
folder gets the ids ``load_image_folder`` gives it), ``label`` int64, ``image`` binary (the file's bytes
as encoded), ``path`` (relative to the split root) and ``mode`` (PIL's, before the RGB conversion).
Shards and the manifest are written to a temporary name and renamed; the manifest goes last, so a
folder without one is no pack. Pure numpy/pyarrow/PIL: Ray only in ``read_packed_dataset``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simreg.models.errors import DataError
from simreg.orchestrator.cache import write_atomic
from simreg.orchestrator.data import ImageSet, decode_image, holdout_split, is_image_file, open_rgb, split_dirs

log = logging.getLogger("simreg")
PACK_FORMAT = "simreg-pack"
PACK_VERSION = 1
MANIFEST = "manifest.json"
ALL_SPLIT = "all"  # a folder without train/ + val/: one split, the held-out share is drawn at load time
BAD_KINDS = ("corrupt", "truncated", "unreadable")
SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("label", pa.int64()), ("image", pa.binary()), ("path", pa.string()), ("mode", pa.string()),
])
_CHUNK = 4096  # files in flight per thread-pool round: bounded memory on folders of millions


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------- the pre-scan


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


# ---------------------------------------------------------------- packing


def _row_digest(h: Any, sample_id: int, label: int, image_sha256: bytes) -> None:
    """The content fingerprint of a split: sha256 over (id, label, sha256 of the encoded image) per row,
    independent of shard size, pyarrow version and file names, so re-packing the same folder keeps it."""
    h.update(struct.pack("<qq", sample_id, label))
    h.update(image_sha256)


def _check_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    if out == src or src in out.parents:
        raise DataError(f"output folder {str(out)!r} is inside the image folder {str(src)!r}: it would be read as a "
                        "class folder; choose an OUT_DIR outside it")
    if out.exists() and not out.is_dir():
        raise DataError(f"output {str(out)!r} is a file: give a folder for the pack")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output folder {str(out)!r} is not empty: choose a new or empty folder, or pass --overwrite "
                        "(overwrite=True) to replace the pack there")


def _remove_old_pack(out: Path) -> None:
    """Only what a pack writes: the manifest first (a reader then finds no pack, never a half-replaced
    one), then the shards and temporaries of each split folder. Other files are left alone."""
    (out / MANIFEST).unlink(missing_ok=True)
    for d in (p for p in out.iterdir() if p.is_dir()):
        for p in [*d.glob("part-*.parquet"), *d.glob(".tmp-*")]:
            p.unlink()
        if not any(d.iterdir()):
            d.rmdir()


def _read_scanned(split_root: Path, im: ScannedImage) -> bytes:
    p = split_root / im.path
    again = "leave the folder alone while packing and run `simreg data pack` again (with --overwrite)"
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"{str(p)!r} became unreadable between the pre-scan and packing ({e}): {again}") from e
    if hashlib.sha256(data).hexdigest() != im.sha256:
        raise DataError(f"{str(p)!r} changed between the pre-scan and packing: {again}")
    return data


def _write_split(sc: SplitScan, dest: Path, shard_rows: int, pool: ThreadPoolExecutor) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    shards: list[str] = []
    nbytes = 0
    read = functools.partial(_read_scanned, sc.root)
    for k, start in enumerate(range(0, len(sc.images), shard_rows)):
        rows = sc.images[start : start + shard_rows]
        blobs = list(pool.map(read, rows))
        ids = np.arange(start, start + len(rows), dtype=np.int64)
        for sid, im in zip(ids.tolist(), rows, strict=True):
            _row_digest(h, sid, im.label, bytes.fromhex(im.sha256))
        table = pa.table({
            "sample_id": ids, "label": np.array([im.label for im in rows], np.int64), "image": blobs,
            "path": [im.path for im in rows], "mode": [im.mode for im in rows],
        }, schema=SCHEMA)
        name = f"part-{k:05d}.parquet"
        # Encoded images do not compress further: only the small columns are.
        write_atomic(dest / name, functools.partial(pq.write_table, table, compression={
            "sample_id": "zstd", "label": "zstd", "image": "none", "path": "zstd", "mode": "zstd"}))
        shards.append(name)
        nbytes += (dest / name).stat().st_size
    return {"rows": len(sc.images), "shards": shards, "bytes": nbytes, "fingerprint": h.hexdigest(),
            "class_counts": sc.class_counts}


def _strict_message(report: ScanReport) -> str:
    bad = report.bad
    listed = "; ".join(f"{b.split}/{b.path} ({b.kind}: {b.reason})" for b in bad[:10])
    more = f"; and {len(bad) - 10} more (`simreg data scan {report.root}` lists them all)" if len(bad) > 10 else ""
    return (f"{len(bad)} bad image file(s) in {report.root}: {listed}{more}. Remove or replace them, or drop --strict "
            "(strict=False) to leave them out of the pack")


def pack_image_folder(
    src: str | Path, out_dir: str | Path, *, strict: bool = False, shard_rows: int = 1024, overwrite: bool = False,
    workers: int | None = None, on_scan: Callable[[ScanReport], Any] | None = None,
) -> dict[str, Any]:
    """Pre-scan ``src`` (``scan_image_folder``; ``on_scan`` sees the report first), then write
    ``OUT/<split>/part-NNNNN.parquet`` of at most ``shard_rows`` rows and ``OUT/manifest.json``; returns
    the manifest. Bad files are left out and reported (``strict``: a DataError naming them). Empty class
    folders keep their class (labels stay stable); a split without any decodable image is an error."""
    src, out = Path(src).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if shard_rows < 1:
        raise DataError(f"shard_rows={shard_rows} must be >= 1 (--shard-rows)")
    _check_out_dir(src, out, overwrite)
    report = scan_image_folder(src, workers=workers)
    if on_scan is not None:
        on_scan(report)
    if strict and report.bad:
        raise DataError(_strict_message(report))
    if not report.classes:
        raise DataError(f"image folder {str(src)!r} has no class subfolders: the layout is ROOT/<class>/<image> "
                        "(or ROOT/train/<class>/<image> + ROOT/val/<class>/<image>)")
    for sc in report.splits.values():
        if not sc.images:
            raise DataError(f"{'split ' + repr(sc.name) + ' of ' if report.held_out else ''}image folder {str(sc.root)!r} "
                            f"holds no decodable image ({sc.files} image file(s), {len(sc.bad)} bad; looked for "
                            "image suffixes inside class subfolders): the layout is ROOT/<class>/<image>")
    if report.bad:
        log.warning("data pack: %d bad file(s) left out of the pack (%s)", len(report.bad), report.summary())
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_pack(out)
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        splits = {n: _write_split(sc, out / n, shard_rows, pool) for n, sc in report.splits.items()}
    manifest = {
        "format": PACK_FORMAT, "version": PACK_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": str(src), "classes": report.classes, "train": next(iter(splits)), "held_out": report.held_out,
        "shard_rows": shard_rows, "splits": splits, "scan": report.to_dict(),
    }
    write_atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest


def manifest_summary(manifest: Mapping[str, Any], root: str | Path) -> str:
    head = ("split", "rows", "shards", "MiB", "fingerprint")
    body = [(n, str(s["rows"]), str(len(s["shards"])), f"{s['bytes'] / 2**20:.1f}", s["fingerprint"][:16])
            for n, s in manifest["splits"].items()]
    held = (f"held-out split: {manifest['held_out']}" if manifest["held_out"]
            else f"held-out split: drawn from '{ALL_SPLIT}' at load (data.holdout_fraction)")
    return f"pack {root}: {len(manifest['classes'])} classes, {held}\n" + _columns(head, body)


# ---------------------------------------------------------------- loading


def read_manifest(root: str | Path) -> dict[str, Any]:
    root = Path(root).expanduser()
    path = root / MANIFEST
    repack = f"`simreg data pack IMAGE_FOLDER {root} --overwrite`"
    if not path.is_file():
        raise DataError(f"{str(root)!r} has no {MANIFEST}: it is not a packed dataset, or its packing did not finish. "
                        f"Run `simreg data pack IMAGE_FOLDER {root}` first (or use data.source=image-folder for a plain folder)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {str(path)!r}: {e}. Re-pack with {repack}") from e
    if not isinstance(m, dict) or m.get("format") != PACK_FORMAT or m.get("version") != PACK_VERSION:
        got = (m.get("format"), m.get("version")) if isinstance(m, dict) else (None, None)
        raise DataError(f"{str(path)!r} is format {got[0]!r} version {got[1]!r}; this simreg reads {PACK_FORMAT!r} "
                        f"version {PACK_VERSION}: re-pack with {repack}")
    missing = [k for k in ("classes", "train", "held_out", "splits") if k not in m]
    if missing:
        raise DataError(f"{str(path)!r} lacks {missing}: the manifest is damaged; re-pack with {repack}")
    return m


def shard_paths(root: str | Path, manifest: Mapping[str, Any], split: str) -> list[Path]:
    root = Path(root).expanduser()
    if split not in manifest["splits"]:
        raise DataError(f"pack {str(root)!r} has no split {split!r}: it has {sorted(manifest['splits'])}")
    paths = [root / split / s for s in manifest["splits"][split]["shards"]]
    for p in paths:
        if not p.is_file():
            raise DataError(f"shard {str(p)!r} listed in {str(root / MANIFEST)!r} is missing: the pack is incomplete; copy "
                            f"the whole folder again or re-pack with `simreg data pack IMAGE_FOLDER {root} --overwrite`")
    return paths


def _decode_into(pool: ThreadPoolExecutor, blobs: list[bytes], names: list[str], size: int, out: np.ndarray) -> None:
    fix = "The pack is damaged: re-pack with `simreg data pack --overwrite`"
    for i, img in enumerate(pool.map(lambda j: decode_image(blobs[j], size, names[j], fix), range(len(blobs)))):
        out[i] = img


def load_packed_split(root: str | Path, split: str, store_size: int, *, workers: int | None = None,
                      manifest: Mapping[str, Any] | None = None) -> ImageSet:
    """One split of a pack decoded into memory: uint8 (N, S, S, 3), the pack's labels and sample ids. The
    rows are checked against the manifest's fingerprint, which (with ``store_size``) keys the target cache."""
    root = Path(root).expanduser()
    m = manifest if manifest is not None else read_manifest(root)
    paths = shard_paths(root, m, split)
    info = m["splits"][split]
    n, n_classes = int(info["rows"]), len(m["classes"])
    images = np.empty((n, store_size, store_size, 3), np.uint8)  # (N, S, S, 3)
    labels, ids = np.empty(n, np.int64), np.empty(n, np.int64)
    h, pos = hashlib.sha256(), 0
    damaged = f"re-pack with `simreg data pack IMAGE_FOLDER {root} --overwrite`"
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for p in paths:
            try:
                t = pq.read_table(p, columns=["sample_id", "label", "image", "path"])
            except Exception as e:
                raise DataError(f"cannot read shard {str(p)!r}: {e}. The pack is damaged: {damaged}") from e
            k = t.num_rows
            if pos + k > n:
                raise DataError(f"shard {str(p)!r} holds more rows than {MANIFEST} says ({n}): {damaged}")
            ids[pos : pos + k] = t["sample_id"].to_numpy()
            labels[pos : pos + k] = t["label"].to_numpy()
            blobs = t["image"].to_pylist()
            for sid, lab, b in zip(ids[pos : pos + k].tolist(), labels[pos : pos + k].tolist(), blobs, strict=True):
                _row_digest(h, sid, lab, hashlib.sha256(b).digest())
            names = [f"{p}: {q}" for q in t["path"].to_pylist()]
            _decode_into(pool, blobs, names, store_size, images[pos : pos + k])
            pos += k
    if pos != n or not np.array_equal(ids, np.arange(n)) or (n and not 0 <= labels.min() <= labels.max() < n_classes):
        raise DataError(f"split {split!r} of pack {str(root)!r} does not hold ids 0..{n - 1} with labels of its "
                        f"{n_classes} classes: the pack is damaged; {damaged}")
    if h.hexdigest() != info["fingerprint"]:
        raise DataError(f"split {split!r} of pack {str(root)!r} does not match the fingerprint in its {MANIFEST}: a shard "
                        f"was changed or replaced; {damaged}")
    return ImageSet(images, labels, ids, list(m["classes"]), f"packed:{root}/{split}", _cache_fingerprint(info, store_size))


def load_packed_splits(root: str | Path, store_size: int, seed: int, holdout: float,
                       *, workers: int | None = None, lazy: bool = False) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) of a pack: its given held-out split (val/test), or a seeded ``holdout`` share of
    its single split, drawn as ``load_splits`` draws it for an image folder. ``lazy``: images are
    ``PackedRows`` (labels and ids read, nothing decoded until asked; subsets stay lazy)."""
    root = Path(root).expanduser()
    m = read_manifest(root)
    load = index_packed_split if lazy else functools.partial(load_packed_split, workers=workers)
    train = load(root, m["train"], store_size, manifest=m)
    if m["held_out"]:
        return train, load(root, m["held_out"], store_size, manifest=m)
    return holdout_split(train, seed, holdout, str(root))


def _cache_fingerprint(info: Mapping[str, Any], store_size: int) -> str:
    # The cache keys on this: targets depend on the decoded pixels, so on store_size as well as the bytes.
    return hashlib.sha256(f"{info['fingerprint']}:{store_size}:center-crop-bilinear".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PackedRows:
    """Rows of one pack split as a lazy uint8 (N, S, S, 3) array: indexing selects rows without decoding,
    ``np.asarray`` decodes just those rows, ``chunks`` plans a streamed read (shard, ids) for Ray Data."""

    root: str
    split: str
    store_size: int
    shards: tuple[str, ...]
    shard_of: np.ndarray  # split row (= sample id) -> index into shards
    rows: np.ndarray  # the selected sample ids, in order

    dtype = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.store_size, self.store_size, 3)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: Any) -> PackedRows:
        return PackedRows(self.root, self.split, self.store_size, self.shards, self.shard_of, np.atleast_1d(self.rows[idx]))

    def chunks(self, rows_per_chunk: int) -> list[tuple[str, np.ndarray]]:
        """(shard path, sorted ids) pieces of at most ``rows_per_chunk`` rows, each within one shard."""
        out: list[tuple[str, np.ndarray]] = []
        ids = np.sort(self.rows)
        owner = self.shard_of[ids]
        for k in np.unique(owner):
            mine = ids[owner == k]
            out += [(self.shards[k], mine[i : i + rows_per_chunk]) for i in range(0, len(mine), rows_per_chunk)]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, np.uint8)
        where = {int(sid): i for i, sid in enumerate(self.rows)}
        for shard, ids in self.chunks(4096):
            got = read_packed_rows(shard, ids, self.store_size)
            out[[where[int(s)] for s in got["sample_id"]]] = got["image"]
        return out if dtype is None else out.astype(dtype)


def index_packed_split(root: str | Path, split: str, store_size: int, *, manifest: Mapping[str, Any] | None = None) -> ImageSet:
    """One split of a pack without decoding: its labels and ids (the small columns only) and lazy
    ``PackedRows`` images. Nothing is verified against the fingerprint here (that needs every image's
    bytes; ``load_packed_split`` does it); a decode error names the shard and the file."""
    root = Path(root).expanduser()
    m = manifest if manifest is not None else read_manifest(root)
    paths = shard_paths(root, m, split)
    info = m["splits"][split]
    n = int(info["rows"])
    labels, ids, shard_of = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    pos = 0
    for k, p in enumerate(paths):
        try:
            t = pq.read_table(p, columns=["sample_id", "label"])
        except Exception as e:
            raise DataError(f"cannot read shard {str(p)!r}: {e}. The pack is damaged: re-pack with "
                            f"`simreg data pack IMAGE_FOLDER {root} --overwrite`") from e
        k_rows = t.num_rows
        if pos + k_rows > n:
            raise DataError(f"shard {str(p)!r} holds more rows than {MANIFEST} says ({n}): re-pack the folder")
        ids[pos : pos + k_rows], labels[pos : pos + k_rows] = t["sample_id"].to_numpy(), t["label"].to_numpy()
        shard_of[pos : pos + k_rows] = k
        pos += k_rows
    if pos != n or not np.array_equal(ids, np.arange(n)):
        raise DataError(f"split {split!r} of pack {str(root)!r} does not hold ids 0..{n - 1}: re-pack the folder")
    rows = PackedRows(str(root), split, store_size, tuple(str(p) for p in paths), shard_of, ids.copy())
    return ImageSet(rows, labels, ids, list(m["classes"]), f"packed:{root}/{split}", _cache_fingerprint(info, store_size))


def read_packed_rows(shard: str, ids: np.ndarray, store_size: int) -> dict[str, np.ndarray]:
    """Rows ``ids`` of one shard, decoded: {sample_id, label, image uint8 (B, S, S, 3)} in shard order.
    Reads only the row groups that can hold them (the ids are sorted within a shard)."""
    try:
        t = pq.read_table(shard, columns=["sample_id", "label", "image", "path"],
                          filters=[("sample_id", ">=", int(ids.min())), ("sample_id", "<=", int(ids.max()))])
    except Exception as e:
        raise DataError(f"cannot read shard {shard!r}: {e}. The pack is damaged: re-pack with `simreg data pack --overwrite`") from e
    keep = np.isin(t["sample_id"].to_numpy(), ids)
    t = t.filter(pa.array(keep))
    if t.num_rows != len(ids):
        raise DataError(f"shard {shard!r} lacks {len(ids) - t.num_rows} of the rows asked for: re-pack with `simreg data pack --overwrite`")
    return decode_batch({k: t[k].to_numpy(zero_copy_only=False) for k in ("sample_id", "label", "image", "path")}, store_size)


def decode_batch(batch: dict[str, np.ndarray], store_size: int) -> dict[str, np.ndarray]:
    """Packed rows -> {sample_id (B,), label (B,), image uint8 (B, S, S, 3)}: the decode stage of
    ``read_packed_dataset``, the same decode as ``load_packed_split``."""
    fix = "The pack is damaged: re-pack with `simreg data pack --overwrite`"
    imgs = [decode_image(bytes(b), store_size, str(p), fix) for b, p in zip(batch["image"], batch["path"], strict=True)]
    return {
        "sample_id": np.asarray(batch["sample_id"], np.int64), "label": np.asarray(batch["label"], np.int64),
        "image": np.stack(imgs) if imgs else np.empty((0, store_size, store_size, 3), np.uint8),
    }


_REMOTE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "label_selector", "accelerator_type", "runtime_env")


def read_packed_dataset(root: str | Path, split: str | None = None, *, store_size: int = 96, batch_size: int = 256,
                        ray_remote_args: Mapping[str, Any] | None = None) -> Any:
    """A Ray Data Dataset streaming one split (default: the train split) of a pack: parquet read tasks over
    its shards, then a decode stage (``decode_batch``) -> rows {sample_id, label, image uint8 (S, S, 3)}.
    ``ray_remote_args`` (default ``{"num_cpus": 1}``, Ray's own) go to both stages: beside training on a
    small cluster give them less, e.g. 0.25 CPU, or Ray Data waits for CPUs that training holds. Row order
    is not kept across shards (sort by sample_id)."""
    import ray.data

    args = dict(ray_remote_args) if ray_remote_args is not None else {"num_cpus": 1}
    unknown = sorted(set(args) - set(_REMOTE_KEYS))
    if unknown:
        raise DataError(f"ray_remote_args {unknown} not supported here: use {list(_REMOTE_KEYS)}")
    root = Path(root).expanduser()
    m = read_manifest(root)
    split = split or m["train"]
    files = [str(p) for p in shard_paths(root, m, split)]
    ds = ray.data.read_parquet(files, **args).select_columns(["sample_id", "label", "image", "path"])
    return ds.map_batches(functools.partial(decode_batch, store_size=store_size), batch_format="numpy",
                          batch_size=batch_size, **args)
