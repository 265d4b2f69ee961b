"""``distill(cfg)``: one SimReg distillation on Ray, in numbered phases.

    simreg distill                                   # the offline demo (Fashion-MNIST, SimCLR ResNet-10t teacher, target cache)
    simreg distill --config my.yaml train.epochs=8   # a YAML config plus dotted overrides
    simreg distill --output-dir runs/x --tracking-uri http://127.0.0.1:5000
    simreg distill --output-dir s3://bucket/runs/x --tracking-uri http://mlflow:5000   # nothing on local disk

1 data -> 2 teachers -> 3 Ray + pipeline -> 4 trainer -> 5 fit -> 6 evaluate -> 7 export -> 8 summary.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from simreg.models.errors import SimRegError, first_line
from simreg.orchestrator import fence
from simreg.orchestrator.config import SimRegConfig, flatten
from simreg.orchestrator.evaluation.final import final_knn, knn_table
from simreg.orchestrator.storage import Store, open_store, scratch
from simreg.orchestrator.tracking.backends import backend_for, default_tracking_uri
from simreg.orchestrator.tracking.base import TrackerBackend
from simreg.orchestrator.tracking.redact import redact_json_text, redact_tree
from simreg.orchestrator.tracking.system_metrics import SystemMetrics, system_step
from simreg.orchestrator.train.checkpoint import committed_epochs, train_storage
from simreg.orchestrator.train.placement import failure_config, plan_placement, resource_check
from simreg.orchestrator.train.prepare import Prepared, prepare
from simreg.orchestrator.train.progress import Progress
from simreg.orchestrator.train.rundir import check_resume, hold_output_dir, preflight, publish, safe_config_json
from simreg.orchestrator.train.trainer import images_per_epoch, init_ray, make_trainer

log = logging.getLogger("simreg")


def distill(cfg: SimRegConfig, output_dir: str | Path | Store, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run one distillation; writes ``output_dir/summary.json`` and returns the summary. ``output_dir``: a
    local folder or an object-store URI (``s3://bucket/prefix``): every file of the run goes there."""
    t_start, started_at = time.perf_counter(), time.time()
    fence.reset()  # a new driver: no stop decided yet (a notebook may run several)
    out = open_store(output_dir)
    # 0. where the run writes, checked before anything starts: one line naming the URI and the fix
    uri = tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri(out)
    preflight(cfg, out, uri)
    with hold_output_dir(out) as lock, scratch(out) as local:
        return _distill(cfg, out, local, uri, t_start, started_at, lock.token())


