"""The CPU view stage and the teacher-inference stage of the Ray Data pipeline, as plain callables.

``TeacherInference(spec)(batch) -> batch`` is what Ray Data runs in each actor of a teacher's pool; a
unit test calls it on a dict of numpy arrays. The stage passes the ``view`` column through untouched
and adds ``target_<teacher>``: the student later reads the very same ``view`` column, so teacher and
student see the identical view.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from simreg.models.teachers import InputTransform, Teacher, load_teacher
from simreg.orchestrator.views import ViewPlan, make_views

log = logging.getLogger("simreg")
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class TeacherSpec:
    """Everything an actor needs to rebuild a teacher (JSON-able, shipped to remote actors)."""

    name: str
    arch: str
    weights: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    key: str = "teachers[0]"
    format: str = "auto"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Teacher:
        return load_teacher(
            self.name, self.arch, self.weights, InputTransform(self.input_size, self.mean, self.std), key=self.key,
            layout=self.format, model_kwargs=self.model_kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_views(batch: Batch, *, epoch: int, seed: int, plan: ViewPlan) -> Batch:
    """View stage: uint8 ``image`` -> float32 ``view`` (B, C, s, s) for the teachers (and the student, unless
    the plan gives it its own ``student_view``); drops ``image``, adds ``epoch``."""
    out = {k: v for k, v in batch.items() if k != "image"}
    out["view"] = make_views(batch["image"], batch["sample_id"], epoch, seed, plan.teacher, stream=0)
    if plan.student is not None:
        out["student_view"] = make_views(batch["image"], batch["sample_id"], epoch, seed, plan.student, stream=1)
    out["epoch"] = np.full(len(batch["sample_id"]), epoch, dtype=np.int64)
    return out


class TeacherInference:
    """One teacher in one actor: ``__call__(batch)`` adds ``target_<name>`` as float16 (B, d)."""

    def __init__(self, spec: TeacherSpec, threads: int = 2, device: str = "auto") -> None:
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.spec = spec
        self.teacher = spec.build().to(self.device)
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"CPU ({threads} threads)"
        self.placement = f"teacher {spec.name} ({spec.arch}) runs on {where}, host {socket.gethostname()}"
        log.info("%s, pid %d", self.placement, os.getpid())

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        view = torch.from_numpy(batch["view"]).to(self.device, non_blocking=True)
        feat = self.teacher(view)  # (B, d)
        out = dict(batch)
        out[f"target_{self.spec.name}"] = feat.to(torch.float16).cpu().numpy()
        return out
