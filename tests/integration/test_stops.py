"""A stop that stops, on real processes (one local 2-CPU Ray cluster for the module, which each ``simreg``
joins; real images, the real SimCLR teacher, a real MLflow store, moto's S3 server):

- two drivers on one bucket folder: the first is frozen (SIGSTOP) past its lease, the second takes the run
  over and finishes it; the first, woken, stops within seconds with exit status 1 and writes nothing more
  (its workers, which trained on while it was frozen, stop at their next checkpoint); one MLflow run, every
  epoch logged once;
- Ctrl-C (SIGINT) during a real sweep's ``fit()``: exit 130, the parent and its running trials KILLED, no
  comparison, no summary, no registered model (Tune's own SIGINT handler would end it ENDED and go on);
- SIGTERM during a distill: exit 130, KILLED, no summary (``ray.init``'s SIGTERM handler would exit 15).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from simreg.orchestrator.ray_compat import LOCAL_SYSTEM_CONFIG
from simreg.orchestrator.storage import Store
from tests.helpers import wait_while_running
from tests.integration.helpers import committed
from tests.services import s3_objects

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.timeout(600)]

EPOCHS = 10  # the first driver's workers are still training when the second takes the run over
SMALL = [
    "data.train_size=512", "data.knn_bank_size=500", "data.knn_query_size=200", f"train.epochs={EPOCHS}",
    "train.batch_size=64", "heads.depth=2", "eval.val_every=0", "cache.enabled=false", "augment.view_bank=null",
    "ray.address=auto",
]
LEASE_S = 6.0  # the holder stops 4 s after its last renewal; a takeover waits 8 s


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", logging_level="WARNING", _system_config=dict(LOCAL_SYSTEM_CONFIG))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _env(ray_address: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_address, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "SIMREG_LEASE_S": str(LEASE_S)}


def _exe() -> str:
    return str(Path(sys.executable).with_name("simreg"))


def _wait_for(log: Path, text: str, p: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if text in log.read_text():
            return
        if p.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log} (exit {p.poll()}):\n{log.read_text()[-3000:]}")


def test_a_driver_frozen_past_its_lease_stops_and_the_second_finishes_the_run(ray_cluster, s3, tmp_path):
    from mlflow.tracking import MlflowClient

    prefix = f"runs/{uuid.uuid4().hex[:8]}"
    out = f"s3://simreg-test/{prefix}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [_exe(), "distill", "--output-dir", out, "--tracking-uri", uri, "name=two_drivers", *SMALL]
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = subprocess.Popen(cmd, stdout=open(log_a, "w"), stderr=subprocess.STDOUT, env=_env(ray_cluster), cwd=tmp_path)  # noqa: SIM115
    deadline = time.time() + 300
    while time.time() < deadline and a.poll() is None and not committed(Store(out), 0):  # type: ignore[arg-type]
        time.sleep(0.2)
    assert committed(Store(out), 0), log_a.read_text()[-3000:]  # type: ignore[arg-type]
    a.send_signal(signal.SIGSTOP)  # its Ray workers train on; its lease is no longer renewed
    try:
        b = subprocess.Popen(cmd, stdout=open(log_b, "w"), stderr=subprocess.STDOUT, env=_env(ray_cluster), cwd=tmp_path)  # noqa: SIM115
        _wait_for(log_b, "took over the lapsed lease", b, timeout_s=60)
        _wait_for(log_b, "resuming the interrupted run", b, timeout_s=60)
        time.sleep(10)  # the first driver's workers, training on, reach their next checkpoint: the lease is not theirs
    finally:
        a.send_signal(signal.SIGCONT)
    woken = time.time()
    assert a.wait(timeout=60) == 1, log_a.read_text()[-3000:]
    stopped_s = time.time() - woken
    text_a = log_a.read_text()
    assert f"lost the lease of {out}" in text_a and "rerun the command to resume the run" in text_a
    assert stopped_s < 20, text_a[-2000:]
    assert "the student workers stopped: another driver took the run folder over: epoch " in text_a
    assert b.wait(timeout=400) == 0, log_b.read_text()[-3000:]
    text_b = log_b.read_text()
    assert "resuming the interrupted run in " + out in text_b
    assert f"epoch {EPOCHS}/{EPOCHS}" in text_b  # the second driver trained the run's last epochs

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("simreg").experiment_id])
    assert len(runs) == 1  # one MLflow run: the second driver resumed the first's
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["simreg.attempt"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(EPOCHS))  # every epoch logged once, by one driver or the other
    objects = s3_objects(s3, "simreg-test", prefix)
    assert f"{prefix}/summary.json" in objects and f"{prefix}/.simreg.lock" not in objects


SPACE = """\
description: two trials, stopped by Ctrl-C during the first
search: {algorithm: grid, metric: val/top1_20nn, mode: max, max_concurrent_trials: 1}
base: {data.train_size: 512, data.knn_bank_size: 256, data.knn_query_size: 128, train.epochs: 6, train.batch_size: 64,
       eval.val_bank_size: 128, eval.val_query_size: 64, cache.enabled: false, tracking.register_best: stopped-sweep}
params:
  heads.depth: {grid: [1, 2]}
"""


def test_ctrl_c_during_a_sweep_kills_its_runs_and_writes_no_result(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "space.yaml").write_text(SPACE)
    out = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    p = subprocess.Popen([_exe(), "sweep", "--space", str(tmp_path / "space.yaml"), "--output-dir", str(out), "ray.address=auto"],
                         stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env(ray_cluster), cwd=tmp_path)  # noqa: SIM115
    _wait_for(log, "epoch 1/6", p)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "simreg: interrupted" in log.read_text().splitlines()
    assert "Configuration for experiment" not in log.read_text() and "TensorBoard" not in log.read_text()  # Tune's console output

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = wait_while_running(client, (out / "mlflow_run_id").read_text().strip())
    assert parent.info.status == "KILLED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert children and {c.info.status for c in children} == {"KILLED"}
    assert not (out / "sweep_summary.json").exists() and not (out / "comparison").exists()
    assert client.search_registered_models() == []


def test_sigterm_during_a_distill_exits_130_and_kills_its_run(ray_cluster, tmp_path):
    """``ray.init`` makes SIGTERM ``sys.exit(15)`` and Ray Train V2's SIGINT handler exits 0: both kept out, a
    distill stopped by SIGTERM (a scheduler's preemption, ``kill``) exits 130, its run KILLED."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    log = tmp_path / "distill.log"
    p = subprocess.Popen([_exe(), "distill", "--output-dir", str(out), *SMALL], stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                         env=_env(ray_cluster), cwd=tmp_path)
    _wait_for(log, f"epoch 1/{EPOCHS}", p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "simreg: interrupted" in log.read_text().splitlines()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert wait_while_running(client, (out / "mlflow_run_id").read_text().strip()).info.status == "KILLED"
    assert not (out / "summary.json").exists() and not (out / "student").exists()
