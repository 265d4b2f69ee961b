"""The run's actors: ``RunState`` (epoch, progress, metrics for the driver) and the run-long teacher
actors (``TeacherServer``).

Teachers run in actors that live for the whole run (``num_gpus`` each on a GPU cluster): a Ray Data
actor pool would be torn down and rebuilt at every epoch's execution, and on a small machine that
restart (process, imports, weights, the first block through the teacher) cost ~7 s of every epoch in
which the students waited. A teacher actor that dies is restarted by Ray and the call retried
(``max_restarts``/``max_task_retries``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from simreg.models.errors import first_line
from simreg.orchestrator.pipeline.teacher import TeacherInference, TeacherSpec

log = logging.getLogger("simreg")


@ray.remote(num_cpus=0)
class RunState:
    """Shared state of one run: the epoch the next pipeline execution renders views for, the live
    progress of the current epoch, and the per-epoch metrics the driver logs (only the driver writes
    to MLflow)."""

    def __init__(self, epoch: int = -1) -> None:
        self.epoch = epoch
        self.images_done = 0
        self.history: list[dict[str, float]] = []
        self.placements: list[str] = []
        self.records: list[dict[str, Any]] = []  # where each teacher actor / student worker (each attempt) ran
        self.teacher_rows: dict[str, dict[str, int]] = {}  # teacher -> {"forward": n, "cached": n}
        self.marks: dict[str, float] = {}  # start-up events (unix time of their first occurrence): teacher_ready, first_step, ...

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.images_done = epoch, 0

    def get_epoch(self) -> int:
        return self.epoch

    def add_images(self, n: int) -> None:
        self.images_done += n

    def add_epoch_metrics(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)

    def add_teacher_rows(self, teacher: str, forward: int, cached: int) -> None:
        r = self.teacher_rows.setdefault(teacher, {"forward": 0, "cached": 0})
        r["forward"] += forward
        r["cached"] += cached

    def get_teacher_rows(self) -> dict[str, dict[str, int]]:
        return self.teacher_rows

    def note_placement(self, text: str, record: dict[str, Any] | None = None) -> None:
        if text not in self.placements:
            self.placements.append(text)
        if record is not None:
            self.records.append(record)

    def get_records(self) -> list[dict[str, Any]]:
        return self.records

    def start_view_warmup(self, warmup: Any) -> None:
        """Start ``pipeline.warmup.ViewWarmup`` tasks from here: this actor has the job's runtime environment."""
        warmup.start()

    def mark(self, name: str, t: float) -> None:
        self.marks.setdefault(name, t)

    def get_marks(self) -> dict[str, float]:
        return self.marks

    def poll(self, known: int, known_placements: int) -> tuple[int, int, list[dict[str, float]], list[str]]:
        """(epoch, images done in it, metrics of epochs after the first ``known``, new placements)."""
        return self.epoch, self.images_done, self.history[known:], self.placements[known_placements:]


def start_run_state() -> ray.actor.ActorHandle:
    """The run's ``RunState`` on the caller's node: a worker node that leaves (an elastic shrink) must not
    take the run's state with it; if the caller's node goes, the run goes anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return RunState.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()  # type: ignore[attr-defined]


class PooledTeacher(TeacherInference):
    """TeacherInference in a run-long actor: also tells the run where it landed and how many rows went
    through the teacher or came from the cache (the driver logs both)."""

    def __init__(self, spec: TeacherSpec, threads: int, state: ray.actor.ActorHandle, options: dict[str, Any]) -> None:
        super().__init__(spec, threads, **options)
        self.state = state
        ctx = ray.get_runtime_context()
        state.note_placement.remote(self.placement, {
            "role": "teacher", "name": spec.name, "node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "pid": os.getpid(),
            "resources": {k: v for k, v in ctx.get_assigned_resources().items()},
        })
        state.mark.remote("teacher_ready", time.time())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        f0, c0 = self.forward_rows, self.cached_rows
        out = super().__call__(batch)
        self.state.add_teacher_rows.remote(self.spec.name, self.forward_rows - f0, self.cached_rows - c0)
        return out

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """{sample_id, view, view_index} -> (B, d) float16 targets."""
        return self(batch)[f"target_{self.spec.name}"]


TeacherServer = ray.remote(PooledTeacher)


def stop_actors(state: ray.actor.ActorHandle, teachers: list[ray.actor.ActorHandle], timeout_s: float = 60.0) -> None:
    """End a run's actors: the teachers first finish uploading their cache shards (an object store), then all go."""
    if teachers:
        try:
            ray.get([a.flush_cache.remote() for a in teachers], timeout=timeout_s)
        except Exception as e:  # noqa: BLE001  (a dead actor or a slow store: what did not upload is recomputed later)
            log.warning("target cache: teacher actors did not finish uploading (%s)", first_line(e, 200))
    for a in [state, *teachers]:
        ray.kill(a)


@dataclass(frozen=True)
class PoolResources:
    """Resources of each stage; the rule on a small machine: workers + actors + view tasks <= cluster CPUs."""

    actors_per_teacher: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    batch_size: int
    teacher_options: dict[str, Any] = field(default_factory=dict)  # cache, precision, channels_last, compile
    view_tasks: int = 2
    cpus_per_view_task: float = 0.25
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per teacher actor
    label_selector: dict[str, str] = field(default_factory=dict)  # node labels per teacher actor
    env_vars: dict[str, str] = field(default_factory=dict)  # environment of the teacher actors' processes


def start_teachers(specs: list[TeacherSpec], state: ray.actor.ActorHandle, res: PoolResources) -> dict[str, list[ray.actor.ActorHandle]]:
    """``actors_per_teacher`` run-long actors per teacher (``num_gpus`` each on a GPU cluster); Ray restarts
    a dead one and retries the calls it was serving."""
    return {
        t.name: [
            TeacherServer.options(  # type: ignore[misc]
                num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor, max_restarts=-1, max_task_retries=-1,
                resources=res.resources or None, label_selector=res.label_selector or None,
                runtime_env={"env_vars": dict(res.env_vars)} if res.env_vars else None,
                scheduling_strategy="DEFAULT",  # not inside a Tune trial's placement group (it holds 0.01 CPU)
            ).remote(t, res.threads, state, res.teacher_options)
            for _ in range(res.actors_per_teacher)
        ]
        for t in specs
    }
