"""Cluster-real runs: a Ray cluster started with ``ray start`` (two nodes on this machine, token auth on),
runs submitted with ``ray job submit``, every file in an S3 bucket (moto's standalone server) and every run
in an MLflow tracking server whose artifacts go to that bucket.

- a distill job is stopped mid-run (``ray job stop``): its MLflow run ends KILLED; the cluster is then
  stopped and its local folders deleted, a fresh cluster started, the same job resubmitted: it resumes from
  the bucket at the last committed epoch, in the same MLflow run, training on each sample once per epoch;
- a 3-trial sweep job's driver is SIGKILLed after its first trial (its reaper ends the runs KILLED, its
  folder lease stays in the bucket), the cluster stopped and its folders deleted; resubmitted with
  ``--resume`` on a fresh cluster, it takes the lapsed lease over and finishes the other trials in the
  same parent and child runs, then registers the best student in the Model Registry;
- nothing a run needs afterwards lives outside the bucket and the server.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.services import free_port, s3_objects

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(1500)]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
BUCKET = "simreg-test"
SMALL = [
    "ray.address=auto", "data.train_size=1000", "data.knn_bank_size=500", "data.knn_query_size=200",
    "eval.val_bank_size=200", "eval.val_query_size=100", "train.batch_size=64", "heads.depth=2",
]


class Cluster:
    """``ray start --head`` plus a second node (``ray start --address``), one CPU each, in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # the cluster's own token (as `ray get-auth-token --generate` makes one): never the user's ~/.ray/auth_token,
        # which a fresh machine does not have
        token = root / "auth_token"
        root.mkdir(parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "HF_HUB_OFFLINE": "1",
                    # keep idle workers (as a cluster simreg starts itself does): see ray_compat.LOCAL_SYSTEM_CONFIG
                    "RAY_idle_worker_killing_time_threshold_ms": "600000",
                    # `ray job stop`: SIGTERM, then SIGKILL after this long (Ray's default 3 s cuts the run's clean-up short)
                    "RAY_JOB_STOP_WAIT_TIME_S": "30",
                    # a dead driver's folder lease is taken over after lease + margin: 20 s, not 40
                    "SIMREG_LEASE_S": "15"}
        self.dashboard = ""

    def _ray(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def up(self) -> Cluster:
        port, dash = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{dash}"
        self._ray("start", "--head", "--num-cpus", "1", "--port", str(port), "--dashboard-host", "127.0.0.1",
                  "--dashboard-port", str(dash), "--temp-dir", str(self.root / "ray"), "--disable-usage-stats")
        # its own temp dir: two nodes of one machine sharing one would each delete the other's job working dirs
        # the second node alone offers `teacher_node`: a run that asks its teacher actor for it places it there
        self._ray("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--temp-dir", str(self.root / "ray-node2"),
                  "--resources", '{"teacher_node": 1}', "--disable-usage-stats")
        return self

    def down(self) -> None:
        self._ray("stop", "--force", check=False)

    def submit(self, sid: str, *cmd: str, wait: bool = False) -> subprocess.CompletedProcess[str]:
        args = ["job", "submit", "--address", self.dashboard, "--working-dir", str(REPO), "--submission-id", sid]
        return self._ray(*args, *([] if wait else ["--no-wait"]), "--", *cmd, timeout=900, check=not wait)

    def logs(self, sid: str) -> str:
        return self._ray("job", "logs", "--address", self.dashboard, sid, check=False).stdout

    def status(self, sid: str) -> str:
        r = self._ray("job", "status", "--address", self.dashboard, sid, check=False)
        out = (r.stdout + r.stderr).lower()
        for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED"),
                             ("running", "RUNNING"), ("pending", "PENDING")):
            if word in out:
                return status
        return out

    def wait_for(self, sid: str, text: str, timeout_s: float = 600) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if text in self.logs(sid):
                return
            if self.status(sid) in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
        raise AssertionError(f"{text!r} never appeared in job {sid}'s logs:\n{self.logs(sid)[-4000:]}")

    def stop(self, sid: str) -> None:
        self._ray("job", "stop", "--address", self.dashboard, sid, timeout=120)


