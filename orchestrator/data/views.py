"""Augmented views, drawn reproducibly: parameters come from a generator seeded by (seed, epoch, sample id,
stream), so a view is the same anywhere in the cluster, after a restart, and in a test. Pure numpy/torch.

Presets (the paper's Table 7 vocabulary):
- ``weak``: RandomResizedCrop(scale (0.2, 1)) + horizontal flip, the paper's default for both networks.
- ``strong``: MoCo-v2's augmentation: the same crop and flip, colour jitter (brightness 0.4, contrast
  0.4, saturation 0.4, hue 0.1) with p = 0.8 in a random order, grayscale with p = 0.2 and Gaussian blur
  (sigma 0.1-2.0 at 224 px, scaled with the view size) with p = 0.5.

``strength`` s scales a preset away from the identity: crop-scale lower bound ``1 - s * (1 - low)``, jitter
magnitudes times s, and the jitter, grayscale and blur probabilities times s (capped at 1). s = 1 is the
preset as published; s = 0 is the whole image, unaltered but for the flip.

Stream 0 is the view the teachers see (and the student too when teacher and student share the view);
stream 1 is the student's own view when they see different augmentations of the image. On one-channel
images (Fashion-MNIST) saturation, hue and grayscale change nothing, exactly as in torchvision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

Preset = Literal["weak", "strong"]
MOCO_V2_JITTER = (0.4, 0.4, 0.4, 0.1)
BLUR_SIGMA_224 = (0.1, 2.0)


@dataclass(frozen=True)
class ViewSpec:
    """One augmentation recipe. The default is the paper's weak view."""

    size: int = 64
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = BLUR_SIGMA_224  # at 224 px; scaled by size / 224

    @property
    def photometric(self) -> bool:
        return (self.jitter_p > 0 and any(j > 0 for j in self.jitter)) or self.gray_p > 0 or self.blur_p > 0


def preset_spec(kind: Preset, size: int = 64, scale: tuple[float, float] = (0.2, 1.0), hflip_p: float = 0.5, strength: float = 1.0) -> ViewSpec:
    """The ``weak`` or ``strong`` recipe at ``strength`` (see the module docstring)."""
    if kind not in ("weak", "strong"):
        raise ValueError(f"augmentation preset {kind!r} is unknown: use 'weak' or 'strong'")
    if strength < 0:
        raise ValueError(f"augment.strength={strength} is negative: use 0 (no augmentation) to 1.2")
    s = strength
    low = min(scale[1], max(0.01, scale[0] + (1.0 - s) * (1.0 - scale[0])))  # exactly scale[0] at s = 1
    spec = ViewSpec(size=size, scale=(low, scale[1]), hflip_p=hflip_p)
    if kind == "strong":
        b, c, sat, hue = (j * s for j in MOCO_V2_JITTER)
        spec = replace(spec, jitter=(b, c, sat, min(0.5, hue)), jitter_p=min(1.0, 0.8 * s), gray_p=min(1.0, 0.2 * s), blur_p=min(1.0, 0.5 * s))
    return spec


@dataclass(frozen=True)
class ViewParams:
    """Everything that decides one view: crop box, flip, and the photometric draws (None = not applied)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter_order: tuple[int, ...] = ()
    jitter_factors: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    gray: bool = False
    blur_sigma: float | None = None


def _rng(seed: int, epoch: int, sample_id: int, stream: int) -> np.random.Generator:
    # Stream 0 keeps the 3-word seed so the shared view of a run is the same as before streams existed.
    return np.random.default_rng([seed, epoch, sample_id] if stream == 0 else [seed, epoch, sample_id, stream])


def _crop(rng: np.random.Generator, height: int, width: int, spec: ViewSpec) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling rule."""
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # fallback: central crop at the clamped ratio, as torchvision does
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(seed: int, epoch: int, sample_id: int, height: int, width: int, spec: ViewSpec, stream: int = 0) -> ViewParams:
    rng = _rng(seed, epoch, sample_id, stream)
    top, left, h, w = _crop(rng, height, width, spec)
    flip = bool(rng.uniform() < spec.hflip_p)
    p = ViewParams(top, left, h, w, flip)
    if not spec.photometric:
        return p  # weak views draw nothing more: their parameters do not depend on the photometric recipe
    order = tuple(int(i) for i in rng.permutation(4))
    b, c, s, hue = spec.jitter
    factors = (
        float(rng.uniform(max(0.0, 1 - b), 1 + b)), float(rng.uniform(max(0.0, 1 - c), 1 + c)),
        float(rng.uniform(max(0.0, 1 - s), 1 + s)), float(rng.uniform(-hue, hue)),
    )
    jitter = bool(rng.uniform() < spec.jitter_p)
    gray = bool(rng.uniform() < spec.gray_p)
    sigma = float(rng.uniform(*spec.blur_sigma)) * spec.size / 224.0
    blur = bool(rng.uniform() < spec.blur_p)
    return replace(p, jitter_order=order if jitter else (), jitter_factors=factors if jitter else None, gray=gray, blur_sigma=sigma if blur else None)


