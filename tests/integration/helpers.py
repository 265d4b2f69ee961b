"""Shared by the fault tests: when has Ray Train *committed* an epoch's checkpoint?"""
from __future__ import annotations

from pathlib import Path


def committed(out: Path, epoch: int) -> bool:
    """True once Ray Train registered ``epoch_<epoch>`` in its checkpoint manager snapshot (the folder
    itself appears earlier, while the checkpoint is still being persisted: a failure then restarts from the
    checkpoint before it)."""
    snap = out / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        return f"epoch_{epoch:04d}" in snap.read_text()
    except OSError:
        return False