def _mlflow(url: str, method: str, body: dict | None = None) -> dict:
    if body is None:
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/{method}")
    else:
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/{method}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _run(url: str, run_id: str) -> tuple[str, dict[str, str]]:
    r = _mlflow(url, f"runs/get?run_id={run_id}")["run"]
    return r["info"]["status"], {t["key"]: t["value"] for t in r["data"].get("tags", [])}


def _artifacts(url: str, run_id: str, path: str = "") -> list[str]:
    q = f"artifacts/list?run_id={run_id}" + (f"&path={path}" if path else "")
    return [f["path"] for f in _mlflow(url, q).get("files", [])]


def _wait_status(url: str, run_id: str, status: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while _run(url, run_id)[0] != status and time.time() < deadline:
        time.sleep(1)
    assert _run(url, run_id)[0] == status


def _local_leftovers(*roots: Path) -> list[str]:
    """Files of a run that would have to live outside the bucket and the server."""
    names = {"summary.json", "mlflow.db", "mlflow_run_id", "checkpoint_manager_snapshot.json", "sweep_summary.json", "knn.md"}
    found = []
    for root in roots:
        for p in root.rglob("*") if root.is_dir() else []:
            if p.name in names or p.name == "mlruns" or p.name.startswith("epoch_0"):
                found.append(str(p))
    return found


@pytest.fixture(scope="module")
def cluster_root(s3, mlflow_server_url, teachers_dir):
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="rc-"))  # short: Ray's socket paths under it must stay under 108 bytes
    yield root
    Cluster(root).down()
    shutil.rmtree(root, ignore_errors=True)


def _fresh_cluster(root: Path, old: Cluster | None) -> Cluster:
    """A new machine, as far as the run can tell: the old cluster stopped and every local folder it used deleted."""
    (old or Cluster(root)).down()  # `ray stop`: every Ray process of this machine
    for d in ("ray", "ray-node2"):
        shutil.rmtree(root / d, ignore_errors=True)
    return Cluster(root).up()


