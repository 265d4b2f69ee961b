"""The pure SimReg training objective: student backbone + one head per teacher -> loss dict.

It never calls Ray, torch.distributed or .cuda(): the worker wraps it in DDP and moves it to a device.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from simreg.models.heads import build_heads, head_prefix
from simreg.models.loss import cosine_to_target, get_loss
from simreg.models.students import feature_dim
from simreg.models.teachers import InputTransform


class SimRegObjective(nn.Module):
    """forward(view, targets) -> {"loss", "loss/<teacher>", "cos/<teacher>"}.

    ``view``: (B, C, H, W) in [0, 1], the same weakly augmented view the teachers saw.
    ``targets``: teacher name -> (B, d_k) teacher backbone feature.
    """

    def __init__(
        self,
        backbone: nn.Module,
        transform: InputTransform,
        teacher_dims: Mapping[str, int],
        *,
        depth: int = 4,
        width_mult: float = 2.0,
        layout: str = "paper",
        teacher_weights: Mapping[str, float] | None = None,
        loss: str = "simreg",
    ) -> None:
        super().__init__()
        self.loss_fn = get_loss(loss)  # SimReg's 2 - 2 cos by default (models/loss.py)
        self.backbone = backbone
        self.transform = transform
        self.student_dim = feature_dim(backbone, transform.size)
        self.heads = build_heads(self.student_dim, teacher_dims, depth, width_mult, layout)
        w = dict(teacher_weights or {})
        total = sum(w.get(n, 1.0) for n in teacher_dims)
        self.teacher_weights = {n: w.get(n, 1.0) / total for n in teacher_dims}  # weighted mean over teachers

    def features(self, view: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.transform(view))  # (B, m)

    def head_features(self, view: torch.Tensor, teacher: str, layers: int) -> torch.Tensor:
        """The student's feature after the first ``layers`` layers of ``teacher``'s head (0 = backbone)."""
        return head_prefix(self.heads[teacher], layers)(self.features(view))

    def forward(self, view: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = self.features(view)  # (B, m)
        out: dict[str, torch.Tensor] = {}
        total = feat.new_zeros(())
        for name, head in self.heads.items():
            pred = head(feat)  # (B, d_k)
            tgt = targets[name].to(pred.device)
            loss_k = self.loss_fn(pred, tgt)
            out[f"loss/{name}"] = loss_k
            out[f"cos/{name}"] = cosine_to_target(pred.detach(), tgt)
            total = total + self.teacher_weights[name] * loss_k
        out["loss"] = total
        return out
