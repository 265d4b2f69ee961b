"""Marks a driver's MLflow run KILLED when the driver dies without ending it (SIGKILL, OOM killer, a lost
node), so no run is left RUNNING forever.

The driver starts ``python -m simreg.orchestrator.tracking.reaper RUN_ID TOKEN PARENT_PID`` (the tracking URI in
its environment, not on a command line others can read) as a child in its own session; the child sleeps
until its parent is gone (its parent pid changes: no pid-reuse race), then ends the run and its RUNNING
child runs (a sweep's trials) as KILLED, unless the run was ended normally or a newer driver took it over
(its ``simreg.driver`` tag no longer holds TOKEN). A driver that ends normally stops its reaper first.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

DRIVER_TAG = "simreg.driver"
URI_ENV = "SIMREG_REAPER_TRACKING_URI"


def spawn(run_id: str, tracking_uri: str, token: str) -> subprocess.Popen[bytes] | None:
    """Start the reaper for the calling process; None where it cannot start (the run then relies on the
    next ``simreg`` on the same output folder to find it RUNNING and mark it)."""
    try:
        return subprocess.Popen(  # the URI (it may hold a password) goes by environment, not on the command line
            [sys.executable, "-m", "simreg.orchestrator.tracking.reaper", run_id, token, str(os.getpid())],
            env={**os.environ, URI_ENV: tracking_uri},
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


def main(argv: list[str]) -> int:
    run_id, token, parent = argv[0], argv[1], int(argv[2])
    uri = os.environ[URI_ENV]
    while os.getppid() == parent:
        time.sleep(0.5)
    from mlflow.tracking import MlflowClient

    for _ in range(5):  # the store may be busy (sqlite lock) right when the driver dies
        try:
            mark_killed(MlflowClient(tracking_uri=uri), run_id, token, "driver process died")
            return 0
        except Exception:
            time.sleep(1)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
