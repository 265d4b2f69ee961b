"""A sweep's outcome from its trials' ends: the parent run's status and the line that says what failed.

All trials failed: the sweep failed (parent run FAILED, ``simreg sweep`` exits 1) and the line names the
first trial's error, its file and its MLflow run. Some failed: the sweep stands, the line counts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simreg.models.errors import SimRegError


class SweepFailedError(SimRegError):
    """Every trial of a sweep failed (or none ran): the sweep's results are empty. The CLI exits with 1."""

    exit_code = 1


@dataclass(frozen=True)
class SweepOutcome:
    status: str  # the parent run's end: FINISHED or FAILED
    failed: int
    total: int
    message: str | None  # one line for the console; None when every trial succeeded


def sweep_outcome(runs: dict[str, dict[str, Any]], where: str) -> SweepOutcome:
    """``runs``: the trial -> run map the sweep's callback keeps (tune/callback.py); ``where``: the sweep's folder."""
    failed = sorted((e for e in runs.values() if e.get("status") == "FAILED"), key=lambda e: str(e.get("trial_id")))
    total = len(runs)
    if total == 0:
        return SweepOutcome("FAILED", 0, 0, f"the sweep in {where} finished no trial: rerun with --verbose, or read Ray's logs in "
                                            "/tmp/ray/session_latest/logs")
    if not failed:
        return SweepOutcome("FINISHED", 0, total, None)
    first = failed[0]
    error = f": {first['error']}" if first.get("error") else ""
    detail = (f"the first, trial {first.get('trial_id')}{error} (traceback in {first.get('error_file') or 'its trial folder'}, "
              f"MLflow run {first.get('run_id')})")
    if len(failed) == total:
        return SweepOutcome("FAILED", total, total, f"all {total} trials of the sweep in {where} failed; {detail}")
    return SweepOutcome("FINISHED", len(failed), total, f"{len(failed)} of {total} trials failed; {detail}")
