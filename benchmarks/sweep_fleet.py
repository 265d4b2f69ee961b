"""A sweep's teachers: one fleet for all trials against each trial's own teacher actors, side by side.

    python benchmarks/sweep_fleet.py                       # 3 trials x 1024 images x 2 epochs, each mode once (~8 min on 2 cores)
    python benchmarks/sweep_fleet.py --json sweep_fleet.json --images 1024 --epochs 2

Runs the real command twice on one two-raylet cluster started on this machine (``ray start``): the head offers
a ``teacher`` resource (every teacher actor lands there), the second node a ``student`` resource (every trial's
student worker lands there). The sweep: ``augment.strength`` over three values, run concurrently, no target
cache and a fresh view every epoch, so every trial needs its own targets (the cache cannot help). Once with
``teacher_pool.fleet=true`` (the default), once with ``teacher_pool.fleet=false`` (the baseline, measured in
the same run). Every process of the cluster is sampled (``memory.py``): the most teacher processes alive at
once, the peak PSS of all processes together and the sweep's wall time; teacher forwards are the trials'
``teacher/<name>/forward_rows`` (their child runs), the rows needed are trials x images x epochs. Linux only.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from memory import run_sampled
from scaling import stop_cluster, two_raylet_cluster

TEACHER = "simclr_r10t"


def space(images: int, epochs: int, strengths: list[float]) -> str:
    return json.dumps({
        "description": "augmentation strength, every trial concurrently",
        "search": {"algorithm": "grid", "metric": "val/top1_20nn", "mode": "max"},
        "base": {"data.train_size": images, "train.epochs": epochs, "data.knn_bank_size": 500, "data.knn_query_size": 250,
                 "eval.val_bank_size": 500, "eval.val_query_size": 250},
        "params": {"augment.strength": {"grid": strengths}},
    })


def child_forwards(folder: Path) -> dict:
    """Teacher rows each trial's child run counted at its last epoch (from the sweep's MLflow store)."""
    from mlflow.tracking import MlflowClient

    summary = json.loads((folder / "sweep_summary.json").read_text())
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    rows = []
    for t in summary["trials"]:
        m = client.get_run(t["mlflow_run_id"]).data.metrics
        rows.append({k: int(m.get(f"teacher/{TEACHER}/{k}_rows", 0)) for k in ("forward", "cached", "shared")})
    return {"trial_rows": rows}


def run(mode: str, fleet: bool, address: str, env: dict[str, str], space_file: Path, every: float) -> dict:
    overrides = [
        "--space", str(space_file), f"ray.address={address}", f"teacher_pool.fleet={str(fleet).lower()}",
        "cache.enabled=false", "augment.view_bank=null", "augment.mode=same", "augment.teacher=strong", "augment.student=strong",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "scaling.resources={student: 1}",
        "teacher_pool.resources={teacher: 1}", "teacher_pool.cpus_per_actor=0.5", "teacher_pool.view_tasks=1",
        "teacher_pool.cpus_per_view_task=0.2",
    ]
    r = run_sampled(overrides, every, env=env, whole_cluster=True, command="sweep", collect=child_forwards)
    s = r["summary"]
    return {
        "mode": mode, "wall_s": r["wall_s"], "pss_gib": r["host_peak_gib"], "teacher_processes": r["most_processes"]["teacher actor"],
        "teacher_pss_gib": r["peak_pss_sum_gib"]["teacher actor"], "trials": len(s["trials"]), "failed": s["failed_trials"],
        "forwards": sum(t["forward"] for t in r["trial_rows"]), "trial_rows": r["trial_rows"], "fleet_counts": s.get("teacher_fleet", {}),
        "val_top1_20nn": {str(t["params"]): t["metrics"].get("top1_20nn") for t in s["trials"]},
        "peak_pss_gib_by_role": r["peak_pss_sum_gib"], "most_processes_by_role": r["most_processes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--strengths", default="0.3,0.65,1.0", help="augment.strength of each trial")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between memory samples")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    strengths = [float(s) for s in a.strengths.split(",")]
    trials = len(strengths)
    space_file = Path(tempfile.mkdtemp(prefix="simreg-fleet-")) / "space.yaml"
    space_file.write_text(space(a.images, a.epochs, strengths))  # JSON is YAML
    # head: the teachers (room for one per trial in the baseline); node: the students, a CPU each plus view tasks
    address, env, root = two_raylet_cluster(2, {"teacher": trials}, {"student": trials}, node_cpus=trials + 1)
    try:
        per_trial = run("per-trial teachers", False, address, env, space_file, a.every)
        fleet = run("teacher fleet", True, address, env, space_file, a.every)
    finally:
        stop_cluster(env, root)
    needed = trials * a.images * a.epochs
    print(f"{trials}-trial augment.strength sweep {strengths}, {a.images} images x {a.epochs} epochs, two raylets on this machine")
    print(f"{'':<22}{'teacher processes':>18}{'teacher forwards':>18}{'peak PSS (GiB)':>16}{'teacher PSS':>13}{'wall (s)':>10}")
    for r in (per_trial, fleet):
        print(f"{r['mode']:<22}{r['teacher_processes']:>18}{r['forwards']:>18,}{r['pss_gib']:>16.2f}{r['teacher_pss_gib']:>13.2f}{r['wall_s']:>10.0f}")
    print(f"{'fleet / per-trial':<22}{fleet['teacher_processes'] / max(per_trial['teacher_processes'], 1):>18.2f}"
          f"{fleet['forwards'] / max(per_trial['forwards'], 1):>18.2f}{fleet['pss_gib'] / per_trial['pss_gib']:>16.2f}"
          f"{fleet['teacher_pss_gib'] / max(per_trial['teacher_pss_gib'], 1e-9):>13.2f}{fleet['wall_s'] / per_trial['wall_s']:>10.2f}")
    print(f"teacher forwards needed (distinct strength, view, sample): {needed:,}")
    print(f"\n{'peak PSS by role (GiB), processes at once':<44}{'per-trial':>12}{'fleet':>12}")
    for role in per_trial["peak_pss_gib_by_role"]:
        print(f"{role:<44}" + "".join(f"{r['peak_pss_gib_by_role'][role]:>7.2f} ({r['most_processes_by_role'][role]:>2})" for r in (per_trial, fleet)))
    res = {
        "trials": trials, "images": a.images, "epochs": a.epochs, "strengths": strengths,
        "teacher_processes_fleet": fleet["teacher_processes"], "teacher_processes_per_trial": per_trial["teacher_processes"],
        "teacher_forwards_fleet": fleet["forwards"], "teacher_forwards_per_trial": per_trial["forwards"], "teacher_forwards_needed": needed,
        "pss_gib_fleet": fleet["pss_gib"], "pss_gib_per_trial": per_trial["pss_gib"],
        "wall_fleet_s": fleet["wall_s"], "wall_per_trial_s": per_trial["wall_s"], "runs": [per_trial, fleet],
    }
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
