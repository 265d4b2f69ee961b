"""The sweep's MLflow callback against a real sqlite store (no Ray cluster: Tune trials are plain
objects with ``trial_id`` and ``config`` here)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.tracking.base import TRACKING_URI_ENV
from simreg.orchestrator.tune.callback import TrialRunsCallback
from simreg.orchestrator.tune.compare import comparison_rows, markdown, table_lines
from simreg.orchestrator.tune.space import tune_param_space
from simreg.search_spaces import SearchSpace

BASE = json.loads(SimRegConfig().model_dump_json())


def _setup(tmp_path: Path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    monkeypatch.setenv(TRACKING_URI_ENV, uri)  # as the sweep's driver sets it while Tune runs
    cb = TrialRunsCallback(parent, BASE, ["heads.depth"], 3, str(tmp_path / "runs.json"))
    return client, parent, cb


def _result(epoch: int, v: float) -> dict:
    return {"epoch": float(epoch), "train/loss": 1.0 / (epoch + 1), "val/top1_1nn": v, "val/top1_20nn": v, "trial_id": "x"}


def test_child_runs_fates_and_resume_reuse(tmp_path: Path, monkeypatch):
    client, parent, cb = _setup(tmp_path, monkeypatch)
    done = SimpleNamespace(trial_id="a_00000", config={"heads.depth": 1})
    stopped = SimpleNamespace(trial_id="a_00001", config={"heads.depth": 4})
    failed = SimpleNamespace(trial_id="a_00002", config={"heads.depth": 2})
    for t in (done, stopped, failed):
        cb.on_trial_start(0, [], t)
    for e in range(3):
        cb.on_trial_result(0, [], done, _result(e, 70.0 + e))
    cb.on_trial_result(0, [], stopped, _result(0, 60.0))
    cb.on_trial_complete(0, [], done)
    cb.on_trial_complete(0, [], stopped)  # ASHA stopped it after 1 of 3 epochs
    cb.on_trial_error(0, [], failed)
    runs = json.loads((tmp_path / "runs.json").read_text())
    status = {t: client.get_run(runs[t]["run_id"]).info.status for t in runs}
    assert status == {"a_00000": "FINISHED", "a_00001": "KILLED", "a_00002": "FAILED"}
    assert client.get_run(runs["a_00001"]["run_id"]).data.tags["simreg.trial_fate"] == "early_stopped"
    child = client.get_run(runs["a_00000"]["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.params["heads.depth"] == "1" and child.data.params["student.arch"] == "resnet10t"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val/top1_20nn")] == [0, 1, 2]
    assert child.data.metrics["final/val_top1_20nn"] == 72.0

    # a resumed sweep restores the pickled callback: the same trial reuses its run
    import pickle

    cb2 = pickle.loads(pickle.dumps(cb))
    cb2.on_trial_start(0, [], failed)
    assert client.get_run(runs["a_00002"]["run_id"]).info.status == "RUNNING"
    assert len(json.loads((tmp_path / "runs.json").read_text())) == 3

    # the driver died after creating a trial's run and before recording it: the next driver adopts that run
    lost = SimpleNamespace(trial_id="a_00003", config={"heads.depth": 3})
    cb2.on_trial_start(0, [], lost)
    orphan = json.loads((tmp_path / "runs.json").read_text()).pop("a_00003")
    client.set_terminated(orphan["run_id"], "KILLED")  # as the dead driver's reaper leaves it
    (tmp_path / "runs.json").write_text(json.dumps({t: runs[t] for t in runs}))
    pickle.loads(pickle.dumps(cb)).on_trial_start(0, [], lost)
    again = json.loads((tmp_path / "runs.json").read_text())["a_00003"]
    assert again["run_id"] == orphan["run_id"] and client.get_run(orphan["run_id"]).info.status == "RUNNING"
    assert len(client.search_runs([child.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 4
    del runs  # the map on disk is the reference from here on

    rows = comparison_rows(json.loads((tmp_path / "runs.json").read_text()), "val/top1_20nn", "max")
    assert [r["trial_id"] for r in rows] == ["a_00000", "a_00001", "a_00002", "a_00003"]  # best first, no metric last
    table = markdown(table_lines(rows, ["heads.depth"]))
    assert "72.00" in table and "KILLED (early_stopped)" in table


def test_optuna_takes_the_space():
    from ray.tune.search.optuna import OptunaSearch

    space = SearchSpace.model_validate({
        "search": {"algorithm": "optuna", "num_samples": 4},
        "params": {"optim.lr": {"loguniform": [0.01, 0.2]}, "heads.depth": {"choice": [1, 2, 4]}},
    })
    converted = OptunaSearch.convert_search_space(tune_param_space(space))
    assert set(converted) == {"optim.lr", "heads.depth"}
