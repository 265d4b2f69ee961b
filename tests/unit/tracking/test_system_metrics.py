"""A node's sampler: MLflow's system-metric names, means of the gauges since the last take, counters since the start;
the driver's side logs one step per collection and never fails the run. (The Ray path: test_distill_ray, test_sweep_ray.)"""
from __future__ import annotations

import time

import pytest

from simreg.orchestrator.tracking.system_metrics import PREFIX, NodeSampler, SystemMetrics, system_step

GAUGES = {"cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
          "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes"}
COUNTERS = {"network_receive_megabytes", "network_transmit_megabytes"}


def test_a_sampler_gives_the_means_since_its_last_take():
    s = NodeSampler(0.05)
    try:
        deadline = time.monotonic() + 10
        got: dict[str, float] = {}
        while not got and time.monotonic() < deadline:
            time.sleep(0.2)
            got = s.take()
        assert GAUGES | COUNTERS <= set(got)
        assert 0 <= got["cpu_utilization_percentage"] <= 100 and 0 < got["system_memory_usage_percentage"] < 100
        assert got["system_memory_usage_megabytes"] > 0 and got["disk_available_megabytes"] > 0
        assert got["network_receive_megabytes"] >= 0
        s.stop()
        time.sleep(0.2)
        s.take()  # what the last samples left
        assert s.take() == {}  # nothing sampled since: nothing to log
    finally:
        s.stop()


def _fake_ray(monkeypatch) -> None:
    """ray.wait and ray.get over the fake samplers' answers (each answer is its own ref)."""
    import ray
    from ray.exceptions import RayActorError

    def get(ref, timeout=None):
        if isinstance(ref, Exception):
            raise ref
        return ref

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "get", get)
    assert RayActorError


class _Sampler:
    """A node's sampler as the driver sees it through Ray (``take.remote()`` -> a ref ``ray.get`` resolves)."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values
        self.take = self

    def remote(self) -> dict[str, float]:
        return self.values


def test_the_driver_logs_one_step_per_collection_and_names_nodes_only_when_there_are_several(monkeypatch):
    _fake_ray(monkeypatch)
    logged: list[tuple[dict[str, float], int]] = []
    one = SystemMetrics(lambda m, step: logged.append((dict(m), step)), 10.0, step=3)
    one.samplers = {"node-a": _Sampler({"cpu_utilization_percentage": 50.0})}
    one.collect()
    one.samplers = {"node-a": _Sampler({})}
    one.collect()  # nothing sampled: no step
    two = SystemMetrics(lambda m, step: logged.append((dict(m), step)), 10.0)
    two.samplers = {"node-a": _Sampler({"cpu_utilization_percentage": 50.0}), "node-b": _Sampler({"cpu_utilization_percentage": 20.0})}
    two.collect()
    assert logged == [({f"{PREFIX}cpu_utilization_percentage": 50.0}, 3),
                      ({f"{PREFIX}node-a/cpu_utilization_percentage": 50.0, f"{PREFIX}node-b/cpu_utilization_percentage": 20.0}, 0)]


def test_a_tracking_store_that_fails_costs_one_warning_never_the_run(monkeypatch, caplog):
    _fake_ray(monkeypatch)

    def down(m, step):
        raise ConnectionError("tracking server went away")

    sm = SystemMetrics(down, 10.0)
    sm.samplers = {"n": _Sampler({"cpu_utilization_percentage": 1.0})}
    with caplog.at_level("WARNING", logger="simreg"):
        sm.collect()
        sm.collect()
    assert [r.getMessage() for r in caplog.records].count(
        "system metrics: tracking server went away (the run goes on without them)") == 1


def test_a_node_that_left_is_dropped_and_the_others_still_logged(monkeypatch, caplog):
    from ray.exceptions import RayActorError

    _fake_ray(monkeypatch)
    logged: list[dict[str, float]] = []
    sm = SystemMetrics(lambda m, step: logged.append(dict(m)), 10.0)
    sm.samplers = {"a": _Sampler({"cpu_utilization_percentage": 5.0}), "b": _Sampler(RayActorError())}
    with caplog.at_level("WARNING", logger="simreg"):
        sm.collect()
        sm.collect()
    # the series keep their names (node a's) and no warning is shown: an elastic cluster shrinks
    assert logged == [{f"{PREFIX}a/cpu_utilization_percentage": 5.0}] * 2
    assert list(sm.samplers) == ["a"] and not caplog.records


@pytest.mark.parametrize(("logged", "first"), [
    ({}, 0),
    ({f"{PREFIX}cpu_utilization_percentage": {0, 1, 7}, "train/loss": {0, 1, 2, 3, 40}}, 8),
    ({f"{PREFIX}a/cpu_utilization_percentage": {0, 3}, f"{PREFIX}b-1234/cpu_utilization_percentage": {5}}, 6),  # several nodes
])
def test_a_resumed_run_goes_on_after_the_steps_it_logged(logged, first):
    class Tracker:
        def metric_names(self) -> set[str]:
            return set(logged)

        def logged_steps(self, metric: str) -> set[int]:
            return logged[metric]

    assert system_step(Tracker()) == first
