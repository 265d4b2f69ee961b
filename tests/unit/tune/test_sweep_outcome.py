"""The sweep driver without Ray: Tune, the data and the tracker are stand-ins, the rest is the real ``sweep``.

Checks what reaches Tune (the trainable's parameters, the param space, the pickled callback) and the sweep
folder holds no tracking-URI secret, that the callback gets the URI from the driver's environment, and that
a sweep whose every trial failed ends FAILED."""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cloudpickle
import pytest
from ray import tune

from simreg.orchestrator.config import load_config
from simreg.orchestrator.tracking.base import TRACKING_URI_ENV
from simreg.orchestrator.tracking.redact import redact_text
from simreg.orchestrator.tune.outcome import SweepFailedError, sweep_outcome
from simreg.search_spaces import SearchSpace

SECRET = "hunter2"
URI = f"http://bob:{SECRET}@mlflow.invalid:5000"


def test_outcome_all_some_none_failed():
    ok = {"trial_id": "t_00000", "run_id": "r0", "status": "FINISHED"}
    bad = {"trial_id": "t_00001", "run_id": "r1", "status": "FAILED", "error": "ValueError: boom", "error_file": "/s/t1/error.txt"}
    bad2 = {"trial_id": "t_00002", "run_id": "r2", "status": "FAILED"}
    assert sweep_outcome({"a": ok}, "/s") == sweep_outcome({"a": ok}, "/s") and sweep_outcome({"a": ok}, "/s").message is None
    some = sweep_outcome({"a": ok, "b": bad2, "c": bad}, "/s")
    assert (some.status, some.failed, some.total) == ("FINISHED", 2, 3)
    assert some.message.startswith("2 of 3 trials failed; the first, trial t_00001: ValueError: boom (traceback in /s/t1/error.txt, MLflow run r1)")
    every = sweep_outcome({"b": bad2, "c": bad}, "/s")
    assert every.status == "FAILED" and every.message.startswith("all 2 trials of the sweep in /s failed; the first, trial t_00001")
    assert sweep_outcome({}, "/s").status == "FAILED"
    assert SweepFailedError("x").exit_code == 1


class _Run:
    def __init__(self, run_id: str, book: dict[str, Any]) -> None:
        self.run_id, self.uri, self.resumed, self.book = run_id, "redacted", False, book

    def log_params(self, params: Any) -> None:
        self.book.setdefault("params", []).append(dict(params))

    def log_metrics(self, metrics: Any, step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Any) -> None:
        self.book.setdefault("tags", {}).setdefault(self.run_id, {}).update(tags)

    def end(self, status: str) -> None:
        self.book.setdefault("ended", {})[self.run_id] = status


class _Backend:
    def __init__(self, uri: str, book: dict[str, Any]) -> None:
        self.uri, self.book = redact_text(uri), book
        book.setdefault("backend_uris", []).append(uri)

    def open_run(self, experiment: str, output_dir: Any, run_name: str, tags: Any) -> _Run:
        return _Run("parent", self.book)

    def open_child(self, parent_run_id: str, run_name: str, tags: Any, run_id: str | None = None) -> _Run:
        return _Run(run_id or f"child-{run_name}", self.book)

    def attach(self, run_id: str) -> _Run:
        return _Run(run_id, self.book)


