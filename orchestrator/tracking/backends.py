"""``backend_for(uri)``: the tracker implementation serving a tracking URI (the one place that chooses)."""
from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from simreg.models.errors import ConfigError
from simreg.orchestrator.storage import Store, open_store
from simreg.orchestrator.tracking.base import TrackerBackend
from simreg.orchestrator.tracking.mlflow_backend import MlflowBackend
from simreg.orchestrator.tracking.redact import redact_text


def backend_for(uri: str) -> TrackerBackend:
    """MLflow serves every URI today (sqlite, http(s), databricks); a new tracker is chosen here by scheme."""
    return MlflowBackend(uri)


def default_tracking_uri(output_dir: Store | Path) -> str:
    """A run folder's own store: ``sqlite:///<output_dir>/mlflow.db`` (artifacts in ``<output_dir>/mlartifacts``).
    An output folder in an object store cannot hold a sqlite file: such a run needs a tracking server."""
    out = open_store(output_dir)
    if out.local_path is None:
        raise ConfigError(
            f"--output-dir {out} is in an object store, where an MLflow sqlite file cannot live: give an MLflow server "
            "with --tracking-uri http://HOST:PORT (or tracking.tracking_uri=...)"
        )
    return f"sqlite:///{out.local_path / 'mlflow.db'}"


def check_tracking_uri(uri: str, timeout_s: float = 10.0) -> None:
    """A tracking server that does not answer fails here, in one line, before Ray starts (MLflow's own client
    would retry for minutes and end in a traceback)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"tracking URI {redact_text(uri)} has a bad port: write http://HOST:PORT (--tracking-uri / tracking.tracking_uri)") from None
    base = f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path.rstrip('/')}"
    req = urllib.request.Request(f"{base}/health")
    # the credentials MLflow's own client would send: user:password in the URI, or its environment variables
    user = parts.username if parts.username is not None else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = parts.password if parts.username is not None else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode())
    context = None
    if parts.scheme == "https":
        import ssl

        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()  # noqa: S323  (the user's own setting, as MLflow honours it)
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            context = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as r:  # noqa: S310  (the user's own server)
            r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConfigError(
                f"MLflow tracking server {redact_text(uri)} refused the credentials (HTTP {e.code}): fix the user:password in "
                "--tracking-uri / tracking.tracking_uri, or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
            ) from None
        if e.code != 404:  # a server without /health (behind a proxy that maps paths) still answers
            raise ConfigError(f"MLflow tracking server {redact_text(uri)} answered HTTP {e.code}: check that it is an MLflow server (--tracking-uri / tracking.tracking_uri)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(
            f"MLflow tracking server {redact_text(uri)} does not answer ({reason}): start it (mlflow server ...), or fix "
            "--tracking-uri / tracking.tracking_uri"
        ) from None
