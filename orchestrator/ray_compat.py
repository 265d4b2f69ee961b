"""Every private Ray API (and every Ray file format) the project relies on, in one place.

Ray is pinned to the minor version these are tested with (pyproject.toml: ``ray>=2.60,<2.61``). On an
upgrade, this module and the integration tests are what to check.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

TESTED_RAY = "2.60"

# Ray kills a worker process idle for 1 s once more processes than CPUs exist (always, with Train and our
# actors); the view stage's task workers then died between epochs and every epoch paid ~5 s to start and
# import torch in new ones. A cluster simreg starts keeps idle workers for 10 minutes (``_system_config``,
# private; on a `ray start` cluster set RAY_idle_worker_killing_time_threshold_ms=600000 instead).
LOCAL_SYSTEM_CONFIG: dict[str, Any] = {"idle_worker_killing_time_threshold_ms": 600_000}


def quiet_train_report_log() -> None:
    """Ray Train V2 logs every report with its whole metrics dict at INFO, on every rank, under a logger named
    by its file path (private: ``ray.train.v2._internal``; ``LoggingConfig`` does not reach it)."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logging as it is
        pass


def scaling_config_class() -> Any:
    """Train V2's ScalingConfig (what ``ray.train.ScalingConfig`` is under V2; elastic ``(min, max)`` workers)."""
    from ray.train.v2.api.config import ScalingConfig

    return ScalingConfig


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's own record of registered checkpoints


def registered_checkpoints(storage: Path) -> list[str]:
    """Names of the checkpoint folders Ray Train has registered under a run's ``storage_path/name``: its
    checkpoint manager snapshot (a private file format) names them once they are persisted."""
    try:
        text = (storage / CHECKPOINT_SNAPSHOT).read_text()
    except OSError:
        return []
    return re.findall(r"epoch_\d{4,}", text)


def train_controller_runtime_env() -> dict[str, Any] | None:
    """The runtime environment Ray Train V2 gives its controller, and so the Ray Data tasks it runs (children inherit
    it): Ray reuses an idle worker process only for the same environment. None in another Ray layout."""
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            get_env_vars_to_propagate,
        )
    except ImportError:
        return None
    env = dict(get_env_vars_to_propagate())
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return {"env_vars": env}


def keep_sigint_handler(trainer: Any) -> list[Any]:
    """Keep Ray Train V2's SIGINT handler out of a driver (private: ``_register_sigint_handler``): it aborts the
    controller and calls ``sys.exit(0)``, so a stopped distill would exit 0. simreg's own handler (fence.py)
    stays in place; the returned list receives the run's controller, for ``abort_controller`` on a stop."""
    controllers: list[Any] = []
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = controllers.append
    else:  # another Ray layout: its handler may exit 0 on Ctrl-C
        logging.getLogger("simreg").warning("this Ray (tested: %s) has no TorchTrainer._register_sigint_handler: Ctrl-C during "
                                            "training may end the command with status 0", TESTED_RAY)
    return controllers


def abort_controller(controllers: list[Any], timeout_s: float = 10.0) -> None:
    """Abort a stopped driver's Train run: its workers stop training and writing checkpoints now, not when the
    driver's process ends (Train V2's controller ``abort``; killed when it does not answer in time)."""
    import ray

    for controller in controllers:
        try:
            ray.get(controller.abort.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001  (gone already, or hung: killed below)
            pass
        try:
            ray.kill(controller)
        except Exception:  # noqa: BLE001
            pass


def fence_tune_state(check: Any) -> None:
    """Call ``check()`` before each save of Tune's experiment state by this driver (private:
    ``TuneController.checkpoint``, which writes the state and starts its upload): a stopped driver, or one
    whose folder lease ran out, saves none (``check`` raises). Idempotent."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController.checkpoint
    if getattr(original, "_simreg_fenced", False):
        return

    def checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        check()
        return original(self, *args, **kwargs)

    checkpoint._simreg_fenced = True  # type: ignore[attr-defined]
    TuneController.checkpoint = checkpoint  # type: ignore[method-assign]
