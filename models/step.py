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
from simreg.models.target_norm import NormMap, TargetNorm
from simreg.models.teachers import InputTransform


class SimRegObjective(nn.Module):
    """forward(view, targets) -> {"loss", "loss/<teacher>", "cos/<teacher>"} (+ "kept/<teacher>" with teacher dropping).

    ``view``: (B, C, H, W) in [0, 1], the same weakly augmented view the teachers saw.
    ``targets``: teacher name -> (B, d_k) teacher backbone feature, mapped by the teacher's normalisation
    (``normalize``: name -> l2 | standardize | phi_s, with ``target_maps`` for the last two) before the loss.
    ``teacher_drop``: UNIC's teacher dropping while training: per image, the teacher with the highest loss is
    kept and every other one is dropped with this probability. ``loss/<teacher>`` is always the undropped mean
    (comparable across runs); ``loss`` is what the optimizer sees.
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
        normalize: Mapping[str, str] | None = None,
        target_maps: Mapping[str, NormMap] | None = None,
        teacher_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.loss_fn = get_loss(loss)  # SimReg's 2 - 2 cos by default (models/loss.py)
        if not 0.0 <= teacher_drop < 1.0:
            raise ValueError(f"teacher_drop={teacher_drop} must be in [0, 1)")
        self.teacher_drop = float(teacher_drop)
        self.drop_generator: torch.Generator | None = None  # the workers seed one per rank (seed_dropping)
        norm, maps = dict(normalize or {}), dict(target_maps or {})
        self.norms = nn.ModuleDict({n: TargetNorm(norm.get(n, "l2"), maps.get(n)) for n in teacher_dims})
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
        per_image: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            pred = head(feat)  # (B, d_k)
            tgt = self.norms[name](targets[name].to(pred.device))
            loss_k = self.loss_fn(pred, tgt)
            per_image[name] = loss_k
            out[f"loss/{name}"] = loss_k.mean()
            out[f"cos/{name}"] = cosine_to_target(pred.detach(), tgt)
        dropping = self.training and self.teacher_drop > 0 and len(per_image) > 1
        if dropping:
            out.update(self._dropped(per_image))
        else:
            out["loss"] = sum((self.teacher_weights[n] * out[f"loss/{n}"] for n in per_image), feat.new_zeros(()))
        return out

    def seed_dropping(self, seed: int, device: torch.device) -> None:
        """Teacher-drop masks from their own generator (each rank its own seed), not the global one."""
        self.drop_generator = torch.Generator(device=device).manual_seed(seed)

    def _dropped(self, per_image: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """UNIC's teacher dropping: {"loss": the masked weighted loss, "kept/<teacher>": share of images kept}."""
        names = list(per_image)
        if any(v.ndim != 1 for v in per_image.values()):
            raise ValueError("loss.teacher_drop needs a loss that returns one value per image (models/loss.py)")
        losses = torch.stack([per_image[n] for n in names])  # (K, B)
        gen = self.drop_generator if self.drop_generator is not None and self.drop_generator.device == losses.device else None
        keep = torch.rand(losses.shape, device=losses.device, generator=gen) >= self.teacher_drop
        top = losses.detach().argmax(dim=0)  # the teacher each image is furthest from is never dropped
        keep[top, torch.arange(losses.shape[1], device=losses.device)] = True
        w = torch.tensor([self.teacher_weights[n] for n in names], device=losses.device).unsqueeze(1)
        out = {"loss": (w * losses * keep).sum(dim=0).mean()}
        out.update({f"kept/{n}": keep[i].float().mean() for i, n in enumerate(names)})
        return out