def test_distill_job_stopped_then_resumed_from_the_bucket_on_a_fresh_cluster(cluster_root, s3, mlflow_server_url):
    prefix = f"runs/{uuid.uuid4().hex[:8]}"
    out = f"s3://{BUCKET}/{prefix}"
    # the teacher's weights in the bucket (pinned), fetched by its actor on the second node
    import hashlib

    import boto3

    weights = REPO / "models" / "weights" / "fmnist_simclr_resnet10t.safetensors"
    boto3.client("s3", endpoint_url=s3).upload_file(str(weights), BUCKET, f"{prefix}-teachers/simclr.safetensors")
    pin = hashlib.sha256(weights.read_bytes()).hexdigest()
    cmd = [str(BIN / "simreg"), "distill", "--output-dir", out, "--tracking-uri", mlflow_server_url,
           "train.epochs=3", f"cache.dir=s3://{BUCKET}/cache", *SMALL,
           f"teachers.0.weights=s3://{BUCKET}/{prefix}-teachers/simclr.safetensors", f"teachers.0.sha256={pin}",
           'teacher_pool.resources={"teacher_node": 0.01}', "tracking.system_metrics_s=2"]
    scratch_before = set(Path("/tmp").glob("simreg-scratch-*"))
    c = _fresh_cluster(cluster_root, None)
    # `simreg doctor` from a job on the cluster, against everything the run will use: every row ok, exit 0
    c.submit("doctor", str(BIN / "simreg"), "doctor", *cmd[2:], wait=True)
    doctor = c.logs("doctor")
    assert c.status("doctor") == "SUCCEEDED" and doctor.rstrip().endswith("every check passed"), doctor[-3000:]
    assert "2 node(s)" in doctor and "conditional writes enforced" in doctor, doctor[-3000:]
    c.submit("distill-1", *cmd)
    c.wait_for("distill-1", "epoch 1/3")
    deadline = time.time() + 120  # epoch 0's checkpoint committed in the bucket, then stop mid epoch 1
    while f"{prefix}/ray/train/checkpoint_manager_snapshot.json" not in s3_objects(s3, BUCKET, prefix) and time.time() < deadline:
        time.sleep(1)
    c.stop("distill-1")
    assert c.status("distill-1") == "STOPPED"
    import boto3

    s3c = boto3.client("s3", endpoint_url=s3)
    run_id = s3c.get_object(Bucket=BUCKET, Key=f"{prefix}/mlflow_run_id")["Body"].read().decode()
    _wait_status(mlflow_server_url, run_id, "KILLED")
    assert f"{prefix}/summary.json" not in s3_objects(s3, BUCKET, prefix)
    # released on the way out: after the run's KILLED status and its actors' end (the driver has
    # RAY_JOB_STOP_WAIT_TIME_S=30 to get there), not necessarily by the time MLflow shows KILLED
    deadline = time.time() + 40
    while f"{prefix}/.simreg.lock" in s3_objects(s3, BUCKET, prefix) and time.time() < deadline:
        time.sleep(1)
    assert f"{prefix}/.simreg.lock" not in s3_objects(s3, BUCKET, prefix)

    c = _fresh_cluster(cluster_root, c)  # the job's working dir, Ray's session and logs: all gone
    c.submit("distill-2", *cmd, wait=True)
    log = c.logs("distill-2")
    assert c.status("distill-2") == "SUCCEEDED", log[-4000:]
    assert "resuming the interrupted run in " + out in log and f"resuming MLflow run {run_id} (attempt 2)" in log
    assert "epoch 1/3" not in log and "epoch 3/3" in log  # from the last committed epoch on
    assert "View run" not in log and "View experiment at" not in log  # MLflow's own lines: simreg's `mlflow:` line says it

    objects = s3_objects(s3, BUCKET, prefix)
    summary = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{prefix}/summary.json")["Body"].read())
    assert summary["output_dir"] == out and summary["student_weights"] == f"{out}/student/student.safetensors"
    assert {f"{prefix}/{f}" for f in ("config.json", "knn.md", "student/student.safetensors", "student/student.json")} <= set(objects)
    history = summary["history"]
    assert [int(m["epoch"]) for m in history] == [0, 1, 2]
    for m in history:  # each sample once per epoch, whichever attempt trained it
        assert m["train/duplicate_ids"] == 0 and m["train/unique_ids"] + m["train/images_dropped_by_split"] == 1000
    status, tags = _run(mlflow_server_url, run_id)
    assert status == "FINISHED" and tags["simreg.attempt"] == "2" and tags["simreg.previous_attempt_status"] == "KILLED"
    exp = _mlflow(mlflow_server_url, "experiments/get-by-name?experiment_name=simreg")["experiment"]
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}["mlflow.experimentKind"] == "custom_model_development"
    # every artifact through the server's REST API, stored in the bucket behind it
    assert {"config.json", "knn.md", "summary.json", "student"} <= set(_artifacts(mlflow_server_url, run_id))
    assert "student/student.safetensors" in _artifacts(mlflow_server_url, run_id, "student")
    assert any(k.endswith(f"{run_id}/artifacts/student/student.safetensors") for k in s3_objects(s3, BUCKET, "mlflow/"))
    metrics = {m["key"] for m in _mlflow(mlflow_server_url, f"runs/get?run_id={run_id}")["run"]["data"]["metrics"]}
    assert {"train/loss", "knn/student/top1_20nn", "knn/student_gain_20nn"} <= metrics
    # both nodes' system metrics, each under its node's name (a sampler thread in the driver, an actor on the other;
    # the two attempts ran on two clusters, and a second node of one host is named by its node id)
    per_node = {k for k in metrics if k.startswith("system/") and k.endswith("/cpu_utilization_percentage")}
    assert len(per_node) >= 2 and summary["system_metrics"]["nodes"] == 2 and summary["system_metrics"]["steps"] > 0, metrics
    # the teacher ran on the second node (the only one with `teacher_node`) from the bucket's file, its pin checked
    teachers = [r for r in summary["placements"] if r.get("role") == "teacher"]
    assert teachers and all("teacher_node" in r["resources"] for r in teachers), summary["placements"]
    history_steps = _mlflow(mlflow_server_url, f"metrics/get-history?run_id={run_id}&metric_key=train/loss")["metrics"]
    assert sorted(m["step"] for m in history_steps) == [0, 1, 2]  # each epoch once, across both attempts
    assert _local_leftovers(cluster_root, REPO) == [] and set(Path("/tmp").glob("simreg-scratch-*")) == scratch_before


