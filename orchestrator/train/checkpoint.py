"""Checkpoint layout (a directory): ``state.pt`` (loaded with ``weights_only=True``) with backbone,
heads, optimizer, scheduler, epoch, RNG state (torch, numpy, Python) and the metrics of every epoch so far.
One file, nothing stored twice: every epoch's checkpoint is uploaded when the run folder is in a bucket.
The student is exported from it (``evaluation/export.py``) at the end of a run, or of a sweep's best trial."""
from __future__ import annotations

import posixpath
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simreg.models import SimRegObjective
from simreg.models.errors import SimRegError, first_line
from simreg.orchestrator.ray_compat import registered_checkpoints
from simreg.orchestrator.storage import fsync_file

STATE = "state.pt"
# epoch_NNNN; an epoch redone after a fallback from a damaged checkpoint gets a suffix (epoch_NNNN-rT): Ray Train's
# checkpoint manager tells checkpoints apart by object, so a redo under the damaged one's name would later be pruned
# as if it were the old one
CHECKPOINT_NAME = re.compile(r"epoch_(\d{4,})(?:-r\d+)?")


def checkpoint_epoch(name: str) -> int | None:
    m = CHECKPOINT_NAME.fullmatch(name)
    return None if m is None else int(m.group(1))
# what a checkpoint must hold to be resumed from (older checkpoints may lack the RNG states of numpy / Python)
REQUIRED = ("epoch", "backbone", "heads", "optimizer", "scheduler", "torch_rng")


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
    fsync_file(directory / STATE)  # on disk before Ray copies it and registers the checkpoint


def load_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's state (tensors and plain containers only: ``weights_only``); a file that cannot be read,
    or lacks a part, raises ``SimRegError`` naming it."""
    path = directory / STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated zip, bad pickle opcode, a type weights_only refuses, ...)
        raise SimRegError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {first_line(e, 160)})") from e
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise SimRegError(f"checkpoint file {path} lacks {', '.join(missing)}: it was not written by simreg, or only in part")
    return state


def load_kept(ckpt: Any) -> tuple[dict[str, Any], str, list[str]]:
    """The state of Ray Train's latest checkpoint ``ckpt``, or when it is damaged, of the newest earlier one
    still kept beside it (``CheckpointConfig(num_to_keep=2)``): (state, name of the checkpoint used, one line
    per damaged checkpoint skipped). None readable raises ``SimRegError`` naming each."""
    import pyarrow.fs as pafs
    import ray.train

    def attempt(c: Any) -> dict[str, Any]:
        with c.as_directory() as d:
            return load_state(Path(d))

    fs, latest = ckpt.filesystem, ckpt.path.rstrip("/")
    parent, name = posixpath.split(latest)
    epoch = checkpoint_epoch(name)
    skipped: list[str] = []
    try:
        return attempt(ckpt), name, skipped
    except SimRegError as e:
        skipped.append(f"{name}: {e}")
        if epoch is None:
            raise
    kept = [(k, i.base_name) for i in fs.get_file_info(pafs.FileSelector(parent))
            if i.type == pafs.FileType.Directory and (k := checkpoint_epoch(i.base_name)) is not None and k < epoch]
    older = [n for _, n in sorted(kept, reverse=True)]
    for other in older:
        try:
            return attempt(ray.train.Checkpoint(posixpath.join(parent, other), filesystem=fs)), other, skipped
        except SimRegError as e:
            skipped.append(f"{other}: {e}")
    raise SimRegError(
        f"no checkpoint of the run in {parent} can be resumed from ({'; '.join(skipped)}): "
        "rerun with another --output-dir to start over"
    )


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
