"""``data.source=synthetic``: labelled images generated from (seed, index) on demand, never all in memory.

    simreg distill data.source=synthetic data.synthetic.images=1000000 data.store_size=32 data.train_size=null
    simreg config data.source=synthetic data.synthetic.classes=100 data.synthetic.channels=1

Each image is a windowed sinusoidal grating whose orientation (one sector of [0, pi) per class) and
frequency (2, 3.5 or 5 cycles per image, by class) carry the label, with a per-image phase, window position
and radius, colour, contrast and background, a class-free distracting grating of random orientation,
frequency and strength, and pixel noise. A 20-NN on raw pixels is well above chance but far from perfect,
so a teacher's k-NN and a student's gain mean something: 54.0% RGB, 61.9% grayscale, against 10% chance
(10 classes at 32 px, a bank of 2,000 train images, 1,000 held-out queries, cosine similarity;
``tests/unit/data/test_synthetic.py`` holds it between 2x chance and 90%).

Every number an image depends on comes from a counter-based hash of (generator seed, split, index): an image
does not depend on which other ids are rendered with it, nor on the process or machine. The rendering uses
only +, -, *, / and table look-ups in numpy (sines come from a table built with a polynomial), whose results
IEEE 754 fixes bit for bit, so every node of a cluster renders the same bytes (a libm ``sin`` may differ in
its last bit between CPUs). Change anything that alters an image and bump ``GENERATOR_VERSION``: the target
cache keys on it through ``source_fingerprint``.

Speed: 25,000-31,000 images/s of 32x32x3 over runs (one core, numpy, 256 per call; 60,000/s at 32x32x1,
2,900-3,000/s at 96x96x3), measured with ``.venv/bin/python -c "from simreg.orchestrator.data.synthetic import generation_rate as r; print(r(), r(20000, 32, 1), r(5000, 96))"``
on the 2-core development machine.

The train split is always lazy (``SyntheticRows``, streamed through the Ray Data view stage whatever
``data.stream`` says): a piece of a contiguous range is ``{gen, start, stop}``, a piece of a subset lists its
ids. Labels are computed for the whole split at once (an int64 per image). The held-out split uses a hash
stream of its own, so its images are disjoint from the train split's.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from simreg.models.errors import DataError
from simreg.orchestrator.data.imageset import ImageSet, ids_of, piece_ids
from simreg.orchestrator.data.sources import DataSource, register_source

if TYPE_CHECKING:
    from simreg.orchestrator.config import DataConfig

GENERATOR_VERSION = 1  # bump when any image or label of a (seed, split, index) changes
SPLITS = ("train", "held_out")

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # odd: ids -> ids * _GOLDEN is a bijection of uint64
_STREAM = 0xD1B54A32D192ED03  # the j-th draw of an image hashes key + (j + 1) * _STREAM
_SPLIT_SALT = (0x0, 0xA0761D6478BD642F)

# The look of the images (part of GENERATOR_VERSION's contract)
_TABLE = 1024  # entries of the sine table
_FREQS = (2.0, 3.5, 5.0)  # cycles per image of class c: _FREQS[c % 3], +-15% per image
_NOISE = 0.3  # triangular pixel noise in [-0.3, 0.3] (of the full range)
_DISTRACTOR = 1.0  # the class-free grating: up to this times the class grating's amplitude


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys(seed: int, split: int, ids: np.ndarray) -> np.ndarray:
    """One uint64 key per image of (seed, split, id)."""
    base = _mix64(_mix64(np.array([seed & _MASK], np.uint64)) ^ np.uint64(_SPLIT_SALT[split]))
    return _mix64(np.asarray(ids, np.int64).astype(np.uint64) * np.uint64(_GOLDEN) + base)


def _bits(keys: np.ndarray, j: int) -> np.ndarray:
    return _mix64(keys + np.uint64(((j + 1) * _STREAM) & _MASK))


def _uniform(keys: np.ndarray, j: int) -> np.ndarray:
    """The j-th draw of each image: float64 in [0, 1), 53 random bits."""
    return (_bits(keys, j) >> np.uint64(11)).astype(np.float64) * 2.0**-53


_SIN_TAYLOR = [(-1) ** k / math.factorial(2 * k + 1) for k in range(12)]  # sin y = y * sum_k c_k y^(2k)


def _sin(x: np.ndarray) -> np.ndarray:
    """sin on [-pi, pi] from its Taylor series to y^23 on [-pi/2, pi/2] (error far below float64's): + and * only, so the same bits on every
    CPU (numpy's ``np.sin`` may use a vendor's vectorised libm)."""
    y = np.where(x > math.pi / 2, math.pi - x, np.where(x < -math.pi / 2, -math.pi - x, x))  # |y| <= pi/2
    y2 = y * y
    p = np.full_like(y, _SIN_TAYLOR[-1])
    for c in reversed(_SIN_TAYLOR[:-1]):  # Horner in y^2
        p = p * y2 + c
    return p * y


def _sin_table() -> np.ndarray:
    t = np.arange(_TABLE, dtype=np.float64) / _TABLE  # one period: sin(2 pi t)
    return (-_sin(2 * math.pi * t - math.pi)).astype(np.float32)  # sin(a - pi) = -sin(a)


_SINE = _sin_table()


def _cos_sin(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of angles in (-pi/2, 3pi/2) with ``_sin`` only."""
    s = _sin(np.where(theta > math.pi, theta - 2 * math.pi, theta))
    c = _sin(np.where(theta + math.pi / 2 > math.pi, theta - 1.5 * math.pi, theta + math.pi / 2))
    return c, s


def _lowbias32(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


@functools.lru_cache(maxsize=8)
def _noise_texture(size: int, channels: int) -> np.ndarray:
    """A fixed periodic texture of triangular noise in [-1, 1) (times the noise level, in 0..255 units), side ``n``
    (a power of two >= 2 * size and >= 256), padded by ``size`` so that the ``size`` window at any offset below
    ``n`` is one slice: float32 (C, n + size, n + size). An image adds the window at its own random offset, a
    slice copy (a hash per pixel took 6 of the 15 ms that 256 images of 32x32x3 cost)."""
    n = max(256, 1 << (2 * size - 1).bit_length())
    h = _lowbias32(np.arange(channels * n * n, dtype=np.uint32) + np.uint32(0x2545F491))
    tex = ((h & np.uint32(0xFFFF)).astype(np.float32) + (h >> np.uint32(16)).astype(np.float32)) * np.float32(1 / 65536) - np.float32(1)
    tex = tex.reshape(channels, n, n) * np.float32(255 * _NOISE)
    tex = np.concatenate([tex, tex[:, :size]], 1)
    return np.ascontiguousarray(np.concatenate([tex, tex[:, :, :size]], 2))


def _grating(fx: np.ndarray, fy: np.ndarray, phase: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """sin(2 pi (fx x + fy y + phase)) on the pixel grid: float32 (B, S, S), from the sine table."""
    t = fx[:, None, None] * grid[None, None, :] + fy[:, None, None] * grid[None, :, None]  # (B, S, S), in cycles
    t += phase[:, None, None]
    t -= np.floor(t)
    t *= np.float32(_TABLE)
    return _SINE[t.astype(np.int32) & (_TABLE - 1)]


@dataclass(frozen=True)
class SyntheticGenerator:
    """The images and labels of one split of the synthetic source, as pure functions of the index."""

    seed: int
    split: int  # index into SPLITS: each split its own hash stream
    size: int
    channels: int
    classes: int

    @property
    def token(self) -> str:
        """The generator in a piece: version:seed:split:size:channels:classes."""
        return f"{GENERATOR_VERSION}:{self.seed}:{self.split}:{self.size}:{self.channels}:{self.classes}"

    @classmethod
    def from_token(cls, token: str) -> SyntheticGenerator:
        version, *rest = (int(x) for x in str(token).split(":"))
        if version != GENERATOR_VERSION:
            raise DataError(f"a synthetic piece was planned by generator version {version}, this process has {GENERATOR_VERSION}: "
                            "run the same simreg on every node of the cluster")
        return cls(*rest)

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """int64 (N,) labels, uniform over the classes (a hash modulo the class count)."""
        return (_bits(_keys(self.seed, self.split, ids), 0) % np.uint64(self.classes)).astype(np.int64)

    def images(self, ids: np.ndarray, batch: int = 256) -> np.ndarray:
        """uint8 (N, S, S, C), or (N, S, S) for one channel; rendered ``batch`` at a time (cache-sized)."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.size, self.size, self.channels), np.uint8)
        for i in range(0, len(ids), batch):
            out[i : i + batch] = self._render(ids[i : i + batch])
        return out[..., 0] if self.channels == 1 else out

    def _render(self, ids: np.ndarray) -> np.ndarray:
        S, C, K = self.size, self.channels, self.classes
        keys = _keys(self.seed, self.split, ids)
        label = (_bits(keys, 0) % np.uint64(K)).astype(np.int64)
        u = [_uniform(keys, j) for j in range(1, 21)]  # draw 0 is the label
        # the class grating: orientation in its class's sector, frequency by class
        theta = math.pi * (label + u[0] - 0.5) / K
        freq = np.asarray(_FREQS)[label % len(_FREQS)] * (1.0 + 0.15 * (2.0 * u[1] - 1.0))
        c, s = _cos_sin(theta)
        grid = (np.arange(S, dtype=np.float32) + np.float32(0.5)) / np.float32(S)  # pixel centres in [0, 1)
        wave = _grating((freq * c).astype(np.float32), (freq * s).astype(np.float32), u[2].astype(np.float32), grid)
        # ... seen through a window (centre in the middle half, radius 0.3-0.7 of the side): 1 - r^2 / radius^2, clipped at 0
        r2 = np.square(0.3 + 0.4 * u[5])
        dx = np.square(grid[None, :] - (0.25 + 0.5 * u[3]).astype(np.float32)[:, None]) / r2.astype(np.float32)[:, None]
        dy = np.square(grid[None, :] - (0.25 + 0.5 * u[4]).astype(np.float32)[:, None]) / r2.astype(np.float32)[:, None]
        window = np.float32(1) - (dy[:, :, None] + dx[:, None, :])  # (B, S, S)
        np.maximum(window, np.float32(0), out=window)
        wave *= window
        # a distracting grating over the whole image: any orientation, any frequency, its own colour
        c2, s2 = _cos_sin(math.pi * u[6])
        f2 = 1.5 + 4.5 * u[7]
        distractor = _grating((f2 * c2).astype(np.float32), (f2 * s2).astype(np.float32), u[8].astype(np.float32), grid)
        # colours, contrast, background (per channel for RGB)
        contrast = 255.0 * (0.25 + 0.2 * u[9])
        if C == 3:
            colour = np.stack(u[10:13], 1) * 0.7 + 0.3  # (B, 3)
            colour2 = np.stack(u[13:16], 1) * 0.7 + 0.3
        else:
            colour = colour2 = np.ones((len(ids), 1))
        amp = (contrast[:, None] * colour).astype(np.float32)[:, :, None, None]  # (B, C, 1, 1)
        amp2 = (contrast[:, None] * colour2 * (_DISTRACTOR * u[16])[:, None]).astype(np.float32)[:, :, None, None]
        # channels first while computing: a broadcast over a last axis of 3 ran at half the speed
        img = wave[:, None] * amp  # (B, C, S, S)
        img += distractor[:, None] * amp2
        img += (255.0 * (0.3 + 0.4 * u[17]) + 0.5).astype(np.float32)[:, None, None, None]  # background; +0.5: round
        tex = _noise_texture(S, C)
        period = tex.shape[1] - S
        oy, ox = (u[18] * period).astype(np.int64), (u[19] * period).astype(np.int64)
        for i in range(len(ids)):
            img[i] += tex[:, oy[i] : oy[i] + S, ox[i] : ox[i] + S]
        np.clip(img, 0, 255, out=img)
        return img.transpose(0, 2, 3, 1).astype(np.uint8)  # (B, S, S, C)


@dataclass(frozen=True)
class SyntheticRows:
    """Rows of one synthetic split as a lazy uint8 (N, S, S, C) array (``StreamedImages``): a contiguous
    range [start, stop) or explicit ``ids``. Indexing selects without rendering (a slice keeps a range);
    ``np.asarray`` renders just the selected rows; ``pieces`` are O(1) for a range."""

    gen: SyntheticGenerator
    start: int = 0
    stop: int = 0
    ids: np.ndarray | None = None  # when set, the selected ids in order (start/stop unused)

    dtype = np.dtype(np.uint8)

    def _ids(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64) if self.ids is None else self.ids

    @property
    def shape(self) -> tuple[int, ...]:
        s, c = self.gen.size, self.gen.channels
        return (len(self), s, s) if c == 1 else (len(self), s, s, c)

    def __len__(self) -> int:
        return self.stop - self.start if self.ids is None else len(self.ids)

    def __getitem__(self, idx: Any) -> SyntheticRows:
        if self.ids is None and isinstance(idx, slice):
            r = range(self.start, self.stop)[idx]
            if r.step == 1:
                return SyntheticRows(self.gen, r.start, max(r.start, r.stop))
        return SyntheticRows(self.gen, ids=np.atleast_1d(self._ids()[idx]))

    def pieces(self, rows: int) -> list[dict[str, Any]]:
        """{gen, start, stop} per ``rows`` of a range (O(1) each); {gen, ids as bytes} per ``rows`` sorted ids of a
        subset (``piece_ids``)."""
        if self.ids is None:
            return [{"gen": self.gen.token, "start": a, "stop": min(a + rows, self.stop)} for a in range(self.start, self.stop, rows)]
        ids = np.sort(self.ids)
        return [{"gen": self.gen.token, **piece_ids(ids[i : i + rows])} for i in range(0, len(ids), rows)]

    @staticmethod
    def read_piece(piece: dict[str, Any]) -> dict[str, np.ndarray]:
        """One piece, rendered: {sample_id, label, image uint8 (B, S, S, C) or (B, S, S)}."""
        gen = SyntheticGenerator.from_token(piece["gen"])
        ids = ids_of(piece)
        return {"sample_id": ids, "label": gen.labels(ids), "image": gen.images(ids)}

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.gen.images(self._ids())
        return out if dtype is None else out.astype(dtype)


def synthetic_split(gen: SyntheticGenerator, n: int) -> ImageSet:
    """A whole split of ``n`` images: lazy rows, labels of every id, ids 0..n-1 and the generator's fingerprint."""
    ids = np.arange(n, dtype=np.int64)
    ident = (f"synthetic:v{GENERATOR_VERSION}:seed={gen.seed}:split={SPLITS[gen.split]}:images={n}:classes={gen.classes}:"
             f"channels={gen.channels}:size={gen.size}")  # everything an image or label depends on
    return ImageSet(
        SyntheticRows(gen, 0, n), gen.labels(ids), ids, [f"class-{c}" for c in range(gen.classes)],
        f"synthetic:{gen.seed}/{SPLITS[gen.split]}", hashlib.sha256(ident.encode()).hexdigest()[:16],
    )


@register_source("synthetic")
class SyntheticSource(DataSource):
    """Generated gratings (``data.synthetic``: images, held_out, classes, channels, seed) at ``data.store_size``;
    the train split always streams (``data.stream`` is not read); the held-out split is lazy too, rendered when sampled."""

    def load(self, data: DataConfig, seed: int, *, stream: bool = False) -> tuple[ImageSet, ImageSet]:
        syn = data.synthetic
        train, held = (SyntheticGenerator(syn.seed, i, data.store_size, syn.channels, syn.classes) for i in range(len(SPLITS)))
        return synthetic_split(train, syn.images), synthetic_split(held, syn.held_out)


def generation_rate(n: int = 20000, size: int = 32, channels: int = 3) -> float:
    """Images per second, rendering ``n`` images (256 per call) in this process: the figure in the module docstring."""
    import time

    gen = SyntheticGenerator(0, 0, size, channels, 10)
    gen.images(np.arange(256))  # tables built, pages touched
    t0 = time.perf_counter()
    gen.images(np.arange(n))
    return n / (time.perf_counter() - t0)
