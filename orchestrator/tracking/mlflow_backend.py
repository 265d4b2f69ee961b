"""The MLflow tracker: runs of ``simreg distill``, a sweep's parent run and its trials' child runs.

Default store: ``sqlite:///<output_dir>/mlflow.db`` with artifacts under ``<output_dir>/mlartifacts``
(MLflow's file store raises since 3.13, and its artifact root would default to ./mlruns of the cwd).
No run is left RUNNING: ``end`` closes it (the callers' ``finally``), a reaper process closes it as KILLED
if the driver dies first (tracking/reaper.py), and a rerun on the same output dir marks a run it finds
RUNNING as KILLED before resuming it (tags ``simreg.attempt``, ``simreg.previous_attempt_status``).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simreg.orchestrator import fence
from simreg.orchestrator.storage import Store, open_store
from simreg.orchestrator.tracking.base import REAPER_URI_ENV, ChildRun
from simreg.orchestrator.tracking.redact import install_redaction, redact, redact_text

log = logging.getLogger("simreg")
RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_LEN = 6000
DRIVER_TAG = "simreg.driver"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params not yet on the run (redacted, truncated to MLflow's limit), in batches of 100."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in redact(dict(params)).items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log metrics at ``step`` in batches of 500."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def spawn_reaper(run_id: str, tracking_uri: str, token: str) -> subprocess.Popen[bytes] | None:
    """Start the reaper (tracking/reaper.py) for the calling process; None where it cannot start (the run
    then relies on the next ``simreg`` on the same output folder to find it RUNNING and mark it)."""
    try:
        return subprocess.Popen(  # the URI (it may hold a password) goes by environment, not on the command line
            [sys.executable, "-m", "simreg.orchestrator.tracking.reaper", run_id, token, str(os.getpid())],
            env={**os.environ, REAPER_URI_ENV: tracking_uri},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    except OSError:
        return None


def mark_killed(client: Any, run_id: str, token: str | None, reason: str) -> list[str]:
    """End ``run_id`` and its RUNNING children as KILLED if still RUNNING (and still ours when ``token``
    is given). Returns the run ids it ended."""
    run = client.get_run(run_id)
    if run.info.status != "RUNNING" or (token is not None and run.data.tags.get(DRIVER_TAG) != token):
        return []
    ended = []
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'",
    )
    for child in children:
        client.set_tag(child.info.run_id, "simreg.end_reason", reason)
        client.set_terminated(child.info.run_id, status="KILLED")
        ended.append(child.info.run_id)
    client.set_tag(run_id, "simreg.end_reason", reason)
    client.set_terminated(run_id, status="KILLED")
    return [*ended, run_id]


class MlflowRun:
    """One open MLflow run (``RunTracker``)."""

    def __init__(self, client: Any, run_id: str, uri: str, resumed: bool = False, reaper: Any = None) -> None:
        self.client, self.run_id, self.uri, self.resumed = client, run_id, uri, resumed
        self._reaper = reaper

    # After the driver's stop was decided (fence.py) nothing more is logged: a run is ended KILLED by the driver
    # that owns it, and after a lost lease not at all (the driver that took the folder over owns it now).
    def log_params(self, params: Mapping[str, Any]) -> None:
        if fence.tracking_allowed():
            log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if fence.tracking_allowed():
            log_metrics(self.client, self.run_id, metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if fence.tracking_allowed():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not fence.tracking_allowed():
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def logged_steps(self, metric: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}

    def metric_names(self) -> set[str]:
        return set(self.client.get_run(self.run_id).data.metrics)

    def end(self, status: str = "FINISHED") -> None:
        """End the run as ``status``; a KILLED run's RUNNING child runs (a sweep's trials) end KILLED with it."""
        if not fence.tracking_allowed(ending=status == "KILLED"):
            log.info("MLflow run %s: left to the driver that took its folder over", self.run_id)
        else:
            if status == "KILLED":  # a stopped sweep: the trials it was running stop with it
                exp = self.client.get_run(self.run_id).info.experiment_id
                for child in self.client.search_runs(
                    [exp], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'",
                ):
                    self.client.set_terminated(child.info.run_id, status="KILLED")
            self.client.set_terminated(self.run_id, status=status)
        if self._reaper is not None:  # the run is ended: nothing left for the reaper to do
            self._reaper.terminate()
            self._reaper.wait(timeout=10)
            self._reaper = None


class MlflowBackend:
    """``TrackerBackend`` over one MLflow tracking URI (a sqlite file, or a tracking server)."""

    def __init__(self, tracking_uri: str) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # simreg's own `mlflow:` line says where the run is
        from mlflow.tracking import MlflowClient

        install_redaction()  # this process now holds a URI that may carry a secret: its log lines and tracebacks are redacted
        self.tracking_uri = tracking_uri
        self.uri = redact_text(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def _experiment_id(self, experiment: str, output_dir: Store) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return str(exp.experiment_id)
        local = output_dir.local_path
        artifact_root = (local / "mlartifacts").as_uri() if self.tracking_uri.startswith("sqlite:") and local is not None else None
        # a model-training experiment: MLflow's UI opens it on runs and charts, not on its GenAI view
        return str(self.client.create_experiment(experiment, artifact_location=artifact_root, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))

    def open_run(self, experiment: str, output_dir: Store | Path, run_name: str, tags: Mapping[str, str]) -> MlflowRun:
        from mlflow.entities import RunStatus

        output_dir = open_store(output_dir)
        exp_id = self._experiment_id(experiment, output_dir)
        id_file = output_dir / RUN_ID_FILE
        run_id, resumed, attempt = None, False, 1
        if id_file.is_file():
            run_id = id_file.read_text().strip()
            try:
                prev = self.client.get_run(run_id)
            except Exception:  # the store was replaced: start a new run
                prev = None
            if prev is not None:
                attempt = int(prev.data.tags.get("simreg.attempt", "1")) + 1
                if prev.info.status == "RUNNING":  # its driver died and no reaper ended it (e.g. the host went down)
                    mark_killed(self.client, run_id, None, "driver died; found RUNNING by the next driver")
                    log.warning("MLflow run %s was left RUNNING by a driver that died: marked KILLED, now resumed", run_id)
                self.client.set_tag(run_id, "simreg.previous_attempt_status", self.client.get_run(run_id).info.status)
                self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                resumed = True
                log.info("resuming MLflow run %s (attempt %d)", run_id, attempt)
        if not resumed:
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags)).info.run_id
            id_file.write_text(run_id)
        assert run_id is not None
        # Identifies this driver on the run: its reaper only ends the run while the tag still names it.
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.client.set_tag(run_id, "simreg.attempt", str(attempt))
        self.client.set_tag(run_id, DRIVER_TAG, token)
        return MlflowRun(self.client, run_id, self.uri, resumed, spawn_reaper(run_id, self.tracking_uri, token))

    def open_child(self, parent_run_id: str, run_name: str, tags: Mapping[str, str], run_id: str | None = None) -> MlflowRun:
        from mlflow.entities import RunStatus

        exp_id = self.client.get_run(parent_run_id).info.experiment_id
        if run_id is None and "simreg.trial_id" in tags:  # a driver that died between creating a trial's run and recording it
            found = self.client.search_runs(
                [exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`simreg.trial_id` = '{tags['simreg.trial_id']}'",
                max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id is not None:  # a resumed trial: same run, running again
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return MlflowRun(self.client, run_id, self.uri, resumed=True)
        run = self.client.create_run(exp_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id, **tags})
        return MlflowRun(self.client, run.info.run_id, self.uri)

    def attach(self, run_id: str) -> MlflowRun:
        return MlflowRun(self.client, run_id, self.uri, resumed=True)

    def parent_run(self, run_id: str) -> tuple[str, dict[str, str]]:
        run = self.client.get_run(run_id)
        return str(run.info.run_name), dict(run.data.params)

    def child_runs(self, parent_run_id: str) -> list[ChildRun]:
        exp_id = self.client.get_run(parent_run_id).info.experiment_id
        found = self.client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)
        return [
            ChildRun(
                trial_id=c.data.tags.get("simreg.trial_id", c.info.run_id), run_id=c.info.run_id, params=dict(c.data.params),
                metrics={k.removeprefix("val/"): v for k, v in c.data.metrics.items() if k in ("val/top1_1nn", "val/top1_20nn")},
                status=c.info.status, fate=c.data.tags.get("simreg.trial_fate", "running"),
                last_epoch=len(self.client.get_metric_history(c.info.run_id, "train/loss")) - 1,
            )
            for c in found
        ]

    def mark_killed(self, run_id: str, token: str | None, reason: str) -> list[str]:
        return mark_killed(self.client, run_id, token, reason)

    def register_model(self, name: str, run_id: str, folder: Path, tags: Mapping[str, str]) -> str:
        fence.check(f"model {name}")
        self.client.log_artifacts(run_id, str(folder), folder.name)
        try:
            self.client.get_registered_model(name)
        except Exception:  # noqa: BLE001  (MLflow raises RESOURCE_DOES_NOT_EXIST as a generic MlflowException)
            self.client.create_registered_model(name, description="SimReg students distilled by simreg (one version per sweep)")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{folder.name}"
        version = self.client.create_model_version(name, source, run_id=run_id, tags=dict(tags))
        return str(version.version)