def _run_sweep(tmp_path: Path, monkeypatch, fails: list[bool]) -> tuple[Path, dict[str, Any], Any]:
    """``sweep`` over ``heads.depth`` with one trial per entry of ``fails``; returns (folder, tracker book, result)."""
    import simreg.orchestrator.train.prepare as prepare_mod
    import simreg.orchestrator.train.rundir as rundir
    import simreg.orchestrator.train.trainer as trainer_mod
    import simreg.orchestrator.tune.callback as callback_mod
    import simreg.orchestrator.tune.sweep as sweep_mod

    book: dict[str, Any] = {}
    monkeypatch.setattr(sweep_mod, "backend_for", lambda uri: _Backend(uri, book))
    monkeypatch.setattr(callback_mod, "backend_for", lambda uri: _Backend(uri, book))
    monkeypatch.setattr(rundir, "preflight", lambda *a: None)  # no server to reach
    monkeypatch.setattr(prepare_mod, "prepare", lambda cfg, quiet=False, stats_for_all=False, check_export=False: None)
    monkeypatch.setattr(trainer_mod, "init_ray", lambda cfg: {"CPU": 2.0})
    real_with_parameters = tune.with_parameters

    def with_parameters(fn: Any, **kw: Any) -> Any:
        book["trainable_kwargs"] = kw
        return real_with_parameters(fn, **kw)

    out = tmp_path / "sweep"

    class FakeTuner:  # what Tune would run: each trial's callback calls, from the pickled callback
        def __init__(self, trainable: Any, **kw: Any) -> None:
            book["tuner_kwargs"] = kw

        def fit(self) -> None:
            book["env_during_fit"] = os.environ.get(TRACKING_URI_ENV)
            cb = pickle.loads(pickle.dumps(book["tuner_kwargs"]["run_config"].callbacks[0]))  # as Tune stores it
            for i, fail in enumerate(fails):
                trial_dir = out / "tune" / "sweep" / f"run_trial_{i}"
                trial_dir.mkdir(parents=True)
                trial = SimpleNamespace(trial_id=f"t_{i:05d}", config={"heads.depth": i + 1}, path=str(trial_dir),
                                        error_file=str(trial_dir / "error.txt"))
                cb.on_trial_start(0, [], trial)
                if fail:
                    (trial_dir / "error.txt").write_text(f"Failure # 1\nTraceback ...\nValueError: trial {i} broke at {URI}\n")
                    cb.on_trial_error(0, [], trial)
                else:
                    cb.on_trial_result(0, [], trial, {"epoch": 0.0, "train/loss": 1.0, "val/top1_1nn": 50.0, "val/top1_20nn": 55.0})
                    cb.on_trial_complete(0, [], trial)

    monkeypatch.setattr(tune, "with_parameters", with_parameters)
    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    cfg = load_config(None, [f"tracking.tracking_uri={URI}", "train.epochs=1", "teacher_pool.fleet=false",  # no Ray: no fleet
                             "cache.enabled=false"])  # no data to look up in a cache
    space = SearchSpace.model_validate({"search": {"algorithm": "grid"}, "params": {"heads.depth": {"grid": [i + 1 for i in range(len(fails))]}}})
    try:
        result: Any = sweep_mod.sweep(cfg, space, "test", out)
    except SweepFailedError as e:
        result = e
    return out, book, result


def test_no_tracking_secret_reaches_tune_or_the_sweep_folder(tmp_path: Path, monkeypatch):
    out, book, summary = _run_sweep(tmp_path, monkeypatch, [False, True])
    # what Tune pickles into its experiment state: the trainable's parameters, the param space, the callbacks
    handed = cloudpickle.dumps((book["trainable_kwargs"], book["tuner_kwargs"]))
    assert SECRET.encode() not in handed
    assert book["trainable_kwargs"]["base"]["tracking"]["tracking_uri"] == "http://bob:***@mlflow.invalid:5000"
    # the callback reached the tracker with the URI from the driver's environment, set only while Tune ran
    assert book["env_during_fit"] == URI and book["backend_uris"].count(URI) >= 2
    assert TRACKING_URI_ENV not in os.environ
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"base_config.json", "sweep_summary.json", "mlflow_child_runs.json"} <= {p.name for p in files}
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes() and p.name != "error.txt"]  # error.txt: Tune's own
    assert leaking == []
    assert SECRET not in json.dumps(book.get("params")) and SECRET not in json.dumps(book.get("tags"))
    assert summary["failed_trials"] == 1 and book["ended"]["parent"] == "FINISHED"


def test_all_trials_failed_ends_the_sweep_failed(tmp_path: Path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="simreg"):
        out, book, err = _run_sweep(tmp_path, monkeypatch, [True, True])
    assert isinstance(err, SweepFailedError) and err.exit_code == 1
    msg = str(err)
    assert msg.startswith(f"all 2 trials of the sweep in {out} failed; the first, trial t_00000: ValueError: trial 0 broke at http://bob:***@")
    assert f"traceback in {out / 'tune' / 'sweep' / 'run_trial_0' / 'error.txt'}" in msg and "MLflow run child-trial_t_00000" in msg
    assert "\n" not in msg and SECRET not in msg
    assert book["ended"] == {"child-trial_t_00000": "FAILED", "child-trial_t_00001": "FAILED", "parent": "FAILED"}
    assert book["tags"]["child-trial_t_00000"]["simreg.error"].startswith("ValueError: trial 0 broke")
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["failed_trials"] == 2 and len(summary["trials"]) == 2


def test_some_trials_failed_is_a_sweep_that_says_so(tmp_path: Path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="simreg"):
        _, book, summary = _run_sweep(tmp_path, monkeypatch, [True, False, False])
    assert book["ended"]["parent"] == "FINISHED" and summary["failed_trials"] == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "trials failed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("1 of 3 trials failed; the first, trial t_00000")


@pytest.mark.parametrize("value", [None, "sqlite:////elsewhere/mlflow.db"])
def test_tracking_uri_env_is_restored(value, monkeypatch):
    from simreg.orchestrator.tune.sweep import _tracking_uri_env

    if value is None:
        monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    else:
        monkeypatch.setenv(TRACKING_URI_ENV, value)
    with pytest.raises(RuntimeError), _tracking_uri_env(URI):
        assert os.environ[TRACKING_URI_ENV] == URI
        raise RuntimeError
    assert os.environ.get(TRACKING_URI_ENV) == value
