"""``backend_for(uri)``: the tracker implementation serving a tracking URI (the one place that chooses)."""
from __future__ import annotations

from pathlib import Path

from simreg.orchestrator.tracking.base import TrackerBackend
from simreg.orchestrator.tracking.mlflow_backend import MlflowBackend


def backend_for(uri: str) -> TrackerBackend:
    """MLflow serves every URI today (sqlite, http(s), databricks); a new tracker is chosen here by scheme."""
    return MlflowBackend(uri)


def default_tracking_uri(output_dir: Path) -> str:
    """A run folder's own store: ``sqlite:///<output_dir>/mlflow.db`` (artifacts in ``<output_dir>/mlartifacts``)."""
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
