"""Cost of remote storage: the demo with every file on local disk against every file in an S3 bucket.

    python benchmarks/storage.py                   # the demo twice (~12 min on 2 cores)
    python benchmarks/storage.py --quick --json storage.json

Runs the real command twice in one run, each with a cold target cache of its own:
- local:  ``simreg distill --output-dir DIR cache.dir=DIR2`` (MLflow: the run folder's sqlite file);
- bucket: ``simreg distill --output-dir s3://bench/run cache.dir=s3://bench/cache --tracking-uri URL``,
  against an S3-compatible server (moto's standalone server) and an ``mlflow server`` whose artifacts go to
  that bucket, both on 127.0.0.1 (so it measures the storage layer's own cost, not a network's).
Prints each run's wall (command start to exit), fit, images/s and what it stored, and the bucket run's wall
over the local run's (the baseline, measured in the same run). Checkpoints upload asynchronously when the
output folder is in an object store (``CheckpointUploadMode.ASYNC``).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.services import S3_ENV, make_bucket, mlflow_server, moto_server, s3_objects  # noqa: E402

QUICK = ["data.train_size=2000", "train.epochs=4"]


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({rc}); the end of its log:\n{log.read_text()[-3000:]}")
    return wall


def _local_bytes(*dirs: Path) -> int:
    return sum(p.stat().st_size for d in dirs for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"a smaller run ({' '.join(QUICK)}) instead of the demo")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    extra = QUICK if args.quick else []
    simreg = str(Path(sys.executable).with_name("simreg"))
    tmp = Path(tempfile.mkdtemp(prefix="simreg-bench-storage-"))
    rows = []
    try:
        with moto_server(tmp) as endpoint:
            s3env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
            os.environ.update(s3env)
            make_bucket(endpoint, "bench")
            with mlflow_server(tmp, endpoint, "s3://bench/mlflow") as url:
                env = {**os.environ, **s3env, "HF_HUB_OFFLINE": "1"}
                local_out, local_cache = tmp / "local-run", tmp / "local-cache"
                wall = _run([simreg, "distill", "--output-dir", str(local_out), f"cache.dir={local_cache}", *extra], env, tmp / "local.log")
                s = json.loads((local_out / "summary.json").read_text())
                rows.append({"storage": "local disk + sqlite", "wall_s": wall, "fit_s": s["fit_s"], "images_per_s": s["train_images_per_s"],
                             "stored_mib": _local_bytes(local_out, local_cache) / 2**20, "student_gain_20nn": s["student_gain_20nn"]})
                wall = _run([simreg, "distill", "--output-dir", "s3://bench/run", "cache.dir=s3://bench/cache", "--tracking-uri", url, *extra],
                            env, tmp / "bucket.log")
                import boto3

                s = json.loads(boto3.client("s3", endpoint_url=endpoint).get_object(Bucket="bench", Key="run/summary.json")["Body"].read())
                stored = sum(s3_objects(endpoint, "bench").values())
                rows.append({"storage": "S3 bucket + MLflow server", "wall_s": wall, "fit_s": s["fit_s"], "images_per_s": s["train_images_per_s"],
                             "stored_mib": stored / 2**20, "student_gain_20nn": s["student_gain_20nn"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["wall_s"]
    print(f"simreg distill {' '.join(extra) or '(the demo)'}: local storage against an S3 bucket (moto server on 127.0.0.1)\n")
    print("| storage | wall s | fit s | train images/s | stored MiB | 20-NN gain | wall / local |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['storage']} | {r['wall_s']:.0f} | {r['fit_s']:.0f} | {r['images_per_s']:.0f} | {r['stored_mib']:.0f} | "
              f"{r['student_gain_20nn']:+.2f} | {r['wall_s'] / base:.3f} |")
    result = {"runs": rows, "bucket_over_local_wall": rows[1]["wall_s"] / base}
    print(f"\nbucket / local wall: {result['bucket_over_local_wall']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
