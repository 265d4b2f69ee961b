"""One sweep trial, run by Tune in a function trainable: a TorchTrainer with ``TuneReportCallback``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ray import tune

from simreg.orchestrator.tune.space import trial_config

if TYPE_CHECKING:
    from simreg.orchestrator.config import SimRegConfig
    from simreg.orchestrator.train.cached_data import CachedSource

log = logging.getLogger("simreg")


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], keys: list[str], storage: str, fleet: Any = None, cached: Any = None,
    lease: dict[str, str] | None = None, driver_cluster: dict[str, float] | None = None,
) -> None:
    """One trial: its config, its own RunState, the sweep's teacher ``fleet`` (None: its own teacher actors), the
    sweep's ``cached`` targets (a ``CachedSource`` every trial of the sweep trains from; None: the trial looks in
    the cache itself), the sweep folder's ``lease`` (its workers check it before each checkpoint), the
    ``driver_cluster`` the driver read the shared targets on (the trial's identity is taken on it too: a node that
    joined since changes nothing)."""
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
    cluster = dict(ray.cluster_resources())
    placement = plan_placement(cfg, cluster, check=False)
    state = start_run_state()
    trial_id = tune.get_context().get_trial_id()
    actors: list[Any] = []
    try:
        storage_path, storage_fs = open_store(storage).ray_storage()  # a folder or an object-store URI
        if cached is not None and not usable_shared(cached, cfg, driver_cluster or cluster):
            log.warning("trial %s: the sweep's shared cached targets were read for other data, views or teachers than this "
                        "trial's config: it reads its own", trial_id)
            cached = None
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


def usable_shared(cached: CachedSource, cfg: SimRegConfig, cluster: dict[str, float]) -> bool:
    """Whether the sweep's shared targets are this trial's own: read for a config with the trial's
    ``cached_identity`` (else the trial would regress its views onto other views' targets, without an error)."""
    from simreg.orchestrator.train.cached_data import cached_identity

    return cached.identity == cached_identity(cfg, cluster)
