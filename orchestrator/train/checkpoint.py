"""Checkpoint layout (a directory): ``state.pt`` (loaded with ``weights_only=True``) with backbone,
heads, optimizer, scheduler, epoch, RNG state (torch, numpy, Python) and the metrics of every epoch so far.
One file, nothing stored twice: every epoch's checkpoint is uploaded when the run folder is in a bucket.
The student is exported from it (``evaluation/export.py``) at the end of a run, or of a sweep's best trial."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simreg.models import SimRegObjective
from simreg.orchestrator.ray_compat import registered_checkpoints

STATE = "state.pt"


def save_checkpoint(
    directory: Path, objective: SimRegObjective, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, metrics: dict[str, float],
    history: list[dict[str, float]] | None = None,
) -> None:
    """``history``: the metrics of every epoch so far (a resumed run reports the whole run from it)."""
    directory.mkdir(parents=True, exist_ok=True)
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    torch.save(
        {
            "epoch": epoch,
            "backbone": objective.backbone.state_dict(),
            "heads": objective.heads.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # numpy's and Python's generators as plain tensors/lists: weights_only loading accepts them
            "numpy_rng": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                          "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python_rng": _python_rng(),
            "metrics": metrics,
            "history": list(history or [metrics]),
        },
        directory / STATE,
    )


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
    if "numpy_rng" in state:
        n = state["numpy_rng"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python_rng" in state:
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    return int(state["epoch"]) + 1


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def train_storage(output_dir: Path) -> Path:
    """Where Ray Train keeps a run's checkpoints (``epoch_NNNN``) and its snapshot: RunConfig's
    ``storage_path/name`` for the run in ``output_dir``."""
    return output_dir / "ray" / "train"


def committed_epochs(storage: Path) -> set[int]:
    """Epochs whose checkpoint (``epoch_NNNN``) Ray Train has registered in its checkpoint manager snapshot
    under ``storage`` (the run's ``storage_path/name``, ``train_storage``). A checkpoint folder appears before that, while it is
    still being persisted: a failure then resumes from the checkpoint before it."""
    return {int(name.removeprefix("epoch_")) for name in registered_checkpoints(storage)}
