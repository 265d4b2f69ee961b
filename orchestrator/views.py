"""The shared weak view: one RandomResizedCrop + horizontal flip per (seed, epoch, sample id).

Teacher and student receive the *same* view (the paper's best setting, Table 7). Parameters are drawn
from a generator seeded by (seed, epoch, sample_id), so a view is reproducible anywhere in the cluster,
after a restart, and in a test. Pure numpy/torch: no Ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewSpec:
    size: int = 64
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5


def view_params(seed: int, epoch: int, sample_id: int, height: int, width: int, spec: ViewSpec) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip), torchvision's RandomResizedCrop sampling rule with a per-sample generator."""
    rng = np.random.default_rng([seed, epoch, sample_id])
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    crop = None
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            crop = (top, left, h, w)
            break
    if crop is None:  # fallback: central crop at the clamped ratio, as torchvision does
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            h, w = height, int(round(height * spec.ratio[1]))
        else:
            w, h = width, height
        crop = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.uniform() < spec.hflip_p)
    return (*crop, flip)


def to_chw_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    t = torch.tensor(images)  # a copy: Ray hands out read-only arrays
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.float().div_(255.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def make_views(images: np.ndarray, sample_ids: np.ndarray, epoch: int, seed: int, spec: ViewSpec) -> np.ndarray:
    """One weak view per image: float32 (B, C, size, size) in [0, 1]."""
    x = to_chw_float(images)  # (B, C, H, W)
    H, W = x.shape[-2:]
    out = torch.empty((x.shape[0], x.shape[1], spec.size, spec.size), dtype=torch.float32)
    for i, sid in enumerate(sample_ids.tolist()):
        top, left, h, w, flip = view_params(seed, epoch, int(sid), H, W, spec)
        v = _resize(x[i : i + 1, :, top : top + h, left : left + w], spec.size)[0]
        out[i] = v.flip(-1) if flip else v
    return out.numpy()


def eval_views(images: np.ndarray, size: int) -> np.ndarray:
    """The evaluation transform: the whole image resized to ``size``, float32 (B, C, size, size)."""
    x = to_chw_float(images)
    if x.shape[-2:] != (size, size):
        x = _resize(x, size)
    return x.numpy()
