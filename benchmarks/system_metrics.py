"""What the system metrics (``tracking.system_metrics_s``) cost a run: training rate and the samplers' CPU.

    python benchmarks/system_metrics.py --json system_metrics.json         # off, every 10 s, every 1 s; 2 rounds (~15 min on 2 cores)

The real command, ``simreg distill`` on the offline demo's data and teacher (``data.train_size`` images, 2
epochs, target cache off so every epoch runs the teacher), once per interval and round, the intervals
interleaved within each round so that a drift of the machine falls on all of them. Off (``0``) is the
baseline. Two figures per interval:

- the training rate (``train/images_per_s`` of the epochs, mean over rounds) against off's: the end-to-end
  cost, within this machine's run-to-run noise;
- the samplers' own CPU time as a share of the machine's CPU over the run (wall x cores): the direct cost, free
  of that noise. On one machine the driver's node is sampled in a thread of the driver (``system_metrics`` in
  summary.json: the CPU seconds of its samples); a ``ray::NodeSampler`` actor process, on the other nodes of a
  cluster, is read from /proc while the run lives. Not counted: the driver's collection, a dict and an MLflow
  write per interval.

Goal: < 1% of training throughput at the default interval (10 s).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _samplers() -> dict[int, float]:
    """CPU seconds (user + system) of every ``ray::NodeSampler`` process alive now."""
    out: dict[int, float] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{d}/cmdline").read_bytes().startswith(b"ray::NodeSampler"):
                continue
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(d)] = (int(f[11]) + int(f[12])) / TICK
        except (OSError, IndexError, ValueError):
            continue
    return out


def run(interval: float, size: int, extra: list[str]) -> dict:
    exe = str(Path(sys.executable).with_name("simreg"))
    with tempfile.TemporaryDirectory(prefix="simreg-sysm-") as d:
        cmd = [exe, "distill", "--output-dir", f"{d}/run", f"data.train_size={size}", "train.epochs=2", "eval.val_every=0",
               "cache.enabled=false", "data.knn_bank_size=1000", "data.knn_query_size=500",
               f"tracking.system_metrics_s={interval:g}", *extra]
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        t0 = time.perf_counter()
        seen: dict[int, float] = {}
        first_seen: float | None = None
        with open(f"{d}/log", "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            while p.poll() is None:
                now = _samplers()
                if now and first_seen is None:
                    first_seen = time.perf_counter()
                seen.update(now)
                try:
                    p.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"simreg distill failed (exit {p.returncode}):\n{Path(d, 'log').read_text()[-3000:]}")
        s = json.loads(Path(d, "run", "summary.json").read_text())
        from mlflow.tracking import MlflowClient

        client = MlflowClient(s["mlflow_tracking_uri"])
        logged = len(client.get_metric_history(s["mlflow_run_id"], "system/cpu_utilization_percentage"))
    rates = [h["train/images_per_s"] for h in s["history"]]
    actors_s = (time.perf_counter() - first_seen) if first_seen is not None else 0.0
    in_driver = float((s.get("system_metrics") or {}).get("sampler_cpu_s") or 0.0)
    cpu_s = sum(seen.values()) + in_driver
    cores = os.cpu_count() or 1
    return {"interval_s": interval, "images_per_s": sum(rates) / len(rates), "epochs": rates, "wall_s": wall,
            "sampler_cpu_s": cpu_s, "sampler_cpu_s_in_driver": in_driver, "sampler_actor_processes": len(seen),
            "sampler_actors_alive_s": actors_s, "sampler_share": cpu_s / (wall * cores), "logged_steps": logged,
            "system_metrics": s.get("system_metrics")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--intervals", default="0,10,1", help="seconds between samples, comma-separated; 0 = off (the baseline)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=10000, help="data.train_size of each run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    a = ap.parse_args()
    intervals = [float(x) for x in a.intervals.split(",")]
    runs: list[dict] = []
    for r in range(a.rounds):
        for iv in intervals:
            res = run(iv, a.images, a.overrides)
            res["round"] = r
            runs.append(res)
            print(f"round {r + 1}, interval {iv:g} s: {res['images_per_s']:.0f} images/s, samplers {res['sampler_cpu_s']:.3f} CPU s "
                  f"over {res['wall_s']:.0f} s ({100 * res['sampler_share']:.3f}% of the machine; {res['sampler_actor_processes']} "
                  f"sampler processes), {res['logged_steps']} samples logged", flush=True)
    base = [x["images_per_s"] for x in runs if x["interval_s"] == intervals[0]]
    base_rate = sum(base) / len(base)
    print(f"\nsimreg distill, {a.images:,} images x 2 epochs, {a.rounds} rounds; baseline: interval {intervals[0]:g} s")
    print(f"{'interval (s)':>12}{'images/s':>10}{'ratio':>8}{'sampler CPU share':>20}{'samples logged':>16}")
    table = {}
    for iv in intervals:
        mine = [x for x in runs if x["interval_s"] == iv]
        rate = sum(x["images_per_s"] for x in mine) / len(mine)
        share = sum(x["sampler_share"] for x in mine) / len(mine)
        table[f"{iv:g}"] = {"images_per_s": rate, "ratio": rate / base_rate, "sampler_share": share,
                            "logged_steps": [x["logged_steps"] for x in mine]}
        print(f"{iv:>12g}{rate:>10.0f}{rate / base_rate:>8.3f}{100 * share:>19.3f}%{sum(x['logged_steps'] for x in mine) / len(mine):>16.1f}")
    if a.json:
        a.json.write_text(json.dumps({"intervals": table, "runs": runs, "images": a.images, "rounds": a.rounds}, indent=2))


if __name__ == "__main__":
    main()
