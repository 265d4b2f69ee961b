"""Ray itself and the wiring of one run: teacher actors, the Ray Data pipeline and the TorchTrainer it feeds.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simreg.orchestrator import console, fence
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.ray_compat import LOCAL_SYSTEM_CONFIG, train_controller_runtime_env
from simreg.orchestrator.tracking.redact import redact_tree
from simreg.orchestrator.train.builders import (
    requester,
    shard_plan,
    teacher_options,
    view_plan,
)
from simreg.orchestrator.train.placement import Placement, scaling_config
from simreg.orchestrator.train.prepare import Prepared
from simreg.orchestrator.train.target_stats import maps_payload

if TYPE_CHECKING:
    from simreg.orchestrator.train.cached_data import CachedSource

log = logging.getLogger("simreg")


def init_ray(cfg: SimRegConfig) -> dict[str, float]:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=cfg.ray.address, num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
            object_store_memory=cfg.ray.object_store_mib << 20 if cfg.ray.address is None and cfg.ray.object_store_mib else None,
            # The dashboard serves Ray's state API, which Ray Train polls; it binds to loopback only.
            # Ray's processes' own lines (Dataset execution plans, deprecations, ...) reach this console only
            # with --verbose; they always go to Ray's log files (/tmp/ray/session_latest/logs)
            dashboard_host="127.0.0.1", log_to_driver=console.verbose(), logging_level=console.ray_logging_level(),
            # idle workers kept for 10 minutes (see ray_compat.LOCAL_SYSTEM_CONFIG)
            _system_config=dict(LOCAL_SYSTEM_CONFIG) if cfg.ray.address is None else None,
        )
        private_token_file()
        fence.reinstall()  # ray.init makes SIGTERM sys.exit(): it stops the driver as Ctrl-C does instead
    return dict(ray.cluster_resources())


def private_token_file() -> None:
    """Ray's token file readable by its owner only. ``ray.init`` creates ``~/.ray/auth_token`` (or
    ``$RAY_AUTH_TOKEN_PATH``) with the default umask, world-readable, and the token opens the cluster."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
    except OSError:  # no token (auth disabled), or not ours to change
        pass


def pool_resources(cfg: SimRegConfig, placement: Placement) -> Any:
    """The teacher actors' and view tasks' resources and options (``pipeline.actors.PoolResources``)."""
    from simreg.orchestrator.pipeline.actors import PoolResources

    tp = cfg.teacher_pool
    # a teacher actor without a GPU of its own runs on the CPU, even where the node has GPUs (Ray shows an actor
    # with num_gpus=0 every GPU): its targets are then the fp32 ones its cache key says
    options = {k: v for k, v in teacher_options(cfg).items() if k != "cache"}  # caches come with each request
    options |= {"compile": tp.compile, "device": "cpu" if placement.teacher_gpus == 0 else "auto"}
    return PoolResources(tp.actors_per_teacher, tp.cpus_per_actor, placement.teacher_gpus, tp.threads, tp.batch_size, options,
                         tp.view_tasks, tp.cpus_per_view_task, dict(tp.resources), dict(tp.label_selector), teacher_env(placement),
                         tp.max_restarts, tp.call_timeout_s, tp.batch_wait_ms)


def make_trainer(
    prep: Prepared, placement: Placement, state: Any, cached: CachedSource | None, run_config: Any, fleet: Any = None,
    lease: dict[str, str] | None = None,
) -> tuple[Any, list[Any]]:
    """Phase 3-4: the teacher actors (the run's own, or those of a sweep's ``fleet`` that serve its teachers), the
    Ray Data pipeline (views -> targets) and the Ray Train V2 TorchTrainer it feeds. Returns (trainer, the run's
    own teacher actors): the caller kills those when done (a fleet outlives its trials). A run whose every target
    is in the cache (``cached``, from ``cached_data.cached_source``) runs neither: its workers render their views
    and read the targets. ``lease``: the run folder's lease (``FolderLock.token``), checked by the workers before
    each checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from simreg.orchestrator.pipeline.actors import start_teachers
    from simreg.orchestrator.pipeline.dataset import build_train_dataset
    from simreg.orchestrator.pipeline.warmup import ViewWarmup
    from simreg.orchestrator.train.worker import train_loop_per_worker

    cfg = prep.cfg
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver draws one bar per epoch
    res = pool_resources(cfg, placement)
    own: list[Any] = []
    datasets = None
    if cached is not None:
        state.note_placement.remote(f"target cache: every target of this run is cached ({', '.join(cached.targets)}); the student "
                                    "workers render their views and read the targets (no teacher actor, no view task)")
    else:
        served = {s.name: fleet.actors_for(s, res) for s in prep.specs} if fleet is not None else {}
        teachers = start_teachers([s for s in prep.specs if served.get(s.name) is None], state, res)
        own = [a for actors in teachers.values() for a in actors]
        teachers.update({name: actors for name, actors in served.items() if actors is not None})
        datasets = {"train": build_train_dataset(prep.train, teachers, state, cfg.seed, view_plan(cfg), res, requester(cfg, prep.train))}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            # redacted: Ray Train keeps this in its run state (the dashboard shows it); workers need no tracking secret
            "cfg": redact_tree(json.loads(cfg.model_dump_json())), "state": state, "teacher_dims": prep.teacher_dims,
            "target_maps": maps_payload(prep.target_maps),  # teachers[i].normalize: float32 maps
            "n_train": len(prep.train), "val": prep.val,
            # an object store: the checkpoint uploads while the next epoch trains (a local copy is quick)
            "async_checkpoint": getattr(run_config, "storage_filesystem", None) is not None,
            "view_warmup": ViewWarmup(res.view_tasks, res.cpus_per_view_task, train_controller_runtime_env()) if cached is None else None,
            "cached": cached,
            "lease": lease,
        },
        scaling_config=scaling_config(cfg, placement),
        run_config=run_config,
        datasets=datasets,
        # No shard locality: with it the split holds finished blocks back to match them to nodes, which
        # delayed every epoch's first batch by ~2 s here; our blocks are small and mostly node-local anyway.
        dataset_config=ray.train.DataConfig(enable_shard_locality=False),
    )
    return trainer, own


def teacher_env(placement: Placement) -> dict[str, str]:
    """CPU teacher actors share cores with the student workers: OpenMP threads that spin after each parallel
    region (the default) burn the cores the students need. Passive waiting measured +10% images/s on 2
    cores (`benchmarks/pipeline_throughput.py`). A GPU teacher's host threads are left as they are."""
    return {"OMP_WAIT_POLICY": "PASSIVE"} if placement.teacher_gpus == 0 else {}


def images_per_epoch(prep: Prepared) -> int:
    """Images of one epoch at the largest size (the progress bar's total)."""
    n = prep.cfg.scaling.max_workers
    rows, _, _ = shard_plan(len(prep.train), prep.cfg.train.batch_size, n)
    return rows * n
