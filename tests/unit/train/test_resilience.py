"""Elastic config, resume rules, checkpoint state, the MLflow reaper and redaction, without Ray clusters
(a real MLflow sqlite store and real processes where it matters)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from simreg.models.errors import ConfigError
from simreg.orchestrator.config import load_config
from tests.helpers import wait_while_running


def test_elastic_workers_config_and_ray_scaling_config():
    from simreg.orchestrator.train.placement import Placement, failure_config, scaling_config

    cfg = load_config(None, ["scaling.num_workers=[1, 4]", "scaling.resources={student_gpu: 1}",
                             "scaling.label_selector={role: student}", "scaling.resize_interval_s=5", "scaling.max_failures=-1"])
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 4)
    sc = scaling_config(cfg, Placement(has_gpu=False, use_gpu=False, teacher_gpus=0.0))
    assert (sc.min_workers, sc.max_workers) == (1, 4)
    assert sc.resources_per_worker == {"CPU": 0.5, "student_gpu": 1.0}
    assert sc.label_selector == {"role": "student"} and sc.elastic_resize_monitor_interval_s == 5
    assert failure_config(cfg).max_failures == -1
    fixed = scaling_config(load_config(), Placement(True, True, 1.0))
    assert fixed.num_workers == 2 and fixed.resources_per_worker == {"GPU": 1.0}


@pytest.mark.parametrize("bad", ["[3, 2]", "[0, 2]", "0", "[1, 2, 3]"])
def test_bad_worker_counts_are_named(bad):
    with pytest.raises(ConfigError, match=r"scaling\.num_workers"):
        load_config(None, [f"scaling.num_workers={bad}"])


def test_batch_rule_uses_the_largest_size():
    with pytest.raises(ConfigError, match="fewer than 2 images per worker"):
        load_config(None, ["scaling.num_workers=[1, 8]", "train.batch_size=8"])


def test_elastic_resource_rule_counts_the_minimum():
    from simreg.orchestrator.train.placement import Placement, resource_check

    p = Placement(False, False, 0.0)
    resource_check(load_config(None, ["scaling.num_workers=[2, 8]"]), {"CPU": 2.0}, p)  # starts at 2, grows later
    with pytest.raises(ConfigError, match="scaling.num_workers=3"):
        resource_check(load_config(None, ["scaling.num_workers=[3, 8]"]), {"CPU": 2.0}, p)
    with pytest.raises(ConfigError, match=r"'teacher_gpu'.*offers 0"):
        resource_check(load_config(None, ["teacher_pool.resources={teacher_gpu: 1}"]), {"CPU": 2.0}, p)


def test_checkpoint_restores_every_generator_and_the_history(tmp_path):
    from simreg.orchestrator.train.builders import build_objective, build_optimizer
    from simreg.orchestrator.train.checkpoint import load_state, restore, save_checkpoint

    cfg = load_config(None, ["heads.depth=1"])
    obj = build_objective(cfg, {"t": 512})
    opt, sched = build_optimizer(cfg, obj, 10)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    hist = [{"epoch": 0.0, "train/loss": 1.0}, {"epoch": 1.0, "train/loss": 0.9}]
    save_checkpoint(tmp_path, obj, opt, sched, 1, hist[-1], hist)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = load_state(tmp_path)  # weights_only=True: only tensors and plain values inside
    assert restore(state, obj, opt, sched) == 2
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert state["history"] == hist


def test_resume_rules(tmp_path):
    from simreg.orchestrator.train.rundir import check_resume, safe_config_json

    cfg = load_config(None, ["train.epochs=3"])
    assert check_resume(cfg, tmp_path) is False  # nothing there yet
    (tmp_path / "ray" / "train").mkdir(parents=True)
    (tmp_path / "config.json").write_text(safe_config_json(cfg))
    assert check_resume(cfg, tmp_path) is True
    assert check_resume(load_config(None, ["train.epochs=3", "scaling.num_workers=[1, 2]", "ray.num_cpus=4"]), tmp_path)
    with pytest.raises(ConfigError, match=r"differs in heads\.depth, train\.epochs.*same config to resume"):
        check_resume(load_config(None, ["train.epochs=4", "heads.depth=2"]), tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="finished run"):
        check_resume(cfg, tmp_path)


def test_output_dir_is_locked_for_one_driver(tmp_path):
    from simreg.orchestrator.train.rundir import hold_output_dir

    lock = hold_output_dir(tmp_path)
    with pytest.raises(ConfigError, match="in use by another simreg process"):
        hold_output_dir(tmp_path)
    lock.release()
    hold_output_dir(tmp_path).release()  # free again


def test_redaction():
    from simreg.orchestrator.tracking.redact import redact, redact_uri
    from simreg.orchestrator.train.rundir import safe_config_json

    assert redact_uri("https://alice:s3cr3t@mlflow.example.com/x") == "https://alice:***@mlflow.example.com/x"
    assert redact_uri("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    out = redact({"tracking.tracking_uri": "http://u:pw@h:5000", "x.api_key": "abc", "x.token": None, "heads.depth": 4})
    assert out == {"tracking.tracking_uri": "http://u:***@h:5000", "x.api_key": "***", "x.token": None, "heads.depth": 4}
    cfg = load_config(None, ["tracking.tracking_uri=http://bob:hunter2@host:5000"])
    assert "hunter2" not in safe_config_json(cfg)


def test_sigterm_unwinds_as_keyboard_interrupt():
    from simreg.orchestrator import fence

    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        fence.install_signal_handlers()
        with pytest.raises(KeyboardInterrupt) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert isinstance(e.value, fence.Stopped) and e.value.exit_code == 130 and e.value.owned
        with pytest.raises(fence.Stopped):  # decided: no write of this driver goes out any more
            fence.check("summary.json")
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
        fence.reset()


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from simreg.orchestrator.tracking.backends import backend_for
    out = Path(sys.argv[1])
    t = backend_for(f"sqlite:///{out / 'mlflow.db'}").open_run("exp", out, "run", {})
    child = t.client.create_run(t.client.get_run(t.run_id).info.experiment_id, tags={"mlflow.parentRunId": t.run_id})
    print(t.run_id, child.info.run_id, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: only the reaper can end the run
    t.end("FINISHED")
""")


