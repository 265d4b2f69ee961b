"""Elastic training and placement on a real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``:
one raylet per node, as Ray's own elastic tests do). Custom resources stand in for GPUs: the head node
offers ``teacher_gpu`` (where the teacher actor must land), each worker node one ``student_gpu`` (one
student worker each). A node is removed mid-run (the run goes on with one worker from the last checkpoint)
and a node is added (the run grows back to two)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from simreg.orchestrator.train.checkpoint import committed_epochs, train_storage
from tests.integration.helpers import committed

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.timeout(900)]

N = 512
EPOCHS = 20  # after the node joins, the run must outlast Ray's autoscaling coordinator (it sees a new node within its 20 s tick) and the group's restart


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"teacher_gpu": 1}, "dashboard_host": "127.0.0.1",
        "_system_config": {"idle_worker_killing_time_threshold_ms": 600_000, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3},
    })
    nodes = [c.add_node(num_cpus=1, resources={"student_gpu": 1}) for _ in range(2)]
    ray.init(address=c.address, logging_level="WARNING")
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def elastic_run(cluster, tmp_path_factory):
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.distill import distill

    c, nodes = cluster
    out = tmp_path_factory.mktemp("elastic") / "run"
    cfg = load_config(None, [
        "name=elastic", f"data.train_size={N}", "data.knn_bank_size=300", "data.knn_query_size=100",
        f"train.epochs={EPOCHS}", "train.batch_size=64", "heads.depth=2", "eval.val_every=0",
        "scaling.num_workers=[1, 2]", "scaling.resources={student_gpu: 1}", "scaling.resize_interval_s=2",
        "scaling.max_failures=3", "teacher_pool.resources={teacher_gpu: 1}", "teacher_pool.cpus_per_actor=0.25",
        "teacher_pool.view_tasks=1", "cache.enabled=false", "augment.view_bank=null",
    ])
    result: dict = {}
    # After a node loss Ray Train first retries the old size with stale reservations, for this long
    # (default 60 s), before it starts smaller: keep the test short.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"

    def run() -> None:
        try:
            result["summary"] = distill(cfg, out)
        except BaseException as e:  # re-raised in the test's thread below
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)  # the run in a thread: Ray adds nodes from the main thread only
    t.start()
    events: list[str] = []
    deadline = time.time() + 400
    while time.time() < deadline and t.is_alive() and not committed(out, 0):
        time.sleep(0.2)
    time.sleep(1.0)
    c.remove_node(nodes[1])  # a node leaves mid epoch 1: its worker dies with it
    events.append("removed")
    while time.time() < deadline and t.is_alive() and not committed(out, 1):
        time.sleep(0.2)
    c.add_node(num_cpus=1, resources={"student_gpu": 1})  # a node joins: the run grows back
    events.append("added")
    added, seen, timeline = time.time(), {0, 1}, []  # (s after the node joined, epoch committed): shown if the run does not grow
    while t.is_alive() and time.time() < deadline + 100:
        for e in sorted(committed_epochs(train_storage(out)) - seen):
            seen.add(e)
            timeline.append((round(time.time() - added, 1), e))
        time.sleep(0.2)
    t.join(timeout=60)
    assert not t.is_alive(), f"the elastic run did not finish; epochs committed after the node joined: {timeline}"
    if "error" in result:
        raise result["error"]
    summary = result["summary"]
    summary["timeline_after_join"] = timeline
    return c, summary, events


def test_elastic_shrinks_and_grows(elastic_run):
    _, summary, events = elastic_run
    assert events == ["removed", "added"]
    hist = summary["history"]
    assert [int(h["epoch"]) for h in hist] == list(range(EPOCHS))
    sizes = [int(h["train/world_size"]) for h in hist]
    assert sizes[0] == 2 and 1 in sizes and 2 in sizes[sizes.index(1):], (sizes, summary["timeline_after_join"])  # shrank, grew back
    for h in hist:  # every id once per epoch at either size (the split drops N mod world: none here)
        assert h["train/unique_ids"] == N and h["train/duplicate_ids"] == 0, h


def test_teachers_and_students_land_where_configured(elastic_run):
    import ray

    c, summary, _ = elastic_run
    head_id = c.head_node.node_id
    nodes = {n["NodeID"]: n for n in ray.nodes()}
    teachers = [r for r in summary["placements"] if r["role"] == "teacher"]
    students = [r for r in summary["placements"] if r["role"] == "student"]
    assert teachers and students
    for r in teachers:  # the only node with teacher_gpu
        assert r["node_id"] == head_id and r["resources"].get("teacher_gpu") == 1.0, r
    for r in students:  # never beside the teacher; one student_gpu each, on a node that offers it
        assert r["node_id"] != head_id and r["resources"].get("student_gpu") == 1.0, r
        node = nodes[r["node_id"]]
        assert not node["Alive"] or node["Resources"].get("student_gpu") == 1.0  # (the removed node lists none)
    for attempt in {r["start_epoch"] for r in students}:  # within an attempt, one worker per node
        ids = [r["node_id"] for r in students if r["start_epoch"] == attempt and r["world_size"] == 2]
        assert len(ids) == len(set(ids))


def test_missing_custom_resource_is_refused_before_ray_waits_forever(cluster):
    from simreg.models.errors import ConfigError
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.placement import custom_check

    cfg = load_config(None, ["scaling.num_workers=[3, 4]", "scaling.resources={student_gpu: 1}",
                             "teacher_pool.resources={teacher_gpu: 2}"])
    import ray

    with pytest.raises(ConfigError) as e:
        custom_check(cfg, dict(ray.cluster_resources()))
    msg = str(e.value)
    assert "'teacher_gpu'" in msg and "teacher_pool.resources.teacher_gpu=2" in msg
    assert "'student_gpu'" in msg and "3 student worker(s)" in msg
