"""System metrics of a run's nodes in its MLflow run (MLflow's "System metrics" tab): CPU, memory, disk, network,
and each GPU's utilisation and memory where there is one.

One sampler per node of the cluster reads Linux's /proc (and NVML on GPU nodes) every
``tracking.system_metrics_s`` seconds under the names MLflow's own system metrics use, and keeps their
means: a thread of the driver for the driver's node, a Ray actor of no CPU pinned to each other node. The
driver collects every node's means at the same interval and logs them to the run as ``system/<metric>`` (one
node) or ``system/<node>/<metric>`` (several), a step per collection. Only the driver writes to the tracking
store (workers report to it), so a node needs no route to the tracking server. Its cost is measured in
``benchmarks/system_metrics.py``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from simreg.models.errors import first_line

log = logging.getLogger("simreg")

PREFIX = "system/"


def _proc_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest times are inside user and nice already
    return total - idle, total


def _proc_memory() -> tuple[float, float]:
    """(used, total) bytes: used = total - available (/proc/meminfo)."""
    info: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                info[k] = int(rest.split()[0]) * 1024
    return float(info["MemTotal"] - info["MemAvailable"]), float(info["MemTotal"])


def _proc_net() -> tuple[int, int]:
    """(received, sent) bytes since boot over every interface but loopback (/proc/net/dev)."""
    recv = sent = 0
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                continue
            cols = rest.split()
            recv, sent = recv + int(cols[0]), sent + int(cols[8])
    return recv, sent


class NodeSampler:
    """This node's CPU, memory, disk, network and (where NVML finds a GPU) GPUs, sampled in a thread, under the names
    of MLflow's own system metrics. Linux's /proc and statvfs directly (109 us of CPU a sample), NVML through
    nvidia-ml-py."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._cpu0 = _proc_cpu()  # the first sample measures from here
        self._net0 = _proc_net()
        self._gpus: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001  (no GPU, no driver, or nvidia-ml-py missing: no GPU metrics)
            self._gpus = []
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}  # counters since the start (network): the latest value, not a mean
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cpu_s = 0.0  # CPU time of the samples taken (this thread's)
        self._thread = threading.Thread(target=self._run, name="simreg-system-metrics-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> tuple[dict[str, float], dict[str, float]]:
        """(gauges to average, counters since the start) now."""
        busy, total = _proc_cpu()
        cpu = 100.0 * (busy - self._cpu0[0]) / max(1, total - self._cpu0[1])
        self._cpu0 = (busy, total)
        used, mem_total = _proc_memory()
        st = os.statvfs(os.sep)
        disk_used, disk_free = (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize
        recv, sent = _proc_net()
        gauges = {
            "cpu_utilization_percentage": cpu,
            "system_memory_usage_megabytes": used / 1e6,
            "system_memory_usage_percentage": used / mem_total * 100,
            "disk_usage_percentage": 100.0 * disk_used / max(1, disk_used + disk_free),
            "disk_usage_megabytes": disk_used / 1e6,
            "disk_available_megabytes": disk_free / 1e6,
        }
        for i, h in enumerate(self._gpus):
            try:
                m = self._nvml.nvmlDeviceGetMemoryInfo(h)
                gauges[f"gpu_{i}_memory_usage_percentage"] = m.used / m.total * 100
                gauges[f"gpu_{i}_memory_usage_megabytes"] = m.used / 1e6
                gauges[f"gpu_{i}_utilization_percentage"] = float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                gauges[f"gpu_{i}_power_usage_watts"] = self._nvml.nvmlDeviceGetPowerUsage(h) / 1000
            except Exception:  # noqa: BLE001  (a counter this GPU does not offer)
                continue
        counters = {"network_receive_megabytes": (recv - self._net0[0]) / 1e6,
                    "network_transmit_megabytes": (sent - self._net0[1]) / 1e6}
        return gauges, counters

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            t0 = time.thread_time()
            try:
                gauges, counters = self.sample()
            except Exception:  # noqa: BLE001  (a counter that cannot be read this time: the next sample tries again)
                continue
            finally:
                self.cpu_s += time.thread_time() - t0
            with self._lock:
                for k, v in gauges.items():
                    self._sums[k] = self._sums.get(k, 0.0) + float(v)
                    self._counts[k] = self._counts.get(k, 0) + 1
                self._last.update(counters)

    def take(self) -> dict[str, float]:
        """The mean of every gauge since the last take and the counters' latest values (empty: nothing sampled since)."""
        with self._lock:
            if not self._counts:
                return {}
            out = {k: round(self._sums[k] / self._counts[k], 1) for k in self._sums} | {k: round(v, 3) for k, v in self._last.items()}
            self._sums.clear()
            self._counts.clear()
            return out

    def cost(self) -> float:
        """CPU seconds its samples took."""
        return self.cpu_s

    def stop(self) -> None:
        self._stop.set()


class SystemMetrics:
    """Samplers on every alive node and the driver's thread that logs their means with ``log_metrics(metrics, step)``.
    A context manager; ``interval_s <= 0`` does nothing. A sampler that cannot start or answer costs a warning once,
    never the run."""

    def __init__(self, log_metrics: Callable[[Mapping[str, float], int], None], interval_s: float, step: int = 0) -> None:
        self.log_metrics = log_metrics
        self.interval_s = interval_s
        self.step = step
        self.samplers: dict[str, Any] = {}  # node -> a sampler actor, or (the driver's node) a NodeSampler in this process
        self.report: dict[str, Any] = {}  # at close: nodes, steps logged, CPU seconds of the samples
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._by_node: bool | None = None  # metric names carry the node (several nodes at the first collection)

    def __enter__(self) -> SystemMetrics:
        if self.interval_s > 0:
            try:
                self._start()
            except Exception as e:  # noqa: BLE001
                self._warn(e)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(final=exc_type is None)  # a run stopping (Ctrl-C, a failure) does not wait for one more collection

    def _start(self) -> None:
        import ray

        if not os.path.exists("/proc/stat"):  # not Linux: nothing to read the node's counters from
            log.info("system metrics: this node has no /proc (Linux only); none are logged")
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.get_runtime_context().get_node_id()
        actor = ray.remote(NodeSampler)
        for n in nodes:
            name = n.get("NodeManagerHostname") or n["NodeID"][:8]
            if name in self.samplers:
                name = f"{name}-{n['NodeID'][:8]}"
            if n["NodeID"] == here:  # the driver's node: sampled in this process (a laptop run starts no process for it)
                self.samplers[name] = NodeSampler(self.interval_s)
                continue
            self.samplers[name] = actor.options(  # type: ignore[attr-defined]
                num_cpus=0, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(self.interval_s)
        self._thread = threading.Thread(target=self._run, name="simreg-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.collect()

    def collect(self) -> dict[str, float]:
        """Every node's means since the last collection, logged as one step (returned, for tests)."""
        names = list(self.samplers)
        try:
            got = self._ask(names, "take")
        except Exception as e:  # noqa: BLE001  (a node gone: its sampler with it)
            self._warn(e)
            return {}
        if self._by_node is None:  # decided once: a node that leaves does not rename the others' series
            self._by_node = len(names) > 1
        metrics = {f"{PREFIX}{n + '/' if self._by_node else ''}{k}": v for n, m in zip(names, got, strict=True) for k, v in m.items()}
        if metrics:
            try:
                self.log_metrics(metrics, self.step)
                self.step += 1
            except Exception as e:  # noqa: BLE001  (the tracking store's own retries failed: the run goes on)
                self._warn(e)
        return metrics

    def _ask(self, names: list[str], method: str) -> list[Any]:
        """``method()`` of every sampler in ``names`` (in this process, or the actors' answers within max(10 s, the
        interval)). A sampler that does not answer is left out this time; one whose node went (an elastic cluster
        shrank) is dropped."""
        import ray
        from ray.exceptions import RayActorError

        held = dict(self.samplers)  # close() may clear it while a last collection runs
        refs = {n: getattr(a, method).remote() for n in names if n in held and not isinstance(a := held[n], NodeSampler)}
        answers: dict[str, Any] = {}
        if refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=max(10.0, self.interval_s))
            done = {id(r) for r in ready}
            for n, ref in refs.items():
                if id(ref) not in done:
                    continue
                try:
                    answers[n] = ray.get(ref)
                except RayActorError:  # its node left the cluster
                    log.info("system metrics: node %s left; no more samples from it", n)
                    self.samplers.pop(n, None)
        local = {n: getattr(a, method)() for n in names if isinstance(a := held.get(n), NodeSampler)}
        return [answers.get(n, local.get(n, {} if method == "take" else 0.0)) for n in names]

    def _warn(self, e: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("system metrics: %s (the run goes on without them)", first_line(e, 200))

    def close(self, final: bool = True) -> None:
        """One last collection (``final``), then the samplers go."""
        import ray

        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=self.interval_s + 15.0 if final else 1.0)
            self._thread = None
            if final:
                self.collect()
                try:
                    cpu: float | None = sum(self._ask(list(self.samplers), "cost"))
                except Exception:  # noqa: BLE001  (a node gone: its figure with it)
                    cpu = None
                self.report = {"nodes": len(self.samplers), "steps": self.step, "sampler_cpu_s": cpu, "interval_s": self.interval_s}
        for a in self.samplers.values():
            try:
                a.stop() if isinstance(a, NodeSampler) else ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.samplers.clear()


def system_step(tracker: Any) -> int:
    """The first step of this run's system metrics: after those an earlier attempt of a resumed run logged (one node's
    ``system/cpu_utilization_percentage``, or any node's ``system/<node>/cpu_utilization_percentage``)."""
    try:
        names = [m for m in tracker.metric_names() if m.startswith(PREFIX) and m.endswith("cpu_utilization_percentage")]
        steps = set().union(*(tracker.logged_steps(m) for m in names)) if names else set()
    except Exception:  # noqa: BLE001  (a store that cannot say: steps from 0, logged beside the earlier ones)
        return 0
    return max(steps) + 1 if steps else 0
