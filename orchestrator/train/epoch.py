"""The epoch loop over an iterable of batches (no Ray: the worker and the in-process baseline share it)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class EpochStats:
    """Sums over the steps of one epoch on one process (the worker all-reduces them)."""

    steps: int = 0
    images: int = 0
    skipped_images: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def means(self) -> dict[str, float]:
        return {k: v / max(self.images, 1) for k, v in self.sums.items()}


Batch = Mapping[str, torch.Tensor]


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite (on this process or, with an all-reducing ``finite`` check, on any):
    raised before that step's backward pass, so the model keeps the weights of the step before."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"the loss was {value} at step {step}")
        self.step, self.value = step, value


def local_finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).all())


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    teacher_names: list[str],
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    view_key: str = "view",
    autocast_dtype: torch.dtype | None = None,
    finite: Callable[[torch.Tensor], bool] = local_finite,
) -> EpochStats:
    """One pass: batch {view_key: (B, C, H, W), "target_<t>": (B, d_t)} -> SGD step on the SimReg loss.

    ``view_key`` is ``view`` when the student sees the teachers' view, ``student_view`` when it has its own.
    ``autocast_dtype`` (e.g. bf16 on CUDA) runs the forward pass in autocast; the loss stays fp32.
    ``finite(loss)``: whether to go on; False raises ``NonFiniteLoss`` before the backward pass (DDP workers pass
    a check all-reduced over the ranks, so every rank stops at the same step and none waits in a collective)."""
    model.train()
    stats = EpochStats()
    t0 = time.perf_counter()
    for batch in batches:
        view = batch[view_key].to(device, non_blocking=True)
        n = int(view.shape[0])
        if n < 2:  # BatchNorm cannot train on one sample; equal shards make every rank skip the same batch
            stats.skipped_images += n
            continue
        targets = {t: batch[f"target_{t}"].to(device, non_blocking=True) for t in teacher_names}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(view, targets)
        if not finite(out["loss"].detach()):
            raise NonFiniteLoss(stats.steps + 1, float(out["loss"].detach()))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        stats.steps += 1
        stats.images += n
        vals = {k: float(v.detach()) for k, v in out.items()}
        for k, v in vals.items():
            stats.sums[k] = stats.sums.get(k, 0.0) + v * n
        if on_step is not None:
            on_step(n, vals)
    stats.seconds = time.perf_counter() - t0
    return stats
