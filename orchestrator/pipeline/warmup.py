"""Worker processes for the view stage, warmed ahead of the first block.

Ray reuses an idle worker process for a task of the same runtime environment, and Ray Data's tasks inherit
Ray Train's controller's. A view task in a cold process first imports torch, torchvision and Ray Data
(seconds on a small machine), so the first epoch's first blocks waited on it. ``ViewWarmup`` starts that
many tasks that only import the view stage, in that environment.

Timing matters on a small machine: started with the run, these tasks took cores from the worker group's own
start and the first step came later. Rank 0 asks the run's ``RunState`` actor to start them once the workers
run (a task submitted by a Train worker would carry the worker's environment, not the controller's). This
module stays light: the ``RunState`` process imports it, and must not import torch for it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import ray

VIEW_STAGE_MODULE = "simreg.orchestrator.pipeline.dataset"


def _import_view_stage() -> None:
    importlib.import_module(VIEW_STAGE_MODULE)


@dataclass(frozen=True)
class ViewWarmup:
    tasks: int  # the view stage's concurrent tasks
    num_cpus: float  # each task's CPUs, as the view stage asks
    runtime_env: dict[str, Any] | None  # Ray Train's controller's (ray_compat.train_controller_runtime_env)

    def start(self) -> None:
        task = ray.remote(_import_view_stage).options(num_cpus=self.num_cpus, runtime_env=self.runtime_env, scheduling_strategy="DEFAULT")
        for _ in range(self.tasks):
            task.remote()
