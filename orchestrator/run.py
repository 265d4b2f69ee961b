"""Building blocks shared by ``simreg distill`` and each sweep trial: data, teachers, placement, trainer.

prepare() needs no Ray; the rest build Ray objects.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from simreg.models.errors import ConfigError
from simreg.orchestrator.builders import (
    build_objective,
    cache_spec,
    shard_plan,
    teacher_options,
    teacher_specs,
    view_plan,
)
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.data import ImageSet, load_splits
from simreg.orchestrator.teacher_pool import TeacherSpec

log = logging.getLogger("simreg")


@dataclass(frozen=True)
class EvalSets:
    bank: ImageSet
    query: ImageSet


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs before Ray: the images, the k-NN sets and the checked teachers."""

    cfg: SimRegConfig
    train: ImageSet
    final_eval: EvalSets  # bank: train split, queries: the held-out split (reported)
    val: EvalSets | None  # bank and queries both from the train split (for model selection)
    specs: list[TeacherSpec]
    teacher_dims: dict[str, int]


def prepare(cfg: SimRegConfig, quiet: bool = False) -> Prepared:
    """Phases 1-2: load data and every teacher once, so a bad path or name fails before Ray starts."""
    train_full, held_out = load_splits(
        cfg.data.source, cfg.data.root, cfg.data.download, cfg.data.store_size, cfg.seed, cfg.data.holdout_fraction,
        lazy=cfg.data.source == "packed" and cfg.data.stream,
    )
    # A streamed pack: only the evaluation images are decoded here; the train images stay in their shards
    train = train_full.subset(cfg.data.train_size, cfg.seed)
    final = EvalSets(
        train_full.subset(cfg.data.knn_bank_size, cfg.seed + 1).materialized(),
        held_out.subset(cfg.data.knn_query_size, cfg.seed + 2).materialized(),
    )
    val = None
    if cfg.eval.val_every > 0:
        val = EvalSets(*(s.materialized() for s in train_full.split_two(cfg.eval.val_bank_size, cfg.eval.val_query_size, cfg.seed + 3)))
    if not quiet:
        log.info(
            "data: %s, %d images distilled on%s; k-NN bank %d, queries %d (%s)",
            train.name, len(train), " (streamed from the pack's shards)" if train.streamed else "",
            len(final.bank), len(final.query), held_out.name,
        )
    specs = teacher_specs(cfg)
    dims = {s.name: s.build().feature_dim for s in specs}
    build_objective(cfg, dims)  # fails early on an unknown student arch or a bad head design
    return Prepared(cfg, train, final, val, specs, dims)


@dataclass(frozen=True)
class Placement:
    has_gpu: bool
    use_gpu: bool
    teacher_gpus: float


def trial_cpus(cfg: SimRegConfig, placement: Placement) -> float:
    """CPUs one run holds at once: student workers + teacher actors + view-stage tasks in flight (an elastic
    run counts its minimum size: it starts with what the cluster has, down to that)."""
    tp = cfg.teacher_pool
    workers = 0.0 if placement.use_gpu else cfg.scaling.min_workers * cfg.scaling.cpus_per_worker
    return workers + len(cfg.teachers) * tp.actors_per_teacher * tp.cpus_per_actor + tp.view_tasks * tp.cpus_per_view_task


def trial_gpus(cfg: SimRegConfig, placement: Placement) -> float:
    """GPUs one run holds at once: student workers (when on GPU) + teacher actors."""
    workers = cfg.scaling.min_workers if placement.use_gpu else 0
    return workers + len(cfg.teachers) * cfg.teacher_pool.actors_per_teacher * placement.teacher_gpus


def resource_check(cfg: SimRegConfig, cluster: dict[str, float], placement: Placement) -> None:
    """Refuse a plan whose requests exceed the cluster: Ray Data would wait forever, silently."""
    cpus, need = cluster.get("CPU", 0.0), trial_cpus(cfg, placement)
    if need > cpus + 1e-9:
        tp = cfg.teacher_pool
        workers = "" if placement.use_gpu else (
            f"scaling.num_workers={cfg.scaling.min_workers} x scaling.cpus_per_worker={cfg.scaling.cpus_per_worker:g} + "
        )
        raise ConfigError(
            f"the plan needs {need:g} CPUs ({workers}{len(cfg.teachers)} teacher(s) x "
            f"teacher_pool.actors_per_teacher={tp.actors_per_teacher} x teacher_pool.cpus_per_actor={tp.cpus_per_actor:g} + "
            f"teacher_pool.view_tasks={tp.view_tasks} x teacher_pool.cpus_per_view_task={tp.cpus_per_view_task:g}) "
            f"but the Ray cluster has {cpus:g}: lower those keys or add CPUs (ray.num_cpus)"
        )
    gpus_needed = trial_gpus(cfg, placement)
    if gpus_needed > cluster.get("GPU", 0.0) + 1e-9:
        raise ConfigError(
            f"the plan needs {gpus_needed:g} GPU(s) (students + teacher actors) but the cluster has "
            f"{cluster.get('GPU', 0):g}: set scaling.use_gpu=false, teacher_pool.gpus_per_actor=0, or fewer workers"
        )
    custom_check(cfg, cluster)


