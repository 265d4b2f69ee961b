"""The run's teacher actors (``TeacherServer``), and ending a run's actors (``RunState`` lives in
``pipeline/state.py``).

Teachers run in actors that live for the whole run (``num_gpus`` each on a GPU cluster): a Ray Data
actor pool would be torn down and rebuilt at every epoch's execution, and on a small machine that
restart (process, imports, weights, the first block through the teacher) cost ~7 s of every epoch in
which the students waited. A teacher actor that dies is restarted by Ray and the call retried, up to
``teacher_pool.max_restarts`` times; then, or when a call outlasts ``teacher_pool.call_timeout_s``, the view
stage records why in ``RunState`` and the run ends FAILED with that line.
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


class PooledTeacher(TeacherInference):
    """TeacherInference in a run-long actor: also tells the run where it landed and how many rows went
    through the teacher or came from the cache (the driver logs both)."""

    def __init__(self, spec: TeacherSpec, threads: int, state: ray.actor.ActorHandle, options: dict[str, Any]) -> None:
        super().__init__(spec, threads, **options)
        self.state = state
        self._told_write_error = False
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
        if self.cache is not None and self.cache.write_error is not None and not self._told_write_error:
            self._told_write_error = True  # the driver's log says it once (this process's log is hidden without --verbose)
            self.state.note_placement.remote(
                f"warning: teacher {self.spec.name}: the target cache in {self.cache.dir} cannot be written ({self.cache.write_error}); "
                "the run goes on computing targets without caching them (free space there, or set cache.dir / cache.enabled=false)")
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
    max_restarts: int = 3  # restarts of a dead teacher actor before its calls fail
    call_timeout_s: float = 600.0  # a view task's wait for one block's targets


def start_teachers(specs: list[TeacherSpec], state: ray.actor.ActorHandle, res: PoolResources) -> dict[str, list[ray.actor.ActorHandle]]:
    """``actors_per_teacher`` run-long actors per teacher (``num_gpus`` each on a GPU cluster); Ray restarts
    a dead one (``max_restarts`` times) and retries the calls it was serving."""
    return {
        t.name: [
            TeacherServer.options(  # type: ignore[misc]
                num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor, max_restarts=res.max_restarts, max_task_retries=-1,
                resources=res.resources or None, label_selector=res.label_selector or None,
                runtime_env={"env_vars": dict(res.env_vars)} if res.env_vars else None,
                scheduling_strategy="DEFAULT",  # not inside a Tune trial's placement group (it holds 0.01 CPU)
            ).remote(t, res.threads, state, res.teacher_options)
            for _ in range(res.actors_per_teacher)
        ]
        for t in specs
    }
