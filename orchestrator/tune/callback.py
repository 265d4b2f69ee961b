"""MLflow child runs of a sweep's trials, written by a Tune callback in the driver.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray import tune

from simreg.orchestrator.config import flatten
from simreg.orchestrator.tracking.mlflow_backend import log_metrics, log_params
from simreg.orchestrator.tune.space import trial_config

log = logging.getLogger("simreg")

CHILD_RUNS_FILE = "mlflow_child_runs.json"


class MlflowTrialsCallback(tune.Callback):
    """A Tune callback in the driver: one nested child run per trial under the sweep's parent run.

    Picklable (Tune stores it with the experiment and restores it on ``--resume``): it holds plain values,
    opens its MLflow client lazily, and keeps the trial -> run map in ``DIR/mlflow_child_runs.json`` so a
    resumed sweep reuses its runs instead of creating duplicates."""

    def __init__(self, tracking_uri: str, parent_run_id: str, base: dict[str, Any], keys: list[str], epochs: int, runs_file: str) -> None:
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.base, self.keys, self.epochs, self.runs_file = base, keys, epochs, runs_file
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_client"} | {"_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _load(self) -> dict[str, dict[str, Any]]:
        p = Path(self.runs_file)
        return json.loads(p.read_text()) if p.is_file() else {}

    def _save(self, runs: dict[str, dict[str, Any]]) -> None:
        p = Path(self.runs_file)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=2))
        tmp.replace(p)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from mlflow.entities import RunStatus

        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is not None:  # a resumed trial: same run, running again
            self.client.update_run(entry["run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
            entry["status"] = "RUNNING"
            self._save(runs)
            return
        overrides = {k: trial.config[k] for k in self.keys}
        exp_id = self.client.get_run(self.parent_run_id).info.experiment_id
        run = self.client.create_run(exp_id, run_name=f"trial_{trial.trial_id}", tags={
            "mlflow.parentRunId": self.parent_run_id, "simreg.trial_id": trial.trial_id, "simreg.command": "sweep-trial",
        })
        log_params(self.client, run.info.run_id, flatten(trial_config(self.base, overrides)))
        runs[trial.trial_id] = {"trial_id": trial.trial_id, "run_id": run.info.run_id, "params": overrides, "status": "RUNNING"}
        self._save(runs)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is None or "epoch" not in result:
            return
        step = int(result["epoch"])
        log_metrics(self.client, entry["run_id"], {
            k: v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("train/", "val/"))
        }, step)
        entry["last_epoch"] = step
        entry.setdefault("curve", {})[str(step)] = float(result.get("val/top1_20nn", float("nan")))
        entry["metrics"] = {k.removeprefix("val/"): float(result[k]) for k in ("val/top1_1nn", "val/top1_20nn") if k in result}
        if result.get("checkpoint_path"):
            entry["checkpoint"] = str(result["checkpoint_path"])
        self._save(runs)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)

    def _end(self, trial: Any, errored: bool) -> None:
        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is None:
            return
        if errored:
            status, fate = "FAILED", "error"
        elif entry.get("last_epoch", -1) + 1 < self.epochs:
            status, fate = "KILLED", "early_stopped"  # the scheduler stopped it before its last epoch
        else:
            status, fate = "FINISHED", "completed"
        self.client.set_tag(entry["run_id"], "simreg.trial_fate", fate)
        for k, v in entry.get("metrics", {}).items():  # the trial's final validation k-NN
            self.client.log_metric(entry["run_id"], f"final/val_{k}", v)
        self.client.set_terminated(entry["run_id"], status=status)
        entry["status"], entry["fate"] = status, fate
        self._save(runs)
