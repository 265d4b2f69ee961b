"""Start-up of ``simreg distill``: each phase from the command's start to the first optimizer step, and the
first epoch's rate against the epochs after it.

    python benchmarks/startup.py                      # the demo without the cache, 3 epochs, twice (~5 min on 2 cores)
    python benchmarks/startup.py --repeat 3 --json startup.json
    python benchmarks/startup.py --device cuda        # on a GPU machine: students and teachers on the GPU

Runs the real command (``simreg distill train.epochs=3 cache.enabled=false eval.val_every=0``, the demo
otherwise) and reads the run's own start-up marks (``summary.json`` ``startup_s``: data ready, Ray ready,
``fit`` called, first teacher actor ready, rank 0's train function running, rank 0's first optimizer step),
shifted to the command's start (the CLI's own imports come first). Per epoch it reads the run's history:

- ``first_epoch_images_per_s``: epoch 1's images over its time *after* its first batch arrived (the wait for
  the first batch is start-up, counted in ``first_step_s``); ``first_epoch_images_per_s_with_wait`` includes it.
- ``steady_images_per_s``: the mean of the epochs after the first, each over its whole time.

The baseline, measured in the same run, is the steady rate: the table ends with the first epoch's ratio to
it (goal: at least 0.85) and the first step against its goal (30 s on a 2-core machine). Figures are the
median over ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("data_ready", "ray_ready", "fit", "teacher_ready", "workers_ready", "first_step")
GOAL_FIRST_STEP_S, GOAL_FIRST_EPOCH_RATIO = 30.0, 0.85


def one_run(overrides: list[str], work: Path, i: int) -> dict[str, float]:
    out = work / f"run{i}"
    cmd = [str(Path(sys.executable).with_name("simreg")), "distill", "--output-dir", str(out), *overrides]
    t0 = time.time()
    with open(work / f"run{i}.log", "w") as logf:
        rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"simreg distill failed (exit {rc}): see {work / f'run{i}.log'}")
    s = json.loads((out / "summary.json").read_text())
    cli_s = s["started_at"] - t0  # the command's own start (interpreter, imports, config) before distill()
    row = {"cli": cli_s} | {k: cli_s + v for k, v in s["startup_s"].items()}
    h = s["history"]
    first = h[0]
    row["first_epoch_images_per_s"] = first["train/images"] / (first["train/epoch_s"] - first["train/first_batch_wait_s"])
    row["first_epoch_images_per_s_with_wait"] = first["train/images_per_s"]
    row["steady_images_per_s"] = statistics.mean(m["train/images_per_s"] for m in h[1:])
    row["first_batch_wait_s"] = first["train/first_batch_wait_s"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="more dotted config overrides")
    a = ap.parse_args()
    if a.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the steady rate comes from the epochs after the first)")
    overrides = [f"train.epochs={a.epochs}", "cache.enabled=false", "eval.val_every=0", *a.overrides]
    if a.device == "cuda":
        overrides += ["scaling.use_gpu=true"]
    work = Path(tempfile.mkdtemp(prefix="simreg-startup-"))
    try:
        rows = [one_run(overrides, work, i) for i in range(a.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rows if k in r) for k in rows[0]}
    print(f"`simreg distill {' '.join(overrides)}`, median of {a.repeat} run(s)\n")
    print("| phase (s from the command's start) | " + " | ".join(f"run {i + 1}" for i in range(len(rows))) + " | median |")
    print("|---|" + "---|" * (len(rows) + 1))
    for k in ("cli", *PHASES):
        print(f"| {k} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for r in rows) + f" | {med.get(k, float('nan')):.1f} |")
    print("| first batch wait in epoch 1 | " + " | ".join(f"{r['first_batch_wait_s']:.1f}" for r in rows) + f" | {med['first_batch_wait_s']:.1f} |")
    ratio = med["first_epoch_images_per_s"] / med["steady_images_per_s"]
    print(f"\n| images/s | median |\n|---|---|\n| epoch 1 after its first batch | {med['first_epoch_images_per_s']:.0f} |")
    print(f"| epoch 1 with the wait | {med['first_epoch_images_per_s_with_wait']:.0f} |\n| steady (epochs 2-{a.epochs}) | {med['steady_images_per_s']:.0f} |")
    print(f"\nfirst step {med['first_step']:.1f} s after the command (goal <= {GOAL_FIRST_STEP_S:.0f} s); "
          f"first epoch at {ratio:.2f}x the steady rate (goal >= {GOAL_FIRST_EPOCH_RATIO})")
    if a.json:
        a.json.write_text(json.dumps({
            "first_step_s": med["first_step"], "first_epoch_images_per_s": med["first_epoch_images_per_s"],
            "first_epoch_images_per_s_with_wait": med["first_epoch_images_per_s_with_wait"],
            "steady_images_per_s": med["steady_images_per_s"], "first_epoch_ratio": ratio,
            "phases_s": {k: med[k] for k in ("cli", *PHASES) if k in med}, "runs": rows, "overrides": overrides,
        }, indent=2))


if __name__ == "__main__":
    main()
