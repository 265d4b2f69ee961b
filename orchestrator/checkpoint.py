"""Checkpoint layout (a directory): ``state.pt`` (loaded with ``weights_only=True``) with backbone,
heads, optimizer, scheduler, epoch and RNG state; ``student.safetensors`` (the backbone alone, the export
format) and ``heads.safetensors`` (heads kept apart: they are discarded after distillation)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from simreg.models import SimRegObjective

STATE = "state.pt"
STUDENT = "student.safetensors"
HEADS = "heads.safetensors"


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(
    directory: Path, objective: SimRegObjective, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, metrics: dict[str, float],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "epoch": epoch,
            "backbone": objective.backbone.state_dict(),
            "heads": objective.heads.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "metrics": metrics,
        },
        directory / STATE,
    )
    save_file(_contiguous(objective.backbone.state_dict()), str(directory / STUDENT))
    save_file(_contiguous(objective.heads.state_dict()), str(directory / HEADS))


def load_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE, map_location="cpu", weights_only=True)


def restore(
    state: dict[str, Any], objective: SimRegObjective, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Load a checkpoint's state; returns the epoch to start from."""
    objective.backbone.load_state_dict(state["backbone"])
    objective.heads.load_state_dict(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]) + 1