def custom_check(cfg: SimRegConfig, cluster: dict[str, float]) -> None:
    """Refuse custom resources the cluster does not offer in the amount the plan needs (Ray would wait
    forever for them, as for CPUs)."""
    need: dict[str, list[tuple[float, str]]] = {}
    n_actors = len(cfg.teachers) * cfg.teacher_pool.actors_per_teacher
    for k, v in cfg.teacher_pool.resources.items():
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


def init_ray(cfg: SimRegConfig) -> dict[str, float]:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=cfg.ray.address, num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
            # The dashboard serves Ray's state API, which Ray Train polls; it binds to loopback only.
            dashboard_host="127.0.0.1", log_to_driver=True, logging_level=logging.WARNING,
            # Ray kills a worker process idle for 1 s once more processes than CPUs exist (always, with Train
            # and our actors); the view stage's task workers then die between epochs and every epoch paid
            # ~5 s to start and import torch in new ones. Keep idle workers for 10 minutes.
            _system_config={"idle_worker_killing_time_threshold_ms": 600_000} if cfg.ray.address is None else None,
        )
    return dict(ray.cluster_resources())


def plan_placement(cfg: SimRegConfig, cluster: dict[str, float], check: bool = True) -> Placement:
    has_gpu = cluster.get("GPU", 0.0) >= 1
    use_gpu = has_gpu if cfg.scaling.use_gpu == "auto" else bool(cfg.scaling.use_gpu)
    gpa = cfg.teacher_pool.gpus_per_actor
    teacher_gpus = (1.0 if has_gpu else 0.0) if gpa == "auto" else float(gpa)
    placement = Placement(has_gpu, use_gpu, teacher_gpus)
    if check:
        resource_check(cfg, cluster, placement)
    return placement


def make_trainer(prep: Prepared, placement: Placement, state: Any, run_config: Any) -> tuple[Any, list[Any]]:
    """Phase 3-4: the run-long teacher actors, the Ray Data pipeline (views -> targets) and the Ray Train V2
    TorchTrainer it feeds. Returns (trainer, teacher actors): the caller kills the actors when done."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from simreg.orchestrator.pipeline import PoolResources, build_train_dataset, start_teachers
    from simreg.orchestrator.worker import train_loop_per_worker

    cfg = prep.cfg
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver draws one bar per epoch
    tp = cfg.teacher_pool
    options = {**teacher_options(cfg, cache_spec(cfg, prep.train)), "compile": tp.compile}
    res = PoolResources(tp.actors_per_teacher, tp.cpus_per_actor, placement.teacher_gpus, tp.threads, tp.batch_size, options,
                        tp.view_tasks, tp.cpus_per_view_task, dict(tp.resources), dict(tp.label_selector), teacher_env(placement))
    teachers = start_teachers(prep.specs, state, res)
    dataset = build_train_dataset(prep.train, teachers, state, cfg.seed, view_plan(cfg), res)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": json.loads(cfg.model_dump_json()), "state": state, "teacher_dims": prep.teacher_dims,
            "n_train": len(prep.train), "val": prep.val,
        },
        scaling_config=scaling_config(cfg, placement),
        run_config=run_config,
        datasets={"train": dataset},
        # No shard locality: with it the split holds finished blocks back to match them to nodes, which
        # delayed every epoch's first batch by ~2 s here; our blocks are small and mostly node-local anyway.
        dataset_config=ray.train.DataConfig(enable_shard_locality=False),
    )
    return trainer, [a for actors in teachers.values() for a in actors]


def teacher_env(placement: Placement) -> dict[str, str]:
    """CPU teacher actors share cores with the student workers: OpenMP threads that spin after each parallel
    region (the default) burn the cores the students need. Passive waiting measured +10% images/s on 2
    cores (`benchmarks/pipeline_throughput.py`). A GPU teacher's host threads are left as they are."""
    return {"OMP_WAIT_POLICY": "PASSIVE"} if placement.teacher_gpus == 0 else {}


def scaling_config(cfg: SimRegConfig, placement: Placement) -> Any:
    """Ray Train's ScalingConfig: fixed N or elastic (min, max) workers, CPU or GPU, custom resources and
    node labels per worker."""
    from ray.train.v2.api.config import ScalingConfig  # what ray.train.ScalingConfig is under Train V2

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


def images_per_epoch(prep: Prepared) -> int:
    """Images of one epoch at the largest size (the progress bar's total)."""
    n = prep.cfg.scaling.max_workers
    rows, _, _ = shard_plan(len(prep.train), prep.cfg.train.batch_size, n)
    return rows * n