def _driver(out: Path, mode: str) -> tuple[str, str, int]:
    p = subprocess.run([sys.executable, "-c", DRIVER, str(out), mode], capture_output=True, text=True, timeout=120)
    run_id, child_id = p.stdout.split()
    return run_id, child_id, p.returncode


def test_reaper_marks_a_killed_drivers_runs_and_a_rerun_resumes_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    run_id, child_id, rc = _driver(tmp_path, "die")
    assert rc == -signal.SIGKILL
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert wait_while_running(client, run_id).info.status == "KILLED"
    assert client.get_run(child_id).info.status == "KILLED"  # a sweep's trial runs too
    assert client.get_run(run_id).data.tags["simreg.end_reason"] == "driver process died"

    run2, _, rc = _driver(tmp_path, "finish")  # a rerun on the same folder: the same run, attempt 2
    assert rc == 0 and run2 == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["simreg.attempt"] == "2" and run.data.tags["simreg.previous_attempt_status"] == "KILLED"
    # no duplicate run: the experiment's one top-level run is the resumed one (MLflow's search cannot match a
    # missing tag, so the runs are filtered here)
    top = [r.info.run_id for r in client.search_runs([run.info.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert top == [run_id]


def test_rerun_marks_a_run_left_running_without_a_reaper(tmp_path):
    from mlflow.tracking import MlflowClient

    from simreg.orchestrator.tracking.backends import backend_for
    from simreg.orchestrator.tracking.mlflow_backend import RUN_ID_FILE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("exp", artifact_location=(tmp_path / "art").as_uri())
    stale = client.create_run(exp).info.run_id  # RUNNING, its driver gone (e.g. the host died with it)
    (tmp_path / RUN_ID_FILE).write_text(stale)
    t = backend_for(uri).open_run("exp", tmp_path, "run", {})
    try:
        assert t.run_id == stale and t.resumed
        tags = client.get_run(stale).data.tags
        assert tags["simreg.previous_attempt_status"] == "KILLED" and client.get_run(stale).info.status == "RUNNING"
    finally:
        t.end("FINISHED")
    assert client.get_run(stale).info.status == "FINISHED"


def test_a_normal_end_stops_the_reaper(tmp_path):
    from simreg.orchestrator.tracking.backends import backend_for

    t = backend_for(f"sqlite:///{tmp_path / 'mlflow.db'}").open_run("exp", tmp_path, "run", {})
    reaper = t._reaper
    assert reaper is not None and reaper.poll() is None
    t.end("FINISHED")
    assert reaper.poll() is not None
    assert json.loads(json.dumps(t.client.get_run(t.run_id).info.status)) == "FINISHED"


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_state_with_code_is_refused(tmp_path):
    from simreg.orchestrator.train.checkpoint import STATE, load_state

    torch.save({"epoch": 0, "evil": _Payload()}, tmp_path / STATE)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        load_state(tmp_path)
