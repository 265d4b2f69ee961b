"""Shared by the fault tests: when has Ray Train *committed* an epoch's checkpoint?"""
from __future__ import annotations

from pathlib import Path

from simreg.orchestrator.train.checkpoint import committed_epochs, train_storage


def committed(out: Path, epoch: int) -> bool:
    """True once Ray Train registered ``epoch_<epoch>`` of the run in ``out`` (see ``committed_epochs``)."""
    return epoch in committed_epochs(train_storage(out))
