"""Child runs of a sweep's trials (one per trial under the sweep's parent run), written by a Tune
callback in the driver through the tracker seam (tracking/base.py)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ray import tune

from simreg.models.errors import SimRegError
from simreg.orchestrator import fence
from simreg.orchestrator.config import flatten
from simreg.orchestrator.storage import open_store
from simreg.orchestrator.tracking.backends import backend_for
from simreg.orchestrator.tracking.base import TRACKING_URI_ENV, TrackerBackend
from simreg.orchestrator.tracking.redact import redact_text
from simreg.orchestrator.tune.space import trial_config

log = logging.getLogger("simreg")

CHILD_RUNS_FILE = "mlflow_child_runs.json"


class TrialRunsCallback(tune.Callback):
    """A Tune callback in the driver: one nested child run per trial under the sweep's parent run.

    Picklable (Tune stores it with the experiment and restores it on ``--resume``): it holds plain values and
    no tracking URI (a URI may carry a password, and Tune's experiment state is a file in the sweep folder).
    It reads the URI from ``$SIMREG_TRACKING_URI``, which the sweep's driver sets for the length of the sweep,
    opens its tracker backend lazily, and keeps the trial -> run map in ``DIR/mlflow_child_runs.json`` (a local
    path or an object-store URI) so a resumed sweep reuses its runs instead of creating duplicates."""

    def __init__(self, parent_run_id: str, base: dict[str, Any], keys: list[str], epochs: int, runs_file: str) -> None:
        self.parent_run_id = parent_run_id
        self.base, self.keys, self.epochs, self.runs_file = base, keys, epochs, runs_file
        self._backend: TrackerBackend | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_backend"} | {"_backend": None}

    @property
    def backend(self) -> TrackerBackend:
        if self._backend is None:
            uri = os.environ.get(TRACKING_URI_ENV)
            if not uri:
                raise SimRegError(f"${TRACKING_URI_ENV} is not set: the sweep's driver sets it to its tracking URI before Tune starts")
            self._backend = backend_for(uri)
        return self._backend


    def _load(self) -> dict[str, dict[str, Any]]:
        f = open_store(self.runs_file)  # a local path or an object-store URI
        return json.loads(f.read_text()) if f.is_file() else {}

    def _save(self, runs: dict[str, dict[str, Any]]) -> None:
        open_store(self.runs_file).write_text(json.dumps(runs, indent=2))  # atomic (an object appears once uploaded)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        fence.check("the sweep's trial records")  # nothing after the driver's stop (fence.py)
        runs = self._load()
        entry = runs.get(trial.trial_id)
        name = f"trial_{trial.trial_id}"
        if entry is not None:  # a resumed trial: same run, running again
            self.backend.open_child(self.parent_run_id, name, {}, run_id=entry["run_id"])
            entry["status"] = "RUNNING"
            self._save(runs)
            log.info("trial %s (%s) resumed", trial.trial_id, _params(entry))
            return
        overrides = {k: trial.config[k] for k in self.keys}
        run = self.backend.open_child(self.parent_run_id, name, {"simreg.trial_id": trial.trial_id, "simreg.command": "sweep-trial"})
        run.log_params(flatten(trial_config(self.base, overrides)))
        runs[trial.trial_id] = {"trial_id": trial.trial_id, "run_id": run.run_id, "params": overrides, "status": "RUNNING"}
        self._save(runs)
        log.info("trial %s (%s) %s", trial.trial_id, _params(runs[trial.trial_id]), "resumed" if run.resumed else "started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        fence.check("the sweep's trial records")  # nothing after the driver's stop (fence.py)
        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is None or "epoch" not in result:
            return
        step = int(result["epoch"])
        self.backend.attach(entry["run_id"]).log_metrics({
            k: v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("train/", "val/", "teacher/"))
        }, step)
        entry["last_epoch"] = step
        val = f", val 20-NN {result['val/top1_20nn']:.2f}" if "val/top1_20nn" in result else ""
        log.info("trial %s (%s) epoch %d/%d: loss %.4f%s", trial.trial_id, _params(entry), step + 1, self.epochs,
                 float(result.get("train/loss", float("nan"))), val)
        entry.setdefault("curve", {})[str(step)] = float(result.get("val/top1_20nn", float("nan")))
        entry["metrics"] = {k.removeprefix("val/"): float(result[k]) for k in ("val/top1_1nn", "val/top1_20nn") if k in result}
        if result.get("checkpoint_path"):
            entry["checkpoint"] = str(result["checkpoint_path"])
        self._save(runs)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)

    def _error(self, trial: Any) -> dict[str, str]:
        """Where a failed trial's traceback is (Tune's error.txt, synced to the trial's folder in the sweep's
        storage) and its last line (the exception), redacted."""
        found: dict[str, str] = {}
        if getattr(trial, "path", None):
            found["error_file"] = str(open_store(self.runs_file).at(trial.path) / "error.txt")
        local = getattr(trial, "error_file", None)  # Tune's driver-side copy, written before this callback runs
        try:
            lines = [line.strip() for line in Path(local).read_text().splitlines() if line.strip()] if local else []
        except OSError:
            lines = []
        if lines:
            found["error"] = redact_text(lines[-1])[:500]
        return found

    def _end(self, trial: Any, errored: bool) -> None:
        fence.check("the sweep's trial records")  # nothing after the driver's stop (fence.py)
        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is None:
            return
        run = self.backend.attach(entry["run_id"])
        if errored:
            status, fate = "FAILED", "error"
            entry.update(self._error(trial))
            if entry.get("error"):
                run.set_tags({"simreg.error": entry["error"]})
        elif entry.get("last_epoch", -1) + 1 < self.epochs:
            status, fate = "KILLED", "early_stopped"  # the scheduler stopped it before its last epoch
        else:
            status, fate = "FINISHED", "completed"
        run.set_tags({"simreg.trial_fate": fate})
        final = {f"final/val_{k}": v for k, v in entry.get("metrics", {}).items()}  # the trial's final validation k-NN
        if final:
            run.log_metrics(final, step=0)
        run.end(status)
        entry["status"], entry["fate"] = status, fate
        self._save(runs)
        why = f": {entry['error']}" if errored and entry.get("error") else ""
        log.log(logging.WARNING if errored else logging.INFO, "trial %s (%s): %s (%s)%s", trial.trial_id, _params(entry), status, fate, why)


def _params(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.get("params", {}).items())
