"""A real 3-trial sweep (search_spaces/smoke.yaml) on local Ray clusters with real images and the real
teacher: the sweep driver is SIGKILLed after its first trial (its reaper marks the MLflow runs KILLED), then
``--resume`` runs only the rest, in the same runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import wait_while_running

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.timeout(1200)]


def _sweep_cmd(out: Path, *extra: str) -> list[str]:
    exe = str(Path(sys.executable).with_name("simreg"))
    return [exe, "sweep", "--space", "smoke", "--output-dir", str(out), "ray.num_cpus=2", "tracking.system_metrics_s=2", *extra]


def _runs(out: Path) -> dict:
    f = out / "mlflow_child_runs.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError:  # replaced atomically, but be lenient while polling
        return {}


def _kill_tree(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory, teachers_dir):
    out = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    log1 = open(out.parent / "sweep_first.log", "w")
    p = subprocess.Popen(_sweep_cmd(out), stdout=log1, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 600
    first_done = None
    while time.time() < deadline and p.poll() is None:
        done = [k for k, v in _runs(out).items() if v.get("status") == "FINISHED"]
        if done:
            first_done = done[0]
            break
        time.sleep(1)
    assert first_done is not None, f"no trial finished before the kill; see {log1.name}"
    time.sleep(3)  # Tune saves its experiment state every second: let it record the finished trial
    _kill_tree(p.pid)  # the driver, its local Ray cluster and the trials: an interrupted sweep
    p.wait(timeout=60)
    time.sleep(3)
    before = _runs(out)
    assert before[first_done]["status"] == "FINISHED"
    assert not (out / "sweep_summary.json").exists()
    # no run left RUNNING: the driver's reaper ends the parent run and the interrupted trial's run as KILLED
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent_id = (out / "mlflow_run_id").read_text().strip()
    parent = wait_while_running(client, parent_id)
    assert parent.info.status == "KILLED" and parent.data.tags["simreg.end_reason"] == "driver process died"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}, [c.info.status for c in children]

    r = subprocess.run(_sweep_cmd(out, "--resume"), capture_output=True, text=True, env=env, timeout=900)
    (out.parent / "sweep_resume.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, first_done, before, r.stdout + r.stderr


def test_resume_runs_only_missing_trials_without_duplicate_runs(resumed_sweep):
    from mlflow.tracking import MlflowClient

    out, first_done, before, stdout = resumed_sweep
    summary = json.loads((out / "sweep_summary.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 3
    assert sorted(t["params"]["heads.depth"] for t in trials) == [1, 2, 4]
    assert all(t["status"] == "FINISHED" and "top1_20nn" in t["metrics"] for t in trials)

    client = MlflowClient(summary["mlflow_tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3  # one per trial: the resume created no duplicate
    assert {c.info.status for c in children} == {"FINISHED"}
    assert len({c.data.params["heads.depth"] for c in children}) == 3
    # the trial that had finished before the kill was not run again: its run kept its one history
    first = client.get_run(before[first_done]["run_id"])
    steps = [m.step for m in client.get_metric_history(first.info.run_id, "train/loss")]
    assert steps == [0, 1]
    parents = client.search_runs([parent.info.experiment_id], "tags.`simreg.command` = 'sweep'")
    assert len(parents) == 1

    best = summary["best_trial"]
    assert best["metrics"]["top1_20nn"] == max(t["metrics"]["top1_20nn"] for t in trials)
    assert Path(best["checkpoint"], "state.pt").is_file()
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.csv", "comparison/comparison.md", "comparison/learning_curves.png"} <= arts
    assert "heads.depth" in stdout and "FINISHED (completed)" in stdout
    assert f"trial {first_done} (" not in stdout  # only the missing trials ran again (the console's per-trial lines)
    assert sum(f"trial {t['trial_id']} (" in stdout for t in trials) == 2
    assert "Trial status" not in stdout  # Tune's status tables: only with --verbose
    # the node's system metrics (every 2 s) in the parent run and in the run of every trial while it trained
    for run in (parent, *children):
        cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert cpu and any(m.value > 0 for m in cpu), run.info.run_name


def test_compare_prints_best_first(resumed_sweep):
    out = resumed_sweep[0]
    exe = str(Path(sys.executable).with_name("simreg"))
    r = subprocess.run([exe, "compare", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(rows) == 3
    vals = [float(row.split("|")[5]) for row in rows]  # the val 20-NN column
    assert vals == sorted(vals, reverse=True)
