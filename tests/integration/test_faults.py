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

import contextlib
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
    while time.time() < deadline and p.poll() is None and not committed(out, 1):
        time.sleep(0.2)
    assert committed(out, 1), f"no second checkpoint before the kill; see {log1.name}"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    # the latest checkpoint damaged as a crash mid-copy would leave it: the rerun falls back to the one before
    latest = out / "ray" / "train" / "epoch_0001" / "state.pt"
    latest.write_bytes(latest.read_bytes()[:1000])

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
    assert f"checkpoint epoch_0001: checkpoint file {latest} cannot be read" in r.stderr and "resuming from epoch_0000" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow_run_id"] == run_id  # no duplicate run
    _check_accounting(summary)
    # epoch 0 by the first driver; epochs 1-2 again from epoch 0's checkpoint (epoch 1's was damaged)
    assert [h["train/resumed_at_epoch"] for h in summary["history"]] == [0.0, 1.0, 1.0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["simreg.attempt"] == "2"
    assert run.data.tags["simreg.previous_attempt_status"] == "KILLED"
    exp = run.info.experiment_id
    assert len(client.search_runs([exp])) == 1
    # every epoch in the run's history, across both drivers; epoch 1 twice (its first run's checkpoint was lost),
    # the latest value at each step is the one the run continued from
    logged = client.get_metric_history(run_id, "train/loss")
    assert sorted({m.step for m in logged}) == list(range(EPOCHS)) and len(logged) <= EPOCHS + 1
    latest_by_step = {m.step: m.value for m in sorted(logged, key=lambda m: m.timestamp)}
    assert latest_by_step == pytest.approx({int(h["epoch"]): h["train/loss"] for h in summary["history"]})
    base = teacher_killed[0]
    assert abs(summary["history"][-1]["train/loss"] - base["history"][-1]["train/loss"]) < 0.05


@contextlib.contextmanager
def _tiny_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (a disk that fills), or None where mounting is not allowed."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _cli(out: Path, *extra: str) -> list[str]:
    """``simreg distill`` on this module's cluster (a run that fails leaves the cluster up, as on a real one)."""
    return [str(Path(sys.executable).with_name("simreg")), "distill", "--output-dir", str(out), *SMALL, "ray.address=auto", *extra]


def _cli_env(ray_address: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_address, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **extra}


def test_a_diverging_loss_ends_the_run_failed_with_one_line(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from simreg.orchestrator.train.checkpoint import train_storage

    out = tmp_path / "diverged"
    r = subprocess.run(_cli(out, "name=diverged", "optim.lr=1e6"), capture_output=True, text=True,
                       env=_cli_env(ray_cluster), timeout=400)
    (tmp_path / "diverged.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("simreg: error:")]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-3000:]
    last = errors[0]
    assert "the training loss became nan at epoch " in last, last
    assert "the run stopped before that step's update" in last and "Lower optim.lr (now 1e+06)" in last
    diverged_at = int(last.split("became nan at epoch ")[1].split(",")[0])  # 1-based
    # no checkpoint of the diverged epoch or after it; nothing claims the run finished
    assert {int(p.name.removeprefix("epoch_")) for p in train_storage(out).glob("epoch_*")} == set(range(diverged_at - 1))
    assert not (out / "summary.json").exists() and not (out / "student").exists()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED"


def test_an_error_once_the_run_is_open_ends_it_failed(ray_cluster, tmp_path):
    """A param MLflow refuses (a label key it cannot name) fails the run's first write to MLflow: the run ends
    FAILED at once, not left RUNNING for the reaper to call KILLED."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with pytest.raises(MlflowException, match="bad!key"):
        _distill(tmp_path, "bad_param", "teacher_pool.label_selector={bad!key: x}")
    out = tmp_path / "bad_param"
    run = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run((out / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED"


def test_a_teacher_slower_than_its_timeout_is_named(ray_cluster):
    """The view stage on this cluster with a teacher actor that never answers: after teacher_pool.call_timeout_s
    it records why in RunState (the run then ends FAILED with that line) and fails the block."""
    import numpy as np
    import ray

    from simreg.models.errors import SimRegError
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.pipeline.dataset import _views_and_targets
    from simreg.orchestrator.pipeline.state import start_run_state
    from simreg.orchestrator.train.builders import view_plan

    @ray.remote(num_cpus=0)
    class Hung:
        def infer(self, request: dict, requester: object = None) -> None:
            time.sleep(120)

    state, hung = start_run_state(), Hung.remote()
    ray.get(state.set_epoch.remote(0))
    batch = {"sample_id": np.arange(4), "label": np.zeros(4, np.int64), "image": np.zeros((4, 28, 28), np.uint8)}
    t0 = time.time()
    try:
        with pytest.raises(SimRegError, match=r"^teacher slow sent no targets for a block within teacher_pool.call_timeout_s=2 s"):
            _views_and_targets(batch, state=state, seed=0, plan=view_plan(load_config(None, SMALL)), teachers={"slow": [hung]}, timeout_s=2.0)
        assert time.time() - t0 < 30
        assert ray.get(state.get_failure.remote()).startswith("teacher slow sent no targets")
    finally:
        ray.kill(hung)
        ray.kill(state)


def test_a_teacher_that_dies_every_time_ends_the_run_failed_naming_it(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from simreg.models.errors import SimRegError

    out = tmp_path / "teacher_dies"
    killed: list[int] = []
    done = threading.Event()

    def keep_killing() -> None:  # every teacher process, as soon as it serves (as an OOM on every batch would)
        while not done.is_set() and not committed(out, 0):
            time.sleep(0.2)
        while not done.is_set():
            for pid in _alive_pids("PooledTeacher"):
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.3)

    t = threading.Thread(target=keep_killing, daemon=True)
    t.start()
    t0 = time.time()
    try:
        with pytest.raises(SimRegError) as e:
            _distill(tmp_path, "teacher_dies", "teacher_pool.max_restarts=1", "train.epochs=6")
    finally:
        done.set()
        t.join(timeout=5)
    assert str(e.value).startswith("teacher simclr_r10t cannot serve targets: its actor died and was restarted "
                                   "teacher_pool.max_restarts=1 times"), str(e.value)
    assert len(killed) == 2  # the first process and its one restart; then no more restarts
    assert time.time() - t0 < 240  # the retried worker group ends at once instead of failing again
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED" and not (out / "summary.json").exists()


def test_mlflow_server_down_mid_run_then_back_every_epoch_logged(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.services import free_port, mlflow_server

    epochs, port = 22, free_port()  # ~1.5 s an epoch: the run goes on while the server is away and well after it is back
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    out = tmp_path / "outage"
    servers = contextlib.ExitStack()
    url = servers.enter_context(mlflow_server(server_dir, None, str(tmp_path / "artifacts"), port=port))
    env = _cli_env(ray_cluster, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    log = tmp_path / "outage.log"
    # the target cache (a bank of 4 views) on a 1 MiB filesystem: it fills in the second epoch (0.5 MiB of targets each)
    mounts = contextlib.ExitStack()  # not in ``servers``: closing that stops the server only
    disk = mounts.enter_context(_tiny_filesystem(tmp_path / "small-disk", "1m"))
    cache = ["cache.enabled=true", f"cache.dir={disk}", "augment.view_bank=4"] if disk else []
    with open(log, "w") as fh:
        p = subprocess.Popen(_cli(out, "name=outage", f"train.epochs={epochs}", *cache, "--tracking-uri", url),
                             stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not committed(out, 0):
            time.sleep(0.2)
        servers.close()  # the tracking server goes away mid-run
        while time.time() < deadline and p.poll() is None and "warning: MLflow did not take epoch" not in log.read_text():
            time.sleep(0.3)
        assert "warning: MLflow did not take epoch" in log.read_text(), log.read_text()[-3000:]
        servers.enter_context(mlflow_server(server_dir, None, str(tmp_path / "artifacts"), port=port))  # back, same store
        assert p.wait(timeout=400) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert text.count("warning: MLflow did not take epoch") == 1 and "MLflow answers again" in text
        summary = json.loads((out / "summary.json").read_text())
        client = MlflowClient(url)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(epochs))
        if disk:  # the full disk: said once; the run went on, each view's targets computed once (kept in memory)
            assert text.count("the target cache in") == 1 and "No space left on device" in text, text[-3000:]
            assert summary["teacher_rows"]["simclr_r10t"] == {"forward": 4 * N, "cached": (epochs - 4) * N, "shared": 0}
    finally:
        if p.poll() is None:
            p.kill()
        servers.close()
        mounts.close()
