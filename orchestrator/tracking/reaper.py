"""Marks a driver's run KILLED when the driver dies without ending it (SIGKILL, OOM killer, a lost
node), so no run is left RUNNING forever.

The driver starts ``python -m simreg.orchestrator.tracking.reaper RUN_ID TOKEN PARENT_PID`` (the tracking
URI in its environment, not on a command line others can read) as a child in its own session; the child
sleeps until its parent is gone (its parent pid changes: no pid-reuse race), then ends the run and its
RUNNING child runs (a sweep's trials) as KILLED, unless the run was ended normally or a newer driver took
it over (its ``simreg.driver`` tag no longer holds TOKEN). A driver that ends normally stops its reaper first.
"""
from __future__ import annotations

import os
import sys
import time

from simreg.orchestrator.tracking.base import REAPER_URI_ENV  # light: no MLflow, no torch while the reaper waits


def main(argv: list[str]) -> int:
    run_id, token, parent = argv[0], argv[1], int(argv[2])
    uri = os.environ[REAPER_URI_ENV]
    os.nice(10)  # a watcher: it yields the cores to the run it watches
    while os.getppid() == parent:
        time.sleep(0.5)
    # MLflow is imported only now, once it is needed
    from simreg.orchestrator.tracking.backends import backend_for

    for _ in range(5):  # the store may be busy (sqlite lock) right when the driver dies
        try:
            backend_for(uri).mark_killed(run_id, token, "driver process died")
            return 0
        except Exception:
            time.sleep(1)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
