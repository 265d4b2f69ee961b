"""``RunState``: the small actor a run shares (the epoch the next pipeline execution renders views for, live
progress, per-epoch metrics, placements and start-up marks for the driver; only the driver writes to MLflow).

Its own module, importing neither torch nor the teacher code: the actor's process imports the module that
defines its class, and that process starts with the run, on cores the run's start needs.
"""
from __future__ import annotations

from typing import Any

import ray


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
        self.teacher_rows: dict[str, dict[str, int]] = {}  # teacher -> {"forward": n, "cached": n, "shared": n}
        self.marks: dict[str, float] = {}  # start-up events (unix time of their first occurrence): teacher_ready, first_step, ...
        self.failure: str | None = None  # why the run cannot go on (a diverged loss, a teacher that cannot serve)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.images_done = epoch, 0

    def get_epoch(self) -> int:
        return self.epoch

    def add_images(self, n: int) -> None:
        self.images_done += n

    def add_epoch_metrics(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)

    def add_teacher_rows(self, teacher: str, counts: dict[str, int]) -> None:
        """Rows of this run's blocks: computed by the teacher for it ("forward"), served by the target cache
        ("cached"), or computed for another run of the sweep at the same moment ("shared")."""
        r = self.teacher_rows.setdefault(teacher, {"forward": 0, "cached": 0, "shared": 0})
        for k in r:
            r[k] += int(counts.get(k, 0))

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

    def fail(self, message: str) -> None:
        """Record why the run cannot go on (the first reason stays): a restarted worker group then ends at once
        instead of retrying, and the driver raises it as the run's error."""
        if self.failure is None:
            self.failure = message

    def get_failure(self) -> str | None:
        return self.failure

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