def _distill(
    cfg: SimRegConfig, out: Store, local: Path, tracking_uri: str, t_start: float, started_at: float, lease: dict[str, str] | None,
) -> dict[str, Any]:
    import ray
    import ray.train

    from simreg.orchestrator.evaluation.export import export_student
    from simreg.orchestrator.pipeline.actors import stop_actors
    from simreg.orchestrator.pipeline.state import start_run_state

    resuming = check_resume(cfg, out)
    config_file = publish(out, local, "config.json", safe_config_json(cfg))  # a local copy for MLflow at the end

    # 1-2. data (distillation subset, k-NN bank and queries, validation sets) and teachers, before Ray
    prep = run_maps(out, prepare(cfg, check_export=True), resuming)
    marks = {"data_ready": time.time()}  # start-up events, unix time (the run's actors add theirs to RunState)
    specs, teacher_dims, evals = prep.specs, prep.teacher_dims, prep.final_eval

    # 3. Ray, placement, tracking. While Ray starts, one thread opens the tracking store (MLflow's imports, a
    # sqlite schema) and imports Ray Train and the pipeline. The run itself opens only once placement passed:
    # a run refused here leaves no MLflow run behind.
    with ThreadPoolExecutor(1, thread_name_prefix="simreg-start") as pool:
        warming = pool.submit(_warm_start, tracking_uri)
        cluster = init_ray(cfg)
        from simreg.orchestrator.train.cached_data import cached_source  # torch, the target cache

        placement = plan_placement(cfg, cluster, check=False)
        resource_check(cfg, cluster, placement, cached=True)  # the students, before any cache read
        # Every target in the cache: no teacher actor and no view task will start, so only the students must fit
        cached = cached_source(cfg, prep.train, specs, teacher_dims, placement.teacher_gpus)
        resource_check(cfg, cluster, placement, cached=cached is not None)
        backend = warming.result()
    tracker = backend.open_run(cfg.tracking.experiment, out, cfg.name, {"simreg.command": "distill", "simreg.output_dir": out.uri})
    marks["ray_ready"] = time.time()
    log.info(
        "ray: %g CPUs, %g GPUs; %d student worker(s) on %s; teacher actors %s",
        cluster.get("CPU", 0), cluster.get("GPU", 0), cfg.scaling.num_workers, "GPU" if placement.use_gpu else "CPU",
        "none (every target cached)" if cached is not None else
        f"on {placement.teacher_gpus:g} GPU each" if placement.teacher_gpus else f"on CPU ({cfg.teacher_pool.threads} threads each)",
    )
    status, ended = "FAILED", False
    state: Any = None
    actors: list[Any] = []
    try:  # from here on, whatever fails ends the MLflow run FAILED (KILLED on Ctrl-C / SIGTERM)
        tracker.log_params(flatten(cfg))
        if prep.target_stats:  # teachers[i].normalize=standardize|phi_s: what the targets were normalised with
            from simreg.orchestrator.train.target_stats import stats_metrics

            tracker.log_metrics(stats_metrics(prep.target_stats), step=0)
        state = start_run_state()
        # 4. teacher actors + pipeline + trainer
        storage = train_storage(out)
        storage_path, storage_fs = (out / "ray").ray_storage()
        trainer, actors = make_trainer(prep, placement, state, cached, ray.train.RunConfig(
            name=storage.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=failure_config(cfg),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ), lease=lease)

        # 5. fit (from the latest checkpoint when the output dir holds an interrupted run)
        if resuming:
            log.info("resuming the interrupted run in %s from its latest checkpoint", out)
        t_fit = time.perf_counter()
        marks["fit"] = time.time()
        with Progress(state, tracker, images_per_epoch(prep), cfg.train.epochs, lambda: committed_epochs(storage)) as progress, \
                SystemMetrics(tracker.log_metrics, cfg.tracking.system_metrics_s, system_step(tracker)) as system:
            result = fit(trainer, state)
        fit_s = time.perf_counter() - t_fit
        if result.checkpoint is None:
            raise SimRegError(f"training in {out} produced no checkpoint: rerun with --verbose, or read Ray's logs in /tmp/ray/session_latest/logs")
        from simreg.orchestrator.train.checkpoint import load_state

        with result.checkpoint.as_directory() as d:
            final = load_state(Path(d))

        startup = startup_phases(started_at, {**marks, **ray.get(state.get_marks.remote())})
        log.info("start-up: %s", ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in startup.items()))
        teacher_rows = ray.get(state.get_teacher_rows.remote())
        records = ray.get(state.get_records.remote())
        for name, r in teacher_rows.items():
            log.info("teacher %s: %d rows through the teacher, %d from the target cache", name, r["forward"], r["cached"])

        # 6. evaluate: k-NN of teachers, student, random-init student, in a Ray task (GPU when there is one)
        eval_remote = ray.remote(final_knn).options(num_cpus=min(1.0, cluster.get("CPU", 1.0)), num_gpus=1 if placement.has_gpu else 0)
        ev = ray.get(eval_remote.remote(
            redact_tree(json.loads(cfg.model_dump_json())), [s.to_dict() for s in specs], teacher_dims, final["backbone"], final["heads"], evals.bank, evals.query,
        ))

        # 7. export
        weights = export_student(final["backbone"], cfg, local / "student", {"student_knn": ev["student_knn"]})
        onnx = student_onnx(local / "student") if cfg.export.onnx else None
        (out / "student").upload(local / "student")

        # 8. summary + MLflow; the checkpoint's history covers epochs of earlier attempts too
        history = list(final.get("history") or progress.history)
        imgs = sum(m["train/images"] for m in history)
        train_s = sum(m["train/epoch_s"] for m in history)
        summary: dict[str, Any] = {
            "name": cfg.name,
            "teacher_knn": ev["teacher_knn"],
            "student_knn": ev["student_knn"],
            "random_student_knn": ev["random_student_knn"],
            "student_gain_20nn": ev["student_knn"]["top1_20nn"] - ev["random_student_knn"]["top1_20nn"],
            "student_head_knn": ev.get("student_head_knn", {}),
            "knn_weighting": cfg.eval.knn_weighting,
            "epochs": cfg.train.epochs,
            "train_images": len(prep.train),
            "knn_bank_images": len(evals.bank),
            "knn_query_images": len(evals.query),
            "train_images_per_s": imgs / train_s if train_s > 0 else None,
            "fit_s": fit_s,
            "eval_s": ev["eval_s"],
            "wall_s": time.perf_counter() - t_start,
            "started_at": started_at,  # unix time distill() was called
            "startup_s": startup,  # seconds from started_at to each start-up event, in order; first_step: rank 0's first optimizer step
            "mlflow_tracking_uri": tracker.uri,
            "mlflow_run_id": tracker.run_id,
            "student_arch": cfg.student.arch,
            "student_weights": (out / "student" / weights.name).uri,
            "student_input": {"size": cfg.student_input_size, "mean": list(cfg.student.mean), "std": list(cfg.student.std)},
            "system_metrics": system.report,  # nodes sampled, steps logged, CPU seconds the samples took
            **({"student_onnx": onnx} if onnx is not None else {}),  # export.onnx=true: the file's name, opset, parity; or the error
            "teacher_placements": [p for p in progress.placements if p.startswith("teacher ")],
            "placements": records,  # each teacher actor start and student worker (per attempt): node, pid, resources
            "teacher_rows": teacher_rows,  # per teacher: rows computed ("forward") and served by the cache ("cached")
            "history": history,
            "output_dir": out.uri,
        }
        final_metrics = {f"knn/teacher/{n}/{k}": v for n, r in ev["teacher_knn"].items() for k, v in r.items()}
        final_metrics.update({f"knn/student/{k}": v for k, v in ev["student_knn"].items()})
        final_metrics.update({f"knn/random_student/{k}": v for k, v in ev["random_student_knn"].items()})
        final_metrics.update({
            f"knn/student_head/{where.replace('/', '_layers')}/{k}": v
            for where, r in summary["student_head_knn"].items() for k, v in r.items()
        })
        final_metrics.update({"knn/student_gain_20nn": summary["student_gain_20nn"], "wall_s": summary["wall_s"]})
        final_metrics.update({f"startup/{k}_s": v for k, v in startup.items()})
        final_metrics.update({f"teacher/{n}/{k}_rows": float(v) for n, r in teacher_rows.items() for k, v in r.items()})
        tracker.log_metrics(final_metrics, step=cfg.train.epochs)
        logged = tracker.logged_steps("train/loss")  # epochs of an earlier attempt whose driver died before logging them
        for m in history:
            if int(m["epoch"]) not in logged:
                tracker.log_metrics(m, step=int(m["epoch"]))
        table = knn_table(summary)
        tracker.log_artifact(publish(out, local, "knn.md", table + "\n"))
        tracker.log_artifact(config_file)
        tracker.log_artifact(weights, "student")
        tracker.log_artifact(weights.with_suffix(".json"), "student")
        if onnx is not None and "error" not in onnx:
            tracker.log_artifact(weights.with_suffix(".onnx"), "student")
        summary_text = redact_json_text(json.dumps(summary, indent=2))  # as publish() writes it
        with tempfile.TemporaryDirectory(prefix="simreg-summary-") as d:
            (Path(d) / "summary.json").write_text(summary_text)
            tracker.log_artifact(Path(d) / "summary.json")
        fence.check("the run's end")  # the lease still held, no stop decided: this driver may end the run
        tracker.end("FINISHED")
        status, ended = "FINISHED", True
        # summary.json last, written atomically: its presence means "finished" (a rerun refuses the folder); a
        # run that dies before it is resumed by the same command, from its last checkpoint
        publish(out, local, "summary.json", summary_text)
        return summary
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM, a lost lease (fence.Stopped)
        status = "KILLED"
        _workers_stop_reason(state)
        raise
    finally:
        if not ended:
            tracker.end(status)  # after a lost lease: left to the driver that took the folder over
        if state is not None:
            stop_actors(state, actors, timeout_s=60.0 if status == "FINISHED" else 5.0)  # interrupted: `ray job stop` waits briefly


