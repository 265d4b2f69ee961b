"""Memory of ``simreg distill`` against the data size: every process of the run sampled while it trains.

    python benchmarks/memory.py                        # 10k and 60k images, one epoch each (~8 min on 2 cores)
    python benchmarks/memory.py --sizes 10000,60000 --json memory.json

Runs the real command (``simreg distill data.train_size=N train.epochs=1 eval.val_every=0``, the demo
otherwise, no target cache) once per size and samples, every ``--every`` seconds, the RSS and PSS
(``/proc/PID/smaps_rollup``) of the driver and every process under it: Ray Train workers, teacher actors,
view-stage task workers and Ray's own processes (raylet, GCS, dashboard, Train's and Data's actors). It
prints each role's peak per process and the host's peak (PSS summed over all of them), and the ratio of the
largest size's peaks to the smallest's (the baseline, measured in the same run). Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROLES = ("driver", "train worker", "teacher actor", "view tasks / idle workers", "ray's own")
GIB = 2**30


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _role(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
    if "RayTrainWorker" in cmd:
        return "train worker"
    if "PooledTeacher" in cmd:
        return "teacher actor"
    if cmd.startswith("ray::IDLE") or "MapBatches" in cmd or "_views_and_targets" in cmd or "ReadItems" in cmd:
        return "view tasks / idle workers"
    return "ray's own"


def _mem(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous) in bytes. Anonymous memory is the process's own (heap, arrays); RSS also counts every
    page of a shared mapping it has touched, such as Ray's object store in /dev/shm."""
    rss = pss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Anonymous:"):
                anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss, anon


def _ray_processes() -> list[int]:
    """Every Ray process on this machine (a cluster started by ``ray start``: not the driver's children)."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::") or b"/ray/" in cmd.split(b"\0")[0] or b"ray/_private" in cmd or b"ray/core/src" in cmd:
            out.append(int(d))
    return out


def run_sampled(
    overrides: list[str], every: float, env: dict[str, str] | None = None, whole_cluster: bool = False, command: str = "distill",
    collect: Callable[[Path], dict] | None = None,
) -> dict:
    """``simreg COMMAND *overrides`` (distill or sweep) in a temporary folder, every process of it sampled every
    ``every`` s: wall time, the run's summary, per-role peak RSS and summed PSS, the most processes of each role
    alive at once, the host's peak PSS. ``whole_cluster``: the run joins a cluster started apart (``ray start``),
    whose processes are not the driver's children: every Ray process on the machine is sampled too.
    ``collect(folder)``: more figures read from the run's folder before it is deleted."""
    out = Path(tempfile.mkdtemp(prefix="simreg-mem-"))
    exe = str(Path(sys.executable).with_name("simreg"))
    cmd = [exe, command, "--output-dir", str(out / "run"), *overrides]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **(env or {})}
    t0, launched_at = time.perf_counter(), time.time()
    log_path = out / "distill.log"
    log_file = open(log_path, "w")  # noqa: SIM115  (a file, not a pipe: a full pipe would stall the run)
    p = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, text=True)
    peak_rss = {r: 0 for r in ROLES}
    peak_anon = {r: 0 for r in ROLES}
    peak_pss_sum = {r: 0 for r in ROLES}
    most = {r: 0 for r in ROLES}  # processes of each role alive at once
    host_peak = 0
    samples = 0
    while p.poll() is None:
        rss_by: dict[str, int] = {r: 0 for r in ROLES}
        anon_by: dict[str, int] = {r: 0 for r in ROLES}
        pss_by: dict[str, int] = {r: 0 for r in ROLES}
        count_by: dict[str, int] = {r: 0 for r in ROLES}
        for pid in set(_tree(p.pid)) | (set(_ray_processes()) if whole_cluster else set()):
            role = _role(pid, p.pid)
            if not role:
                continue
            rss, pss, anon = _mem(pid)
            rss_by[role] = max(rss_by[role], rss)
            anon_by[role] = max(anon_by[role], anon)
            pss_by[role] += pss
            count_by[role] += 1
        for r in ROLES:
            peak_rss[r] = max(peak_rss[r], rss_by[r])
            peak_anon[r] = max(peak_anon[r], anon_by[r])
            peak_pss_sum[r] = max(peak_pss_sum[r], pss_by[r])
            most[r] = max(most[r], count_by[r])
        host_peak = max(host_peak, sum(pss_by.values()))
        samples += 1
        try:
            p.wait(timeout=every)  # the next sample, or the run's end (not a whole ``every`` after it)
        except subprocess.TimeoutExpired:
            pass
    log_file.close()
    log = log_path.read_text(errors="replace")
    if p.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f"simreg {command} {' '.join(overrides)} failed (exit {p.returncode}):\n{log[-3000:]}")
    summary = json.loads((out / "run" / ("summary.json" if command == "distill" else "sweep_summary.json")).read_text())
    extra = collect(out / "run") if collect is not None else {}
    shutil.rmtree(out, ignore_errors=True)  # the run folder (checkpoints, MLflow store): ~120 MB
    return {"wall_s": time.perf_counter() - t0, "launched_at": launched_at, "summary": summary, "samples": samples, **extra,
            "most_processes": most,
            "peak_rss_gib": {r: v / GIB for r, v in peak_rss.items()},
            "peak_anon_gib": {r: v / GIB for r, v in peak_anon.items()},
            "peak_pss_sum_gib": {r: v / GIB for r, v in peak_pss_sum.items()}, "host_peak_gib": host_peak / GIB}


def measure(size: int, every: float, extra: list[str]) -> dict:
    r = run_sampled([f"data.train_size={size}", "train.epochs=1", "eval.val_every=0", "cache.enabled=false", "augment.view_bank=null",
                     "data.knn_bank_size=1000", "data.knn_query_size=500", *extra], every)
    summary = r.pop("summary")
    return {"images": size, **r, "train_images_per_s": summary["train_images_per_s"], "unique_ids": summary["history"][-1]["train/unique_ids"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,60000", help="images per run, comma-separated (the first is the baseline)")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    runs = [measure(n, a.every, a.overrides) for n in sizes]
    head = f"{'peak per process (RSS, GiB)':<30}" + "".join(f"{r['images']:>10,}" for r in runs) + f"{'ratio':>8}"
    print(head)
    for role in ROLES:
        vals = [r["peak_rss_gib"][role] for r in runs]
        ratio = vals[-1] / vals[0] if vals[0] else float("nan")
        print(f"{role:<30}" + "".join(f"{v:>10.2f}" for v in vals) + f"{ratio:>8.2f}")
    hv = [r["host_peak_gib"] for r in runs]
    print(f"{'host (PSS of all processes)':<30}" + "".join(f"{v:>10.2f}" for v in hv) + f"{hv[-1] / hv[0]:>8.2f}")
    print(f"{'train images/s':<30}" + "".join(f"{r['train_images_per_s']:>10.0f}" for r in runs))
    key = {10000: "10k", 60000: "60k"}
    res: dict = {"runs": runs}
    for r in runs:
        k = key.get(r["images"], str(r["images"]))
        res[f"worker_peak_gib_{k}"] = r["peak_rss_gib"]["train worker"]
        res[f"host_peak_gib_{k}"] = r["host_peak_gib"]
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
