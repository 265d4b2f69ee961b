"""Where a run's pieces go and whether the cluster holds them: CPU/GPU placement, the resource rule
(checked before Ray Data would wait forever), Ray Train's scaling and failure configs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from simreg.models.errors import ConfigError
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.ray_compat import scaling_config_class

log = logging.getLogger("simreg")


@dataclass(frozen=True)
class Placement:
    has_gpu: bool
    use_gpu: bool
    teacher_gpus: float


def teacher_cpus(cfg: SimRegConfig) -> float:
    """CPUs the teacher actors hold (a run's own, or a sweep's fleet)."""
    tp = cfg.teacher_pool
    return len(cfg.teachers) * tp.actors_per_teacher * tp.cpus_per_actor


def teacher_gpus(cfg: SimRegConfig, placement: Placement) -> float:
    return len(cfg.teachers) * cfg.teacher_pool.actors_per_teacher * placement.teacher_gpus


def trial_cpus(cfg: SimRegConfig, placement: Placement, teachers: bool = True, views: bool = True) -> float:
    """CPUs one run holds at once: student workers + teacher actors (``teachers=False``: a sweep trial served by
    the fleet) + view-stage tasks in flight (``views=False``: every target cached, no view stage) (an elastic run
    counts its minimum size: it starts with what the cluster has, down to that)."""
    tp = cfg.teacher_pool
    workers = 0.0 if placement.use_gpu else cfg.scaling.min_workers * cfg.scaling.cpus_per_worker
    return workers + (teacher_cpus(cfg) if teachers else 0.0) + (tp.view_tasks * tp.cpus_per_view_task if views else 0.0)


def trial_gpus(cfg: SimRegConfig, placement: Placement, teachers: bool = True) -> float:
    """GPUs one run holds at once: student workers (when on GPU) + teacher actors (unless a fleet serves it)."""
    workers = cfg.scaling.min_workers if placement.use_gpu else 0
    return workers + (teacher_gpus(cfg, placement) if teachers else 0.0)


def concurrent_trials(
    cfg: SimRegConfig, cluster: dict[str, float], placement: Placement, fleet: bool, trial_teachers: bool | None = None,
    cached: bool = False,
) -> tuple[int, float]:
    """(trials a sweep runs at once, CPUs each holds). With a teacher fleet the teachers hold their CPUs and GPUs
    once and a trial only its student workers and view tasks (and Tune's 0.01 CPU); without, each trial holds
    its own teachers too (``trial_teachers``: also beside a fleet, when trials may need teachers it does not run).
    ``cached``: every trial's targets are in the cache: no fleet, and a trial holds its student workers only.
    At least one: the resource check has made sure one trial fits beside the fleet."""
    own = False if cached else (not fleet) if trial_teachers is None else trial_teachers
    per_trial = trial_cpus(cfg, placement, teachers=own, views=not cached) + 0.01
    fit_cpu = math.floor((cluster.get("CPU", 1.0) - (teacher_cpus(cfg) if fleet else 0.0)) / per_trial)
    gpu_per_trial = trial_gpus(cfg, placement, teachers=own)
    free_gpus = cluster.get("GPU", 0.0) - (teacher_gpus(cfg, placement) if fleet else 0.0)
    fit_gpu = math.floor(free_gpus / gpu_per_trial) if gpu_per_trial else fit_cpu
    return max(1, min(fit_cpu, fit_gpu)), per_trial


def resource_check(cfg: SimRegConfig, cluster: dict[str, float], placement: Placement, cached: bool = False) -> None:
    """Refuse a plan whose requests exceed the cluster: Ray Data would wait forever, silently. ``cached``: every
    target of the run is in the cache (``train/cached_data.py``): it starts no teacher actor and no view task, so
    only its student workers count."""
    cpus = cluster.get("CPU", 0.0)
    need = trial_cpus(cfg, placement, teachers=not cached, views=not cached)
    if need > cpus + 1e-9:
        tp = cfg.teacher_pool
        workers = f"scaling.num_workers={cfg.scaling.min_workers} x scaling.cpus_per_worker={cfg.scaling.cpus_per_worker:g}"
        pipeline = "" if cached else (
            f"{len(cfg.teachers)} teacher(s) x teacher_pool.actors_per_teacher={tp.actors_per_teacher} x "
            f"teacher_pool.cpus_per_actor={tp.cpus_per_actor:g} + "
            f"teacher_pool.view_tasks={tp.view_tasks} x teacher_pool.cpus_per_view_task={tp.cpus_per_view_task:g}"
        )
        parts = " + ".join(p for p in ("" if placement.use_gpu else workers, pipeline) if p)
        raise ConfigError(
            f"the plan needs {need:g} CPUs ({parts}) but the Ray cluster has {cpus:g}: lower those keys or add CPUs (ray.num_cpus)"
        )
    gpus_needed = trial_gpus(cfg, placement, teachers=not cached)
    if gpus_needed > cluster.get("GPU", 0.0) + 1e-9:
        # every target cached: no teacher runs (and gpus_per_actor=0 would key the fp32 targets, not those cached)
        who, keys = ("students", "scaling.use_gpu=false or fewer workers") if cached else (
            "students + teacher actors", "scaling.use_gpu=false, teacher_pool.gpus_per_actor=0, or fewer workers")
        raise ConfigError(f"the plan needs {gpus_needed:g} GPU(s) ({who}) but the cluster has {cluster.get('GPU', 0):g}: set {keys}")
    custom_check(cfg, cluster, teachers=not cached)


def custom_check(cfg: SimRegConfig, cluster: dict[str, float], teachers: bool = True) -> None:
    """Refuse custom resources the cluster does not offer in the amount the plan needs (Ray would wait
    forever for them, as for CPUs). ``teachers=False``: the run starts no teacher actor (every target cached)."""
    need: dict[str, list[tuple[float, str]]] = {}
    n_actors = len(cfg.teachers) * cfg.teacher_pool.actors_per_teacher
    for k, v in cfg.teacher_pool.resources.items() if teachers else ():
        need.setdefault(k, []).append((v * n_actors, f"{n_actors} teacher actor(s) x teacher_pool.resources.{k}={v:g}"))
    for k, v in cfg.scaling.resources.items():
        n = cfg.scaling.min_workers
        need.setdefault(k, []).append((v * n, f"{n} student worker(s) x scaling.resources.{k}={v:g}"))
    problems = []
    for k, parts in need.items():
        total = sum(p[0] for p in parts)
        if total > cluster.get(k, 0.0) + 1e-9:
            problems.append(f"{total:g} {k!r} ({' + '.join(p[1] for p in parts)}) but the cluster offers {cluster.get(k, 0.0):g}")
    if problems:
        raise ConfigError(
            "the plan needs custom resources the Ray cluster lacks: " + "; ".join(problems)
            + ". Start the nodes with them (ray start --resources='{\"NAME\": N}') or change those keys"
        )


def plan_placement(cfg: SimRegConfig, cluster: dict[str, float], check: bool = True) -> Placement:
    has_gpu = cluster.get("GPU", 0.0) >= 1
    use_gpu = has_gpu if cfg.scaling.use_gpu == "auto" else bool(cfg.scaling.use_gpu)
    gpa = cfg.teacher_pool.gpus_per_actor
    teacher_gpus = (1.0 if has_gpu else 0.0) if gpa == "auto" else float(gpa)
    placement = Placement(has_gpu, use_gpu, teacher_gpus)
    if check:
        resource_check(cfg, cluster, placement)
    return placement


def scaling_config(cfg: SimRegConfig, placement: Placement) -> Any:
    """Ray Train's ScalingConfig: fixed N or elastic (min, max) workers, CPU or GPU, custom resources and
    node labels per worker."""
    ScalingConfig = scaling_config_class()  # noqa: N806
    sc = cfg.scaling
    per_worker: dict[str, float] = {"GPU": 1.0} if placement.use_gpu else {"CPU": sc.cpus_per_worker}
    per_worker.update(sc.resources)
    return ScalingConfig(
        num_workers=sc.num_workers if isinstance(sc.num_workers, int) else (sc.min_workers, sc.max_workers),
        use_gpu=placement.use_gpu, resources_per_worker=per_worker,
        label_selector=dict(sc.label_selector) or None, elastic_resize_monitor_interval_s=sc.resize_interval_s,
    )


def failure_config(cfg: SimRegConfig) -> Any:
    import ray.train

    return ray.train.FailureConfig(max_failures=cfg.scaling.max_failures)
