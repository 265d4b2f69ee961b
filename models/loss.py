"""Regression losses of a student head against a teacher feature; SimReg's is the default (Navaneet et al.,
BMVC 2021, eq. 1). ``train.loss`` picks one by name from ``LOSSES``; a new one is a function
``(pred (B, d), target (B, d)) -> scalar`` decorated with ``@register_loss("name")`` in this module (the
config is validated again inside the Ray workers: a loss registered only in the driver would be unknown
there).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from simreg.models.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES and LOSSES[name] is not fn:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__qualname__}, {fn.__qualname__})")
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ConfigError(f"train.loss={name!r} is unknown: use one of {sorted(LOSSES)}")
    return LOSSES[name]


@register_loss("simreg")
def simreg_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance of l2-normalized vectors, ``2 - 2 cos(pred, target)``, mean over the batch.

    ``pred``: (B, d) student-head output; ``target``: (B, d) teacher backbone feature (any float dtype).
    """
    if pred.shape != target.shape:
        raise ValueError(f"simreg_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = F.normalize(pred.float(), dim=1)
    t = F.normalize(target.float(), dim=1)
    return (2.0 - 2.0 * (p * t).sum(dim=1)).mean()


def cosine_to_target(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between prediction and target (a readable companion of the loss)."""
    return F.cosine_similarity(pred.float(), target.float(), dim=1).mean()
