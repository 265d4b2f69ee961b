"""SimReg regression loss (Navaneet et al., BMVC 2021, eq. 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
