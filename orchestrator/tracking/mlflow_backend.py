"""MLflow tracking from the driver only (workers never write): one run per ``simreg distill``.

Default store: ``sqlite:///<output_dir>/mlflow.db`` with artifacts under ``<output_dir>/mlartifacts``
(MLflow's file store raises since 3.13, and its artifact root would default to ./mlruns of the cwd).
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from simreg.orchestrator.tracking.reaper import DRIVER_TAG
from simreg.orchestrator.tracking.reaper import spawn as spawn_reaper
from simreg.orchestrator.tracking.redact import redact

log = logging.getLogger("simreg")
RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_LEN = 6000


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run (redacted, truncated to MLflow's limit), in batches of 100."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in redact(params).items() if k not in existing]
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
    """A thin wrapper over ``MlflowClient`` holding one run; reuses the run of a resumed output dir.

    No run is left RUNNING: ``end`` closes it (the callers' ``finally``), a reaper process closes it as
    KILLED if the driver dies first (``simreg.orchestrator.tracking.reaper``), and a rerun on the same output dir
    marks a run it finds RUNNING as KILLED before resuming it (tags ``simreg.attempt``,
    ``simreg.previous_attempt_status``)."""

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
        # Identifies this driver on the run: its reaper only ends the run while the tag still names it.
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        attempt = 1
        if id_file.is_file():
            run_id = id_file.read_text().strip()
            try:
                prev = self.client.get_run(run_id)
            except Exception:  # the store was replaced: start a new run
                prev = None
            if prev is not None:
                attempt = int(prev.data.tags.get("simreg.attempt", "1")) + 1
                if prev.info.status == "RUNNING":  # its driver died and no reaper ended it (e.g. the host went down)
                    from simreg.orchestrator.tracking.reaper import mark_killed

                    mark_killed(self.client, run_id, None, "driver died; found RUNNING by the next driver")
                    log.warning("MLflow run %s was left RUNNING by a driver that died: marked KILLED, now resumed", run_id)
                self.client.set_tag(run_id, "simreg.previous_attempt_status", self.client.get_run(run_id).info.status)
                self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                self.run_id, self.resumed = run_id, True
                log.info("resuming MLflow run %s (attempt %d)", run_id, attempt)
        if not self.resumed:
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            id_file.write_text(self.run_id)
        self.client.set_tag(self.run_id, "simreg.attempt", str(attempt))
        self.client.set_tag(self.run_id, DRIVER_TAG, self.token)
        self._reaper = spawn_reaper(self.run_id, tracking_uri, self.token)

    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def log_missing_epochs(self, history: list[dict[str, float]]) -> None:
        """Log the epochs of ``history`` the run does not hold yet (by ``train/loss`` step)."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "train/loss")}
        for m in history:
            if int(m["epoch"]) not in logged:
                self.log_metrics(m, step=int(m["epoch"]))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
        if self._reaper is not None:  # the run is ended: nothing left for the reaper to do
            self._reaper.terminate()
            self._reaper.wait(timeout=10)
            self._reaper = None
