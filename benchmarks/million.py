"""simreg at a million images: every process's memory and the cost per image against the dataset's size.

    python benchmarks/million.py --json million.json --every 10 --inprocess-images 100000 teacher_pool.batch_size=512 \
        scaling.num_workers=1 scaling.cpus_per_worker=1 teacher_pool.threads=1 scaling.threads_per_worker=1 \
        cache.memory_mib=64 ray.object_store_mib=1024                                                        # ~40 min on 2 cores
    python benchmarks/million.py --sizes 20000,200000 --no-s3         # a quicker look

Each point is the real command, ``simreg distill``, on the synthetic source (``data.source=synthetic``: images
generated from (seed, index) in the view tasks, never all in memory) with timm's tiny ``test_resnet`` as a
random teacher (``weights=random``) and as the student, at 32 px: the orchestration (Ray Data blocks, view
tasks, the teacher actor, the target cache, the Train workers), not the models, is what is measured. Two
epochs with one view per image (``augment.view_bank=1``) and the target cache on: epoch 1 computes every
target and stores it, epoch 2 reads every one back from the cache (with a bank of K views the first K epochs
would all compute). The layout of the first command (one Train worker and the teacher actor on one thread
each, 512-row blocks) is the fastest measured on 2 cores (at 20,000 images, epoch 2: 1,707 images/s, against
1,244-1,383 with 2 torch threads in the worker, or in the worker and the teacher actor); its 64 MiB shard bound
makes epoch 2 at 1M read its shards back from storage, and its 1 GiB object store bounds what every
block-moving process maps of it. The cache lives in a fresh folder per point (a local one; at the first
size also a bucket on an S3 server, moto's, on 127.0.0.1). Every process of a run is sampled for memory every
``--every`` s (``benchmarks/memory.py``: peak RSS per process kind). After each run, ``simreg cache info`` is
timed on its cache. The ceiling: the same views, teacher and student step in one process with 2 torch threads
(``inprocess``), over the largest size's images; the pipeline's own cost per image is the difference of the two
per-image times.

Goals: every kind's peak RSS at the largest size <= 1.1 x its peak at the smallest (+64 MiB); images/s at the
largest >= 0.9 x at the smallest in both epochs; ``simreg cache info`` within 2 x; epoch 2 on S3 >= 0.9 x local.
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

from memory import ROLES, run_sampled  # benchmarks/memory.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.services import S3_ENV, make_bucket, moto_server  # noqa: E402

MIB = 2**20
TEACHER = [{"name": "rand", "arch": "test_resnet", "weights": "random", "input_size": 32}]


def overrides(n: int, cache_dir: str, extra: list[str]) -> list[str]:
    return [
        "data.source=synthetic", f"data.synthetic.images={n}", "data.synthetic.held_out=2000", "data.train_size=null",
        "data.store_size=32", "data.view_size=32", "data.knn_bank_size=1000", "data.knn_query_size=500",
        f"teachers={json.dumps(TEACHER)}", "student.arch=test_resnet", "student.input_size=32",
        "train.epochs=2", "augment.view_bank=1", "eval.val_every=0", "cache.enabled=true", f"cache.dir={cache_dir}",
        *extra,
    ]


def cache_info_s(cache_dir: str, env: dict[str, str]) -> tuple[float, str]:
    """Wall time of ``simreg cache info --dir CACHE`` (the command a user runs: its start-up included), and its output."""
    exe = str(Path(sys.executable).with_name("simreg"))
    t0 = time.perf_counter()
    p = subprocess.run([exe, "cache", "info", "--dir", cache_dir], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"simreg cache info --dir {cache_dir} failed: {p.stderr[-2000:]}")
    return took, p.stdout


def point(n: int, cache_dir: str, every: float, extra: list[str], env: dict[str, str] | None = None) -> dict:
    label = "S3" if cache_dir.startswith("s3://") else "local"
    print(f"{n:,} images, cache on {label}: simreg distill ...", flush=True)
    r = run_sampled(overrides(n, cache_dir, extra), every, env)
    s = r["summary"]
    h = s["history"]
    info_s, info = cache_info_s(cache_dir, {**os.environ, **(env or {})})
    rates = {f"epoch{e + 1}": h[e]["train/images_per_s"] for e in range(len(h))}
    row = {
        "images": n, "cache": label, "wall_s": r["wall_s"], "images_per_s": rates,
        "epoch_s": {f"epoch{e + 1}": h[e]["train/epoch_s"] for e in range(len(h))},
        "trained_images": {f"epoch{e + 1}": h[e]["train/images"] for e in range(len(h))},
        "teacher_rows": s["teacher_rows"], "peak_rss_mib": {k: v * 1024 for k, v in r["peak_rss_gib"].items()},
        "peak_anon_mib": {k: v * 1024 for k, v in r["peak_anon_gib"].items()},
        "data_wait_s": {f"epoch{e + 1}": h[e].get("train/data_wait_s") for e in range(len(h))},
        "most_processes": r["most_processes"], "host_peak_gib": r["host_peak_gib"], "samples": r["samples"],
        "cache_info_s": info_s, "cache_info": info.strip().splitlines(),
        "student_20nn": s["student_knn"]["top1_20nn"], "random_student_20nn": s["random_student_knn"]["top1_20nn"],
    }
    rows = s["teacher_rows"]["rand"]
    print(f"  wall {r['wall_s']:.0f} s; images/s {rates}; teacher rows {rows}; cache info {info_s:.2f} s; "
          f"peak RSS MiB { {k: round(v) for k, v in row['peak_rss_mib'].items()} }", flush=True)
    return row


def inprocess(n: int, images: int | None, extra: list[str], cache_dir: Path) -> dict:
    """The ceiling: one process, 2 torch threads, the product's pieces (synthetic source, views, teacher with the
    target cache, objective, optimizer, ``train_epoch``) on blocks of the same data, two epochs as the runs do
    (the first computes and stores every target, the second reads them); no Ray."""
    import torch

    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.data.views import add_views
    from simreg.orchestrator.pipeline.teacher import TeacherInference
    from simreg.orchestrator.train.builders import (
        build_objective,
        build_optimizer,
        cache_spec,
        student_layout,
        teacher_options,
        view_plan,
    )
    from simreg.orchestrator.train.epoch import train_epoch
    from simreg.orchestrator.train.prepare import prepare

    torch.set_num_threads(2)
    cfg = load_config(None, overrides(n, str(cache_dir), extra))
    prep = prepare(cfg, quiet=True)
    teacher = TeacherInference(prep.specs[0], 2, device="cpu", **teacher_options(cfg, cache_spec(cfg, prep.train)))
    torch.manual_seed(cfg.seed)
    obj = student_layout(build_objective(cfg, prep.teacher_dims, prep.target_maps), cfg)
    bs = cfg.train.batch_size
    steps = (images or len(prep.train)) // bs
    opt, sched = build_optimizer(cfg, obj, steps)
    plan = view_plan(cfg)

    def batches(epoch: int):
        done = 0
        for block in prep.train.blocks(bs):
            if images is not None and done >= images:
                return
            b = teacher(add_views(block, epoch=epoch, seed=cfg.seed, plan=plan))
            done += len(b["sample_id"])
            yield {"view": torch.from_numpy(b["view"]), "target_rand": torch.from_numpy(b["target_rand"])}

    out: dict = {"images": len(prep.train), "images_per_s": {}, "seconds": {}}
    for epoch in range(cfg.train.epochs):
        t0 = time.perf_counter()
        stats = train_epoch(obj, batches(epoch), opt, sched, ["rand"], torch.device("cpu"))
        took = time.perf_counter() - t0
        out["trained"] = stats.images
        out["seconds"][f"epoch{epoch + 1}"] = took
        out["images_per_s"][f"epoch{epoch + 1}"] = stats.images / took
        print(f"in process, epoch {epoch + 1}: {stats.images:,} images of {len(prep.train):,} in {took:.0f} s, "
              f"{stats.images / took:.0f} images/s ({teacher.forward_rows} teacher rows so far, {teacher.cached_rows} from the cache)",
              flush=True)
    return out


def plot(res: dict, path: Path) -> None:
    """Memory (anonymous where sampled, else RSS) per process kind and images/s per epoch against the images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [str(n) for n in res["rows"]]
    xs = [int(n) for n in sizes]
    mem_key = "peak_anon_mib" if res.get("peak_anon_mib") else "peak_rss_mib"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for role, by in res[mem_key].items():
        a.plot(xs, [by[n] for n in sizes], marker="o", label=role)
    a.set(xscale="log", xlabel="images", ylabel="MiB", ylim=(0, None),
          title="peak " + ("anonymous memory" if mem_key == "peak_anon_mib" else "RSS") + " per process")
    a.legend(fontsize=8)
    for ep, by in res["images_per_s"].items():
        b.plot(xs, [by[n] for n in sizes], marker="o", label=ep)
    b.set(xscale="log", xlabel="images", ylabel="images/s", ylim=(0, None), title="training rate")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="images per run, comma-separated (the first is the baseline)")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--no-s3", action="store_true", help="skip the run with the cache on an S3 server")
    ap.add_argument("--no-inprocess", action="store_true", help="skip the in-process ceiling")
    ap.add_argument("--inprocess-images", type=int, default=None, help="images the in-process loop trains on (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="write memory and rate against the images as a PNG")
    ap.add_argument("--replot", type=Path, default=None, help="only plot the JSON of an earlier run (with --plot)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    a = ap.parse_args()
    if a.replot is not None:
        plot(json.loads(a.replot.read_text()), a.plot or a.replot.with_suffix(".png"))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="simreg-million-"))
    runs, s3_row = [], None
    try:
        for n in sizes:
            cache = tmp / f"cache-{n}"
            runs.append(point(n, str(cache), a.every, a.overrides))
            shutil.rmtree(cache, ignore_errors=True)
        if not a.no_s3:
            with moto_server(tmp) as endpoint:
                env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
                os.environ.update(env)  # make_bucket's client, and the cache info command
                make_bucket(endpoint, "simreg-bench")
                s3_row = point(sizes[0], f"s3://simreg-bench/cache-{sizes[0]}", a.every, a.overrides, env)
        ceiling = None if a.no_inprocess else inprocess(sizes[-1], a.inprocess_images, a.overrides, tmp / "cache-inprocess")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lo, hi = runs[0], runs[-1]
    print(f"\nsimreg distill, synthetic {', '.join(f'{n:,}' for n in sizes)} images (test_resnet random teacher -> test_resnet, 32 px), "
          "2 epochs, view bank 1, cache on\n")
    for what, key in (("peak RSS per process (MiB)", "peak_rss_mib"), ("peak anonymous memory (MiB)", "peak_anon_mib")):
        print(f"{what:<30}" + "".join(f"{r['images']:>12,}" for r in runs) + f"{'ratio':>8}{'goal':>22}")
        for role in ROLES:
            v0, v1 = lo[key][role], hi[key][role]
            ok = v1 <= 1.1 * v0 + 64
            print(f"{role:<30}" + "".join(f"{r[key][role]:>12.0f}" for r in runs)
                  + f"{(v1 / v0 if v0 else float('nan')):>8.2f}{'<= 1.1x +64 MiB ' + ('met' if ok else 'MISSED'):>22}")
    for ep in ("epoch1", "epoch2"):
        r0, r1 = lo["images_per_s"][ep], hi["images_per_s"][ep]
        print(f"{'images/s ' + ep:<30}" + "".join(f"{r['images_per_s'][ep]:>12.0f}" for r in runs)
              + f"{r1 / r0:>8.2f}{'>= 0.9x ' + ('met' if r1 >= 0.9 * r0 else 'MISSED'):>22}")
    c0, c1 = lo["cache_info_s"], hi["cache_info_s"]
    print(f"{'simreg cache info (s)':<30}" + "".join(f"{r['cache_info_s']:>12.2f}" for r in runs)
          + f"{c1 / c0:>8.2f}{'<= 2x ' + ('met' if c1 <= 2 * c0 else 'MISSED'):>22}")
    if s3_row is not None:
        ratio = s3_row["images_per_s"]["epoch2"] / lo["images_per_s"]["epoch2"]
        print(f"\nepoch 2 at {sizes[0]:,} images, cache on S3 (moto, 127.0.0.1): {s3_row['images_per_s']['epoch2']:.0f} images/s "
              f"against {lo['images_per_s']['epoch2']:.0f} on local disk: {ratio:.2f}x (goal >= 0.9x: {'met' if ratio >= 0.9 else 'MISSED'})")
    print()
    for ep in ("epoch1", "epoch2") if ceiling is not None else ():
        us_in, us = 1e6 / ceiling["images_per_s"][ep], 1e6 / hi["images_per_s"][ep]
        print(f"{ep} at {sizes[-1]:,}: in process (2 threads, no Ray) {us_in:.0f} us per image, pipeline {us:.0f}: "
              f"its own cost {us - us_in:+.0f} us per image (aim < 200)")
    if a.json:
        res = {
            "rows": sizes,
            "peak_rss_mib": {role: {str(r["images"]): r["peak_rss_mib"][role] for r in runs} for role in ROLES},
            "peak_anon_mib": {role: {str(r["images"]): r["peak_anon_mib"][role] for r in runs} for role in ROLES},
            "images_per_s": {ep: {str(r["images"]): r["images_per_s"][ep] for r in runs} for ep in ("epoch1", "epoch2")},
            "cache_info_s": {str(r["images"]): r["cache_info_s"] for r in runs},
            "s3_epoch2_images_per_s_100k": s3_row["images_per_s"]["epoch2"] if s3_row else None,
            "local_epoch2_images_per_s_100k": lo["images_per_s"]["epoch2"],
            "inprocess_images_per_s_1m": ceiling["images_per_s"]["epoch2"] if ceiling else None,
            "inprocess_images_per_s": ceiling["images_per_s"] if ceiling else None,
            "pipeline_us_per_image": {ep: 1e6 / hi["images_per_s"][ep] - 1e6 / ceiling["images_per_s"][ep]
                                      for ep in ("epoch1", "epoch2")} if ceiling else None,
            "runs": runs, "s3": s3_row, "inprocess": ceiling, "overrides": a.overrides,
        }
        a.json.write_text(json.dumps(res, indent=2))
        if a.plot:
            plot(res, a.plot)


if __name__ == "__main__":
    main()