def run_maps(out: Store, prep: Prepared, resuming: bool) -> Prepared:
    """The run's target maps (teachers[i].normalize=standardize|phi_s) kept in its folder: a resumed run trains on
    the maps it began with, whatever the cache holds now."""
    from dataclasses import replace

    from simreg.orchestrator.train.target_stats import RUN_FILE, load_maps, save_maps

    if not prep.target_maps:
        return prep
    where = out / RUN_FILE
    if resuming and where.exists():
        kept = load_maps(where)
        if set(kept) == set(prep.target_maps) and all(kept[n].method == m.method for n, m in prep.target_maps.items()):
            return replace(prep, target_maps=kept)
    save_maps(where, prep.target_maps)
    return prep


def fit(trainer: Any, state: Any) -> Any:
    """``trainer.fit()``; its error, if any, as the run's: first why the run itself recorded it could not go on (a
    diverged loss, a teacher that cannot serve: one line), else Ray Train's error. Ray Train raises when the fit
    failed (its restarts used up) and returns when the workers ended early on a recorded failure."""
    import ray

    from simreg.orchestrator.ray_compat import abort_controller, keep_sigint_handler

    controllers = keep_sigint_handler(trainer)  # Ctrl-C is simreg's (fence.py), not Train's sys.exit(0)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # a stop (fence.Stopped): the workers stop now, not when this process ends
        abort_controller(controllers)
        raise
    except Exception:
        failure = ray.get(state.get_failure.remote())
        if failure is not None:
            raise SimRegError(failure) from None
        raise
    failure = ray.get(state.get_failure.remote())
    if failure is not None:
        raise SimRegError(failure)
    if result.error is not None:
        raise result.error
    return result


