"""Frozen teachers: a timm architecture plus a local weights file, loaded strictly, eval mode, no grad; or, with
``weights=random[:SEED]`` (models/random_init.py), the architecture randomly initialised under SEED.

The regression target is the teacher's pooled *backbone* feature (not its SSL projection head).
"""
from __future__ import annotations

import hashlib
import io
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from simreg.models.errors import TeacherLoadError, first_line
from simreg.models.random_init import random_init_seed, random_weights_ref
from simreg.models.students import build_backbone, feature_dim
from simreg.models.teacher_layouts import LAYOUTS, adapt


@dataclass(frozen=True)
class InputTransform:
    """Maps a view in [0, 1], (B, C, H, W) with C in {1, 3}, to a model's normalized RGB input."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        x = view.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # (B, 3, size, size)


def read_weights_file(path: str | Path) -> object:
    """The object in a safetensors or torch file (``weights_only=True``: tensors and containers only)."""
    return read_weights(path)[0]


def read_weights(path: str | Path) -> tuple[object, str]:
    """(the object in a safetensors or torch file, the sha256 of the bytes it was read from). The file is read
    once and both come from those bytes: a file replaced meanwhile cannot give one model's weights with another's
    hash. The bytes are held while the tensors are built from them (twice the file's size, briefly)."""
    p = Path(path)
    if not p.is_file():
        raise TeacherLoadError(f"teacher weights file {str(p)!r} does not exist: check teachers[].weights")
    try:
        data = p.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if p.suffix == ".safetensors":
            from safetensors.torch import load

            return load(data), digest
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), digest
    except Exception as e:  # unreadable, corrupt file, pickle with code, wrong format
        fix = "Use a .safetensors file or a torch state dict saved with torch.save(model.state_dict(), path)"
        # weights_only refuses any pickled class or function (a whole nn.Module, numpy arrays, code): name it, in one line
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and refused:
            raise TeacherLoadError(f"cannot read teacher weights {str(p)!r}: it holds a pickled {refused.group(1)}, not only tensors; simreg "
                                   f"loads weights with weights_only=True and never runs code from a file. {fix}") from None
        raise TeacherLoadError(f"cannot read teacher weights {str(p)!r}: {type(e).__name__}: {first_line(e)}. {fix}") from e


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a file (plain, or wrapped in {"state_dict": ...} / {"model": ...})."""
    sd = LAYOUTS["plain"](read_weights_file(path))
    if sd is None:
        raise TeacherLoadError(f"teacher weights {str(path)!r} hold no flat state dict of tensors: save the backbone's state_dict()")
    return sd


def _describe_keys(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


class Teacher(nn.Module):
    """A frozen backbone with its own input transform. forward(view) -> (B, d) pooled feature.
    ``weights_sha256``: the sha256 of the file bytes its weights were loaded from (None: randomly initialised)."""

    def __init__(
        self, name: str, arch: str, backbone: nn.Module, transform: InputTransform, weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.arch = arch
        self.weights_sha256 = weights_sha256
        self.backbone = backbone
        self.transform = transform
        self.feature_dim = feature_dim(backbone, transform.size)
        self.backbone.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        # A teacher never leaves eval mode: BN statistics and dropout stay frozen whatever the caller does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, view: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.transform(view))


def random_init_identity(seed: int) -> str:
    """A random teacher's identity in a cache key, where a file teacher has its sha256: the seed and the timm and
    torch versions (their init code, and so the weights a seed gives, can change between versions)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"{random_weights_ref(seed)}:timm-{timm.__version__}:torch-{major}.{minor}"


def random_teacher(
    name: str, arch: str, seed: int, transform: InputTransform, *, key: str = "teachers[0]", model_kwargs: Mapping[str, Any] | None = None,
) -> Teacher:
    """``arch`` as timm initialises it under ``seed`` (CPU generator): the same weights in every process with the same
    timm and torch. The caller's random state is left as it was (only the CPU generator is seeded, and restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        backbone = build_backbone(arch, key=f"{key}.arch", model_kwargs=model_kwargs)
    return Teacher(name, arch, backbone, transform)


def load_teacher(
    name: str, arch: str, weights: str | Path, transform: InputTransform, *, key: str = "teachers[0]",
    layout: str = "auto", model_kwargs: Mapping[str, Any] | None = None,
) -> Teacher:
    """Build ``arch`` with timm and load ``weights`` strictly in the given (or detected) checkpoint layout;
    on mismatch, list missing and unexpected keys and the layouts tried. ``weights`` as the string ``random`` or
    ``random:SEED``: no file, the architecture randomly initialised (``random_teacher``; ``layout`` not read)."""
    if isinstance(weights, str):  # a Path is always a file, even one named "random"
        try:
            seed = random_init_seed(weights)
        except ValueError as e:
            raise TeacherLoadError(f"{key}.weights: {e}") from None
        if seed is not None:
            return random_teacher(name, arch, seed, transform, key=key, model_kwargs=model_kwargs)
    backbone = build_backbone(arch, key=f"{key}.arch", model_kwargs=model_kwargs)
    if layout != "auto" and layout not in LAYOUTS:
        raise TeacherLoadError(f"{key}.format={layout!r} is unknown: use auto or one of {sorted(LAYOUTS)}")
    obj, digest = read_weights(weights)
    own = backbone.state_dict()
    sd, _, tried = adapt(obj, set(own), layout)
    if sd is None:
        if not tried:
            raise TeacherLoadError(
                f"{key}.weights={str(weights)!r} holds no backbone state dict in layout(s) "
                f"{sorted(LAYOUTS) if layout == 'auto' else [layout]}: save the backbone's state_dict()"
            )
        best = min(tried, key=lambda t: len(t[1]) + len(t[2]))
        others = "; ".join(f"{n}: {len(m)} missing, {len(u)} unexpected" for n, m, u in tried if n != best[0])
        raise TeacherLoadError(
            f"{key}.weights={str(weights)!r} does not match timm arch {arch!r}: closest layout {best[0]!r} has "
            f"missing keys {_describe_keys(best[1])}; unexpected keys {_describe_keys(best[2])}"
            + (f" (also tried {others})" if others else "")
            + f". Check {key}.arch and {key}.format, or save the backbone with "
            f"timm.create_model({arch!r}, num_classes=0).state_dict()"
        )
    bad_shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad_shapes:
        raise TeacherLoadError(
            f"{key}.weights={str(weights)!r} has shapes that differ from timm arch {arch!r}: "
            + "; ".join(bad_shapes[:5])
            + f" ({len(bad_shapes)} in all). Check {key}.arch"
        )
    backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    return Teacher(name, arch, backbone, transform, weights_sha256=digest)
