"""The sweep's teacher fleet on a real multi-raylet cluster on this machine (``ray.cluster_utils.Cluster``): the
head node offers a ``teacher`` resource (the fleet lands there), a second node the ``student`` resource and the
CPUs of four concurrent trials. A 4-trial sweep (head depth x augmentation strength, real images, the real
teacher) runs on one teacher process whatever the trial count; that process is SIGKILLed once the trials have
trained two epochs between them, Ray restarts it and retries its calls, and every trial still finishes. Trials
with the same views share forwards, trials with other views get the targets of their own views, and each child
run counts its rows."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.timeout(900)]

N, EPOCHS, TRIALS = 256, 3, 4
STRENGTHS = (0.5, 1.0)
SPACE = {
    "search": {"algorithm": "grid", "metric": "val/top1_20nn", "mode": "max"},
    "base": {"data.train_size": N, "data.knn_bank_size": 200, "data.knn_query_size": 100, "train.epochs": EPOCHS,
             "train.batch_size": 64, "eval.val_bank_size": 200, "eval.val_query_size": 100},
    "params": {"heads.depth": {"grid": [1, 2]}, "augment.strength": {"grid": list(STRENGTHS)}},
}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from simreg.orchestrator.ray_compat import LOCAL_SYSTEM_CONFIG

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"teacher": 1}, "dashboard_host": "127.0.0.1", "_system_config": dict(LOCAL_SYSTEM_CONFIG),
    })
    c.add_node(num_cpus=5, resources={"student": TRIALS})
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()


def _teacher_pids() -> list[int]:
    """Live teacher actor processes on this machine (their process title names the class)."""
    r = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True)
    return [int(line.split(None, 1)[0]) for line in r.stdout.splitlines() if "ray::PooledTeacher" in line]


@pytest.fixture(scope="module")
def fleet_sweep(cluster, tmp_path_factory, teachers_dir):
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.tune.sweep import sweep
    from simreg.search_spaces import SearchSpace

    tmp = tmp_path_factory.mktemp("fleet")
    cfg = load_config(None, [
        "name=fleet", f"cache.dir={tmp / 'cache'}", "augment.view_bank=null", "augment.mode=same", "augment.teacher=strong",
        "augment.student=strong", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "scaling.resources={student: 1}",
        "teacher_pool.resources={teacher: 1}", "teacher_pool.cpus_per_actor=0.5", "teacher_pool.view_tasks=1",
        "teacher_pool.cpus_per_view_task=0.2",
    ])
    seen: list[int] = []  # teacher processes alive at each sample
    killed: list[int] = []
    out = tmp / "sweep"
    stop = threading.Event()

    def watch() -> None:  # sample the teacher processes; SIGKILL the fleet's one once trials have trained a while
        while not stop.is_set():
            pids = _teacher_pids()
            seen.append(len(pids))
            reported = _epochs_reported(out)
            # Early (2 of the sweep's 12 trial epochs): on a loaded machine trials start far apart, and a kill that
            # waits for the last one to report lands when the others have finished
            if not killed and pids and reported[1] >= 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.5)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        summary = sweep(cfg, SearchSpace.model_validate(SPACE), "test", out)
    finally:
        stop.set()
        w.join(timeout=5)
    return cfg, summary, seen, killed, out


def _epochs_reported(out: Path) -> tuple[int, int]:
    """(trials that reported an epoch, epochs reported by all trials together)."""
    import json

    f = out / "mlflow_child_runs.json"
    try:
        runs = json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError:
        return 0, 0
    done = [r["last_epoch"] + 1 for r in runs.values() if "last_epoch" in r]
    return len(done), sum(done)


def test_one_teacher_process_serves_every_trial_and_survives_a_kill(fleet_sweep):
    _, summary, seen, killed, _ = fleet_sweep
    assert len(summary["trials"]) == TRIALS and summary["failed_trials"] == 0
    assert killed, f"the fleet's teacher was never seen after two trial epochs; samples: {seen[-20:]}"
    # The restarted process computed targets: the kill landed while trials still needed forwards
    assert summary["teacher_fleet"]["simclr_r10t"]["forward"] > 0, summary["teacher_fleet"]
    assert max(seen) == 1, f"more than one teacher process at once: {sorted(set(seen))}"
    assert all(t["status"] == "FINISHED" for t in summary["trials"]), summary["trials"]


def test_forwards_are_the_distinct_targets_and_each_trial_counts_its_rows(fleet_sweep):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, out = fleet_sweep
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    needed = len(STRENGTHS) * N * EPOCHS  # trials with the same strength render the same views
    forward = served = 0
    for t in summary["trials"]:
        m = client.get_run(t["mlflow_run_id"]).data.metrics
        rows = {k: m[f"teacher/simclr_r10t/{k}_rows"] for k in ("forward", "cached", "shared")}
        assert sum(rows.values()) == N * EPOCHS, (t["params"], rows)  # every row of every epoch reached the trial
        assert m["train/resumed_at_epoch"] == 0, t["params"]  # the teacher's kill cost no worker group restart
        forward += int(rows["forward"])
        served += int(rows["cached"] + rows["shared"])
    # A row computed right before the kill and stored, whose answer was lost, is read from the cache by the retried call
    assert needed - TRIALS * 128 <= forward <= needed, (forward, needed)
    assert served == TRIALS * N * EPOCHS - forward
    assert summary["teacher_fleet"]["simclr_r10t"]["forward"] <= needed  # the restarted actor's count


def test_each_trial_got_the_targets_of_its_own_views(fleet_sweep):
    """The fleet stored each strength's targets under that strength's cache key: all of them, and each equal to the
    teacher's targets of that strength's views."""
    from simreg.orchestrator.cache.targets import TargetCache
    from simreg.orchestrator.data.views import add_views
    from simreg.orchestrator.pipeline.teacher import TeacherInference
    from simreg.orchestrator.train.builders import cache_spec, teacher_options, teacher_specs, view_plan
    from simreg.orchestrator.train.prepare import prepare
    from simreg.orchestrator.tune.space import trial_config

    cfg, _, _, _, out = fleet_sweep
    import json

    base = json.loads((out / "base_config.json").read_text())
    targets = {}
    for s in STRENGTHS:
        tcfg = trial_config(base, {"augment.strength": s})
        prep = prepare(tcfg, quiet=True)
        teacher = TeacherInference(teacher_specs(tcfg)[0], threads=2, device="cpu", **teacher_options(tcfg))
        cache = TargetCache(cache_spec(tcfg, prep.train).root, cache_spec(tcfg, prep.train).key(teacher.fingerprint()),
                            "simclr_r10t", teacher.teacher.feature_dim)
        for v in range(EPOCHS):
            got, found = cache.lookup(v, prep.train.sample_ids)
            assert found.all(), (s, v, int(found.sum()))
        rows = slice(0, 32)
        batch = {"sample_id": prep.train.sample_ids[rows], "label": prep.train.labels[rows], "image": prep.train.images[rows]}
        views = add_views(batch, epoch=1, seed=tcfg.seed, plan=view_plan(tcfg))
        direct = teacher.targets(views["view"])
        got, _ = cache.lookup(1, prep.train.sample_ids[rows])
        assert np.allclose(got.astype(np.float32), direct.astype(np.float32), atol=2e-2, rtol=2e-2), s
        targets[s] = got
    assert not np.allclose(targets[STRENGTHS[0]].astype(np.float32), targets[STRENGTHS[1]].astype(np.float32), atol=2e-2)


@pytest.fixture(scope="module")
def cached_sweep(fleet_sweep, tmp_path_factory):
    """A head-depth sweep at one strength after the fleet sweep: the cache holds every target it needs."""
    from simreg.orchestrator.tune.sweep import sweep
    from simreg.search_spaces import SearchSpace

    cfg = fleet_sweep[0]
    space = {**SPACE, "base": {**SPACE["base"], "augment.strength": STRENGTHS[0]}, "params": {"heads.depth": {"grid": [1, 2]}}}
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(len(_teacher_pids()))
            time.sleep(0.5)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    out = tmp_path_factory.mktemp("cached") / "sweep"
    try:
        summary = sweep(cfg, SearchSpace.model_validate(space), "test", out)
    finally:
        stop.set()
        w.join(timeout=5)
    return summary, seen, out


def test_a_sweep_on_a_warm_cache_starts_no_teacher_and_trains_every_trial_from_it(cached_sweep):
    from mlflow.tracking import MlflowClient

    summary, seen, out = cached_sweep
    assert summary["failed_trials"] == 0 and len(summary["trials"]) == 2
    assert summary["teacher_fleet"] == {} and max(seen) == 0, (summary["teacher_fleet"], sorted(set(seen)))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for t in summary["trials"]:
        m = client.get_run(t["mlflow_run_id"]).data.metrics
        assert m["teacher/simclr_r10t/cached_rows"] == N * EPOCHS and m["teacher/simclr_r10t/forward_rows"] == 0, t["params"]
        assert m["train/unique_ids"] == N, t["params"]