def _workers_stop_reason(state: Any) -> None:
    """Log why the workers stopped on their own, if they did (the run folder taken over while this driver was
    frozen: its workers stopped at their next checkpoint)."""
    if state is None:
        return
    import ray

    try:
        failure = ray.get(state.get_failure.remote(), timeout=5)
    except Exception:  # noqa: BLE001  (stopping: what the workers said is a courtesy)
        return
    if failure:
        log.warning("the student workers stopped: %s", failure)


def startup_phases(started_at: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds from ``started_at`` to each start-up event, in the order they happened. A resumed run's actors mark
    their own start (the first attempt's first step is not carried over)."""
    return {k: round(t - started_at, 2) for k, t in sorted(marks.items(), key=lambda kv: kv[1])}


def _warm_start(tracking_uri: str) -> TrackerBackend:
    """The tracking store opened, then Ray Train's and the pipeline's modules imported, one after the other in
    one thread while Ray starts (CPU seconds the start would otherwise wait on)."""
    backend = backend_for(tracking_uri)
    try:
        import ray.train.torch  # noqa: F401

        import simreg.orchestrator.pipeline.dataset  # noqa: F401
    except ImportError:  # imported again, in the main thread, where an error has its own message
        pass
    return backend


def student_onnx(folder: Path) -> dict[str, Any]:
    """``export.onnx=true``: the exported student as ONNX beside its safetensors (what its card records), or the one line
    that says why not: the trained student stays, the run still ends FINISHED (the network exported before training)."""
    from simreg.orchestrator.evaluation.onnx_export import export_onnx

    try:
        record = export_onnx(folder)
    except Exception as e:  # noqa: BLE001  (the exporter, onnxruntime or the disk: the trained student is kept either way)
        why = str(e) if isinstance(e, SimRegError) else f"{type(e).__name__}: {first_line(e, 300)}"
        log.warning("export.onnx=true: %s; the student is in %s as safetensors", why, folder)
        return {"error": why}
    log.info("student exported to ONNX: opset %d, parity with PyTorch %.1e (max abs over %d inputs)", record["opset"],
             record["parity_max_abs_diff"], record["parity_inputs"])
    return {**record, "onnx": Path(record["onnx"]).name}
