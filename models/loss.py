"""Regression losses of a student head against a teacher feature; SimReg's is the default (Navaneet et al.,
BMVC 2021, eq. 1). ``train.loss`` picks one by name from ``LOSSES``; a new one is a function
``(pred (B, d), target (B, d)) -> (B,)``, one loss per image (the objective averages them; ``loss.teacher_drop``
masks them per image), decorated with ``@register_loss("name")`` in this module (the config is validated again
inside the Ray workers: a loss registered only in the driver would be unknown there). A function that returns a
scalar works too, without teacher dropping. The target reaches the loss after its teacher's normalisation
(``teachers[i].normalize``, models/target_norm.py).
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


def _same_shape(name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")


@register_loss("simreg")
def simreg_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance of l2-normalized vectors, ``2 - 2 cos(pred, target)``, per image (B,)."""
    _same_shape("simreg loss", pred, target)
    p = F.normalize(pred.float(), dim=1)
    t = F.normalize(target.float(), dim=1)
    return 2.0 - 2.0 * (p * t).sum(dim=1)


@register_loss("mse")
def mse_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the dimensions, per image (B,): the regression of ``standardize`` and ``phi_s``
    targets (unit variance per dimension, so a prediction of 0 costs 1), as UNIC and PHI-S regress them."""
    _same_shape("mse loss", pred, target)
    return (pred.float() - target.float()).pow(2).mean(dim=1)


def simreg_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance of l2-normalized vectors, ``2 - 2 cos(pred, target)``, mean over the batch.

    ``pred``: (B, d) student-head output; ``target``: (B, d) teacher backbone feature (any float dtype).
    """
    return simreg_per_image(pred, target).mean()


def cosine_to_target(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between prediction and target (a readable companion of the loss)."""
    return F.cosine_similarity(pred.float(), target.float(), dim=1).mean()