def test_sweep_job_stopped_then_resumed_from_the_bucket(cluster_root, s3, mlflow_server_url, tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(
        "search: {algorithm: grid, metric: val/top1_20nn, mode: max}\n"
        "base: {data.train_size: 512, train.epochs: 2, scaling.num_workers: 1, eval.val_bank_size: 200, eval.val_query_size: 100}\n"
        "params:\n  heads.depth: {grid: [1, 2, 3]}\n"
    )
    prefix = f"sweeps/{uuid.uuid4().hex[:8]}"
    out = f"s3://{BUCKET}/{prefix}"
    cmd = [str(BIN / "simreg"), "sweep", "--space", str(space), "--output-dir", out, "--tracking-uri", mlflow_server_url,
           "cache.enabled=false", "tracking.register_best=simreg-student", *SMALL]
    c = _fresh_cluster(cluster_root, None)
    c.submit("sweep-1", *cmd)
    c.wait_for("sweep-1", "FINISHED (completed)")
    time.sleep(3)  # Tune saves its experiment state every second
    # the driver dies (SIGKILL: no clean-up, its folder lease stays until it lapses), then the whole cluster
    driver = subprocess.run(["pgrep", "-f", f"simreg sweep --space {space}"], capture_output=True, text=True).stdout.split()
    assert driver, "the sweep's driver process was not found"
    for pid in driver:
        os.kill(int(pid), signal.SIGKILL)
    import boto3

    s3c = boto3.client("s3", endpoint_url=s3)
    runs = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{prefix}/mlflow_child_runs.json")["Body"].read())
    done_before = {k for k, v in runs.items() if v["status"] == "FINISHED"}
    assert 1 <= len(done_before) < 3
    parent = s3c.get_object(Bucket=BUCKET, Key=f"{prefix}/mlflow_run_id")["Body"].read().decode()
    _wait_status(mlflow_server_url, parent, "KILLED")

    assert f"{prefix}/.simreg.lock" in s3_objects(s3, BUCKET, prefix)  # the dead driver's lease
    c = _fresh_cluster(cluster_root, c)
    c.submit("sweep-2", *cmd, "--resume", wait=True)
    log = c.logs("sweep-2")
    assert c.status("sweep-2") == "SUCCEEDED", log[-4000:]
    summary = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{prefix}/sweep_summary.json")["Body"].read())
    assert summary["parent_run_id"] == parent and len(summary["trials"]) == 3
    assert all(a.startswith(f"{out}/comparison/") for a in summary["artifacts"])
    assert "resuming the sweep in " + out in log  # the dead driver's lease lapsed (or was waited for) and was taken over
    for t in done_before:  # a finished trial is not run again
        assert f"trial {t} (" not in log
    children = _mlflow(mlflow_server_url, "runs/search", {
        "experiment_ids": [_mlflow(mlflow_server_url, f"runs/get?run_id={parent}")["run"]["info"]["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{parent}'"})["runs"]
    assert len(children) == 3 and {r["info"]["status"] for r in children} == {"FINISHED"}
    assert _run(mlflow_server_url, parent)[0] == "FINISHED"
    assert "comparison" in _artifacts(mlflow_server_url, parent)
    assert any(k.startswith(f"{prefix}/tune/sweep/") for k in s3_objects(s3, BUCKET, prefix))
    # the best trial's student in the Model Registry: its weights behind the server, its card in the tags
    best = summary["best_trial"]
    assert summary["registered_model"] == {"name": "simreg-student", "version": "1"}
    mv = _mlflow(mlflow_server_url, "model-versions/get?name=simreg-student&version=1")["model_version"]
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    assert mv["run_id"] == best["mlflow_run_id"] and tags["arch"] == "resnet10t" and tags["input_size"] == "32"
    assert tags["val_top1_20nn"] == f"{best['metrics']['top1_20nn']:.2f}" and tags["param.heads.depth"] == str(best["params"]["heads.depth"])
    assert {"student/student.safetensors", "student/student.json"} <= set(_artifacts(mlflow_server_url, best["mlflow_run_id"], "student"))
    assert _local_leftovers(cluster_root, REPO) == []
