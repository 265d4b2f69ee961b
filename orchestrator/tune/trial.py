"""One sweep trial, run by Tune in a function trainable: a TorchTrainer with ``TuneReportCallback``.
"""
from __future__ import annotations

import logging
from typing import Any

from ray import tune

from simreg.orchestrator.tune.space import trial_config

log = logging.getLogger("simreg")


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], keys: list[str], storage: str, fleet: Any = None, cached: Any = None,
    lease: dict[str, str] | None = None,
) -> None:
    """One trial: its config, its own RunState, the sweep's teacher ``fleet`` (None: its own teacher actors), the
    sweep's ``cached`` targets (a ``CachedSource`` every trial of the sweep trains from; None: the trial looks in
    the cache itself), the sweep folder's ``lease`` (its workers check it before each checkpoint)."""
    import ray
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from simreg.orchestrator.pipeline.actors import stop_actors
    from simreg.orchestrator.pipeline.state import start_run_state
    from simreg.orchestrator.storage import open_store
    from simreg.orchestrator.train.cached_data import cached_source
    from simreg.orchestrator.train.distill import fit
    from simreg.orchestrator.train.placement import failure_config, plan_placement
    from simreg.orchestrator.train.prepare import prepare
    from simreg.orchestrator.train.trainer import make_trainer

    cfg = trial_config(base, {k: config[k] for k in keys})
    prep = prepare(cfg, quiet=True)
    placement = plan_placement(cfg, dict(ray.cluster_resources()), check=False)
    state = start_run_state()
    trial_id = tune.get_context().get_trial_id()
    actors: list[Any] = []
    try:
        storage_path, storage_fs = open_store(storage).ray_storage()  # a folder or an object-store URI
        if cached is None:
            cached = cached_source(cfg, prep.train, prep.specs, prep.teacher_dims, placement.teacher_gpus)
        trainer, actors = make_trainer(prep, placement, state, cached, ray.train.RunConfig(
            name=f"trial_{trial_id}", storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1), failure_config=failure_config(cfg),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ), fleet=fleet, lease=lease)
        fit(trainer, state)
    finally:
        stop_actors(state, actors)