def view_params(seed: int, epoch: int, sample_id: int, height: int, width: int, spec: ViewSpec, stream: int = 0) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of a view."""
    p = draw_view(seed, epoch, sample_id, height, width, spec, stream)
    return p.top, p.left, p.height, p.width, p.flip


def to_chw_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    t = torch.tensor(images)  # a copy: Ray hands out read-only arrays
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.float().div_(255.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _photometric(v: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Colour jitter (torchvision's order and factor rules), grayscale, Gaussian blur on one (C, H, W) view."""
    if p.jitter_factors is not None:
        b, c, s, h = p.jitter_factors
        for op in p.jitter_order:
            if op == 0:
                v = TF.adjust_brightness(v, b)
            elif op == 1:
                v = TF.adjust_contrast(v, c)
            elif op == 2:
                v = TF.adjust_saturation(v, s)
            elif h != 0.0:
                v = TF.adjust_hue(v, h)
    if p.gray and v.shape[0] == 3:
        v = TF.rgb_to_grayscale(v, num_output_channels=3)
    if p.blur_sigma is not None:
        k = 2 * math.ceil(3 * p.blur_sigma) + 1
        v = TF.gaussian_blur(v, [k, k], [p.blur_sigma, p.blur_sigma])
    return v


def make_views(images: np.ndarray, sample_ids: np.ndarray, epoch: int, seed: int, spec: ViewSpec, stream: int = 0) -> np.ndarray:
    """One view per image: float32 (B, C, size, size) in [0, 1]. ``epoch`` is the view index (the epoch
    itself unless views come from a bank)."""
    x = to_chw_float(images)  # (B, C, H, W)
    H, W = x.shape[-2:]
    out = torch.empty((x.shape[0], x.shape[1], spec.size, spec.size), dtype=torch.float32)
    for i, sid in enumerate(sample_ids.tolist()):
        p = draw_view(seed, epoch, int(sid), H, W, spec, stream)
        v = _resize(x[i : i + 1, :, p.top : p.top + p.height, p.left : p.left + p.width], spec.size)[0]
        if p.jitter_factors is not None or p.gray or p.blur_sigma is not None:
            v = _photometric(v, p)
        out[i] = v.flip(-1) if p.flip else v
    return out.numpy()


def view_index(epoch: int, bank: int | None) -> int:
    """The view an epoch uses: a fresh one per epoch (no bank), or one of ``bank`` views per sample in turn."""
    return epoch if not bank else epoch % bank


@dataclass(frozen=True)
class ViewPlan:
    """What each network sees. ``student`` None: the student trains on the teachers' very view (the
    paper's "same image"); otherwise it gets its own independently drawn view (stream 1). ``bank``: K views
    per sample, epoch e uses view e mod K (None: view e, a fresh one every epoch)."""

    teacher: ViewSpec
    student: ViewSpec | None = None
    bank: int | None = None

    @property
    def student_key(self) -> str:
        return "view" if self.student is None else "student_view"


def eval_views(images: np.ndarray, size: int) -> np.ndarray:
    """The evaluation transform: the whole image resized to ``size``, float32 (B, C, size, size)."""
    x = to_chw_float(images)
    if x.shape[-2:] != (size, size):
        x = _resize(x, size)
    return x.numpy()


def add_views(batch: dict[str, np.ndarray], *, epoch: int, seed: int, plan: ViewPlan) -> dict[str, np.ndarray]:
    """View stage: uint8 ``image`` -> float32 ``view`` (B, C, s, s) for the teachers (and the student, unless
    the plan gives it its own ``student_view``); drops ``image``, adds ``epoch`` and ``view_index`` (the
    epoch, or its place in a bank of ``plan.bank`` views per sample)."""
    out = {k: v for k, v in batch.items() if k != "image"}
    v = view_index(epoch, plan.bank)
    out["view"] = make_views(batch["image"], batch["sample_id"], v, seed, plan.teacher, stream=0)
    if plan.student is not None:
        out["student_view"] = make_views(batch["image"], batch["sample_id"], v, seed, plan.student, stream=1)
    n = len(batch["sample_id"])
    out["epoch"] = np.full(n, epoch, dtype=np.int64)
    out["view_index"] = np.full(n, v, dtype=np.int64)
    return out
