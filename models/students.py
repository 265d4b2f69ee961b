"""Student backbones: any timm architecture, built with ``num_classes=0`` (pooled features)."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn as nn

from simreg.models.errors import ModelError


def build_backbone(arch: str, *, key: str = "student.arch", model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A randomly initialised timm backbone whose forward returns the pooled (B, num_features) feature.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``{"img_size": 64}`` for a ViT trained at 64 px)."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ModelError(
            f"{key}={arch!r} is not a timm architecture.{hint} "
            "List them with: python -c \"import timm; print(timm.list_models('resnet*'))\""
        )
    kwargs = dict(model_kwargs or {})
    where = key.rsplit(".", 1)[0] + ".model_kwargs" if "." in key else "model_kwargs"
    if "num_classes" in kwargs or "pretrained" in kwargs:
        raise ModelError(f"{where} must not set num_classes or pretrained: backbones are built with num_classes=0, no download")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise ModelError(f"{where}={kwargs} is not accepted by timm arch {arch!r}: {e}") from e


@torch.no_grad()
def feature_dim(backbone: nn.Module, input_size: int = 64) -> int:
    """Width of the pooled feature ``backbone`` returns (timm's ``num_features`` is not it for every
    family: MobileNetV3 adds a conv head), found by one forward pass on a dummy batch in eval mode."""
    was_training = backbone.training
    backbone.eval()
    d = int(backbone(torch.zeros(1, 3, input_size, input_size)).shape[-1])
    backbone.train(was_training)
    return d
