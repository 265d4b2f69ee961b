"""Fault injection on real Ray processes (one local 2-CPU cluster for the module), real images, the real
SimCLR teacher and a real MLflow store:

- a teacher actor SIGKILLed mid-run: Ray restarts it and retries its calls; the run loses nothing;
- a student worker SIGKILLed mid-epoch: Ray Train restarts the worker group from the last checkpoint;
- the driver SIGKILLed mid-run, then ``simreg distill`` rerun on the same folder: it resumes from the
  checkpoint in the same MLflow run, which the dead driver's reaper had marked KILLED.

Every run must train on every sample id exactly once per epoch, and an interrupted run must end close to
an uninterrupted one with the same seed (the teacher-kill run: its student never restarts).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simreg.orchestrator.ray_compat import LOCAL_SYSTEM_CONFIG
from tests.helpers import wait_while_running
from tests.integration.helpers import committed

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.timeout(600)]

N = 512
EPOCHS = 3
SMALL = [
    f"data.train_size={N}", "data.knn_bank_size=500", "data.knn_query_size=200", f"train.epochs={EPOCHS}",
    "train.batch_size=64", "heads.depth=2", "eval.val_every=0", "scaling.max_failures=2",
    "cache.enabled=false", "augment.view_bank=null",  # every epoch through the teacher: faults hit live work
]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", logging_level="WARNING",
             _system_config=dict(LOCAL_SYSTEM_CONFIG))  # as `simreg distill` starts it
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _alive_pids(class_name: str) -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")]) if a.pid]


def _kill_when(out: Path, class_name: str, delay_s: float, killed: list[int]) -> threading.Thread:
    """SIGKILL one live actor of ``class_name`` ``delay_s`` after epoch 0's checkpoint is committed (mid epoch 1)."""
    def run() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not committed(out, 0):
            time.sleep(0.2)
        time.sleep(delay_s)
        pids = _alive_pids(class_name)
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _check_accounting(summary: dict) -> None:
    """Every sample id trained on exactly once in every epoch, each epoch reported once."""
    hist = summary["history"]
    assert [int(h["epoch"]) for h in hist] == list(range(EPOCHS))
    for h in hist:
        assert h["train/unique_ids"] == N and h["train/duplicate_ids"] == 0 and h["train/images"] == N, h


def _distill(tmp: Path, name: str, *extra: str) -> dict:
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.distill import distill

    return distill(load_config(None, [f"name={name}", *SMALL, *extra]), tmp / name)


def _distill_killing(tmp: Path, name: str, class_name: str, delay_s: float) -> tuple[dict, list[int]]:
    """A small distill during which one live ``class_name`` actor is SIGKILLed mid epoch 1."""
    killed: list[int] = []
    t = _kill_when(tmp / name, class_name, delay_s, killed)
    summary = _distill(tmp, name)
    t.join(timeout=5)
    return summary, killed


@pytest.fixture(scope="module")
def teacher_killed(ray_cluster, tmp_path_factory):
    return _distill_killing(tmp_path_factory.mktemp("faults"), "teacher_kill", "PooledTeacher", 1.0)


def test_teacher_actor_killed_pipeline_continues(teacher_killed):
    summary, killed = teacher_killed
    assert len(killed) == 1, "the teacher actor was not found alive mid-run"
    _check_accounting(summary)
    # the worker group never restarted: one attempt
    assert {h["train/resumed_at_epoch"] for h in summary["history"]} == {0.0}
    # Ray restarted the actor (same actor, a new process); the calls it was serving were retried
    starts = [r for r in summary["placements"] if r["role"] == "teacher"]
    assert len(starts) == 2 and starts[0]["actor_id"] == starts[1]["actor_id"], starts
    assert starts[1]["pid"] != starts[0]["pid"] and killed[0] == starts[0]["pid"]
    assert summary["teacher_rows"]["simclr_r10t"]["forward"] >= EPOCHS * N


def test_student_worker_killed_resumes_from_checkpoint(teacher_killed, tmp_path_factory):
    summary, killed = _distill_killing(tmp_path_factory.mktemp("faults"), "worker_kill", "RayTrainWorker", 0.5)
    assert len(killed) == 1, "no student worker was found alive mid-run"
    _check_accounting(summary)
    # one restart, from the last committed checkpoint: epochs before it by the first attempt, the rest
    # (the epoch in progress redone) by the new group; epoch 0 was committed before the kill
    resumed = [int(h["train/resumed_at_epoch"]) for h in summary["history"]]
    k = resumed[-1]
    assert 1 <= k < EPOCHS and resumed == [0] * k + [k] * (EPOCHS - k), resumed
    students = [r for r in summary["placements"] if r["role"] == "student"]
    assert sorted(r["start_epoch"] for r in students) == [0, 0, k, k]  # 2 workers per attempt
    # within tolerance of the uninterrupted run with the same seed (block order differs between runs)
    base = teacher_killed[0]
    assert abs(summary["history"][-1]["train/loss"] - base["history"][-1]["train/loss"]) < 0.05
    assert abs(summary["student_knn"]["top1_20nn"] - base["student_knn"]["top1_20nn"]) < 6


def test_driver_killed_then_rerun_resumes_same_mlflow_run(teacher_killed, ray_cluster, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    out = tmp_path_factory.mktemp("faults") / "driver_kill"
    exe = str(Path(sys.executable).with_name("simreg"))
    # the CLI joins this module's cluster (so a killed driver leaves the cluster up, as on a real one)
    cmd = [exe, "distill", "--output-dir", str(out), "name=driver_kill", *SMALL, "ray.address=auto"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    log1 = open(out.parent / "first.log", "w")
    p = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not committed(out, 0):
        time.sleep(0.2)
    assert committed(out, 0), f"no checkpoint before the kill; see {log1.name}"
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    killed = wait_while_running(client, run_id)
    assert killed.info.status == "KILLED", "the dead driver's run was left RUNNING"
    assert killed.data.tags["simreg.end_reason"] == "driver process died"
    time.sleep(2)  # the dead job's actors are reclaimed

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    (out.parent / "rerun.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming the interrupted run" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow_run_id"] == run_id  # no duplicate run
    _check_accounting(summary)
    assert summary["history"][0]["train/resumed_at_epoch"] == 0.0 and summary["history"][-1]["train/resumed_at_epoch"] >= 1.0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["simreg.attempt"] == "2"
    assert run.data.tags["simreg.previous_attempt_status"] == "KILLED"
    exp = run.info.experiment_id
    assert len(client.search_runs([exp])) == 1
    # every epoch logged once in the run's history, across both drivers
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(EPOCHS))
    base = teacher_killed[0]
    assert abs(summary["history"][-1]["train/loss"] - base["history"][-1]["train/loss"]) < 0.05
