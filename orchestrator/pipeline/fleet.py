"""A sweep's teacher fleet: every distinct teacher started once, ``teacher_pool.actors_per_teacher`` actors on
the teacher resources, serving all the sweep's trials (``PooledTeacher`` batches and de-duplicates their
requests). A trial reserves only its student workers and view tasks; a teacher its config gives that the fleet
does not run (a space that varies a teacher's weights, precision, ...) gets the trial's own actors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray

from simreg.models.errors import first_line
from simreg.orchestrator.pipeline.actors import PoolResources, start_teachers, stop_actors
from simreg.orchestrator.pipeline.requester import digest
from simreg.orchestrator.pipeline.teacher import TeacherSpec

log = logging.getLogger("simreg")


def teacher_identity(spec: TeacherSpec, res: PoolResources) -> str:
    """Everything that decides a teacher's targets: its spec (not its name in the config) and how it runs
    (precision, memory layout, compile, on a GPU or not)."""
    body = {k: v for k, v in spec.to_dict().items() if k not in ("name", "key")}
    return digest({"spec": body, "runs": {**res.teacher_options, "gpu": res.gpus_per_actor > 0}})


@dataclass(frozen=True)
class Fleet:
    """The fleet's actors by teacher identity (picklable: Tune hands it to every trial)."""

    actors: dict[str, list[ray.actor.ActorHandle]]
    names: dict[str, str]  # identity -> the teacher's name in the sweep's base config
    state: ray.actor.ActorHandle  # where the actors report their placement

    def actors_for(self, spec: TeacherSpec, res: PoolResources) -> list[ray.actor.ActorHandle] | None:
        """The fleet's actors that compute ``spec``'s targets as the trial would, or None."""
        return self.actors.get(teacher_identity(spec, res))

    def all(self) -> list[ray.actor.ActorHandle]:
        return [a for actors in self.actors.values() for a in actors]


def start_fleet(specs: list[TeacherSpec], res: PoolResources) -> Fleet:
    from simreg.orchestrator.pipeline.state import start_run_state

    by_id: dict[str, TeacherSpec] = {}
    for s in specs:  # two names for the same teacher: one set of actors serves both
        by_id.setdefault(teacher_identity(s, res), s)
    state = start_run_state()
    started = start_teachers(list(by_id.values()), state, res)
    return Fleet({i: started[s.name] for i, s in by_id.items()}, {i: s.name for i, s in by_id.items()}, state)


def fleet_stats(fleet: Fleet, timeout_s: float = 30.0) -> dict[str, dict[str, int]]:
    """Per teacher: rows computed, served by a cache, shared between trials, and forwards run, over its actors'
    lives (an actor restarted by Ray counts from its restart)."""
    out: dict[str, dict[str, int]] = {}
    for ident, actors in fleet.actors.items():
        total = {"forward": 0, "cached": 0, "shared": 0, "batches": 0}
        try:
            counts: list[dict[str, int]] = ray.get([a.stats.remote() for a in actors], timeout=timeout_s)
            for s in counts:
                for k in total:
                    total[k] += int(s.get(k, 0))
        except Exception as e:  # noqa: BLE001  (a dead actor: the sweep's results stand without its counts)
            log.warning("teacher fleet: no counts from %s (%s)", fleet.names[ident], first_line(e, 200))
            continue
        out[fleet.names[ident]] = total
    return out


def stop_fleet(fleet: Fleet, timeout_s: float = 60.0) -> None:
    stop_actors(fleet.state, fleet.all(), timeout_s)


def fleet_placements(fleet: Fleet) -> list[str]:
    try:
        polled: Any = ray.get(fleet.state.poll.remote(0, 0), timeout=10)
    except Exception:  # noqa: BLE001
        return []
    return list(polled[3])
