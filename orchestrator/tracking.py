"""MLflow tracking from the driver only (workers never write): one run per ``simreg distill``.

Default store: ``sqlite:///<output_dir>/mlflow.db`` with artifacts under ``<output_dir>/mlartifacts``
(MLflow's file store raises since 3.13, and its artifact root would default to ./mlruns of the cwd).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("simreg")
RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_LEN = 6000


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run, truncated to MLflow's limit, in batches of 100."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log metrics at ``step`` in batches of 500."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


class Tracker:
    """A thin wrapper over ``MlflowClient`` holding one run; reuses the run of a resumed output dir."""

    def __init__(self, tracking_uri: str, experiment: str, output_dir: Path, run_name: str, tags: dict[str, str]) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_root = None
            if tracking_uri.startswith("sqlite:"):
                artifact_root = (output_dir / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
        else:
            exp_id = exp.experiment_id
        id_file = output_dir / RUN_ID_FILE
        self.resumed = False
        if id_file.is_file():
            run_id = id_file.read_text().strip()
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                self.run_id, self.resumed = run_id, True
                log.info("resuming MLflow run %s", run_id)
            except Exception:  # the store was replaced: start a new run
                self.run_id = ""
        if not self.resumed:
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            id_file.write_text(self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
