"""Shared by tests that kill a driver: wait for its reaper to end the MLflow run."""
from __future__ import annotations

import time
from typing import Any


def wait_while_running(client: Any, run_id: str, timeout: float = 30) -> Any:
    """The run once it is no longer RUNNING (or after ``timeout`` seconds)."""
    deadline = time.time() + timeout
    while time.time() < deadline and client.get_run(run_id).info.status == "RUNNING":
        time.sleep(0.3)
    return client.get_run(run_id)
