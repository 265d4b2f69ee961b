"""The tracker seam: what distill, sweep, compare and the reaper ask of an experiment tracker.

``tracking/backends.py::backend_for(uri)`` picks the implementation; MLflow (tracking/mlflow_backend.py)
serves every URI it understands (``sqlite:///...``, ``http(s)://...``, ``databricks``). A new tracker
implements the two protocols below and is chosen in ``backend_for``. Only the driver process writes (workers report to it).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
REAPER_URI_ENV = "SIMREG_REAPER_TRACKING_URI"  # the reaper's tracking URI, in its environment (tracking/reaper.py)
# A sweep's tracking URI, in the driver's environment while Tune runs: never in Tune's pickled experiment state
TRACKING_URI_ENV = "SIMREG_TRACKING_URI"


class RunTracker(Protocol):
    """One open run: a ``simreg distill``, a sweep's parent run, or one trial's child run."""

    run_id: str
    uri: str  # where the run is stored, secrets redacted (for messages and summaries)
    resumed: bool  # an existing run reopened (a rerun of an interrupted output folder, a resumed trial)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params not yet on the run (redacted; existing ones are kept)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def logged_steps(self, metric: str) -> set[int]:
        """Steps at which ``metric`` is already logged (a resumed run logs the missing epochs only)."""

    def metric_names(self) -> set[str]:
        """The metrics the run holds (each with its latest value)."""

    def end(self, status: str) -> None:
        """Close the run with one of ``RUN_STATUSES``."""


@dataclass
class ChildRun:
    """A sweep trial's run as ``simreg compare`` reads it."""

    trial_id: str
    run_id: str
    params: dict[str, Any]
    metrics: dict[str, float]  # final validation k-NN: top1_1nn, top1_20nn
    status: str
    fate: str
    last_epoch: int
    extra: dict[str, Any] = field(default_factory=dict)


class TrackerBackend(Protocol):
    """Opens runs in one store."""

    uri: str  # redacted

    def open_run(self, experiment: str, output_dir: Any, run_name: str, tags: Mapping[str, str]) -> RunTracker:
        """The run of ``output_dir`` (a ``storage.Store`` or a local path): reopened when the folder names one (a resume), else created. A driver
        that dies without ending it gets it ended KILLED (the reaper)."""

    def open_child(self, parent_run_id: str, run_name: str, tags: Mapping[str, str], run_id: str | None = None) -> RunTracker:
        """A child run of ``parent_run_id`` (a sweep trial); ``run_id`` reopens that child, and so does a ``simreg.trial_id`` tag
        that a child already carries (its driver died before recording the run: one run per trial still)."""

    def attach(self, run_id: str) -> RunTracker:
        """An existing run as it is (no status change): to log to it or end it."""

    def parent_run(self, run_id: str) -> tuple[str, dict[str, str]]:
        """(run name, params) of a sweep's parent run."""

    def child_runs(self, parent_run_id: str) -> list[ChildRun]: ...

    def mark_killed(self, run_id: str, token: str | None, reason: str) -> list[str]:
        """End a RUNNING run (and its RUNNING children) as KILLED, if still owned by ``token``."""

    def register_model(self, name: str, run_id: str, folder: Path, tags: Mapping[str, str]) -> str:
        """Log ``folder`` (an exported model) as artifacts of ``run_id`` and register it as a new version of
        model ``name``; returns the version."""
