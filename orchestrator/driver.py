"""``distill(cfg)``: one SimReg distillation on Ray, in numbered phases.

    simreg distill                                   # the offline demo (Fashion-MNIST, SimCLR ResNet-50 teacher)
    simreg distill --config my.yaml train.epochs=8   # a YAML config plus dotted overrides
    simreg distill --output-dir runs/x --tracking-uri http://127.0.0.1:5000

1 data -> 2 teachers -> 3 Ray + pipeline -> 4 trainer -> 5 fit -> 6 evaluate -> 7 export -> 8 summary.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from simreg.models.errors import ConfigError, SimRegError
from simreg.orchestrator.checkpoint import committed_epochs, train_storage
from simreg.orchestrator.config import SimRegConfig, flatten, validate_config
from simreg.orchestrator.data import ImageSet
from simreg.orchestrator.run import failure_config, images_per_epoch, init_ray, make_trainer, plan_placement, prepare
from simreg.orchestrator.tracking import Tracker, default_tracking_uri, redact_uri

log = logging.getLogger("simreg")


def _eval_task(
    cfg_dict: dict[str, Any], teacher_dicts: list[dict[str, Any]], teacher_dims: dict[str, int],
    student_state: dict[str, Any], heads_state: dict[str, Any], bank: ImageSet, query: ImageSet,
) -> dict[str, Any]:
    """k-NN of every teacher, the distilled student and the same student at random init (runs remotely)."""
    import torch

    from simreg.models import build_backbone
    from simreg.orchestrator.builders import student_transform
    from simreg.orchestrator.config import validate_config
    from simreg.orchestrator.evaluation import knn_report
    from simreg.orchestrator.teacher_pool import TeacherSpec

    cfg = validate_config(cfg_dict, "eval config")
    torch.set_num_threads(cfg.eval.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf = student_transform(cfg)

    def run(encode: Any) -> dict[str, float]:
        return knn_report(
            encode, bank.images, bank.labels, query.images, query.labels, cfg.data.view_size, cfg.eval.batch_size, device,
            cfg.eval.knn_weighting, cfg.eval.knn_temperature,
        )

    out: dict[str, Any] = {"teacher_knn": {}}
    t0 = time.perf_counter()
    for td in teacher_dicts:
        spec = TeacherSpec(**{**td, "mean": tuple(td["mean"]), "std": tuple(td["std"])})
        teacher = spec.build().to(device)
        out["teacher_knn"][spec.name] = run(teacher)
        del teacher
    torch.manual_seed(cfg.seed)  # the very initialisation the student started from
    random_student = build_backbone(cfg.student.arch, model_kwargs=cfg.student.model_kwargs).to(device).eval()
    out["random_student_knn"] = run(lambda v: random_student(tf(v)))
    student = build_backbone(cfg.student.arch, model_kwargs=cfg.student.model_kwargs)
    student.load_state_dict(student_state, strict=True)
    student = student.to(device).eval()
    out["student_knn"] = run(lambda v: student(tf(v)))
    if cfg.eval.head_layers:  # the student's feature after the first k layers of each head (paper, Table 2)
        from simreg.orchestrator.builders import build_objective

        objective = build_objective(cfg, teacher_dims)
        objective.backbone.load_state_dict(student_state, strict=True)
        objective.heads.load_state_dict(heads_state, strict=True)
        objective = objective.to(device).eval()
        out["student_head_knn"] = {
            f"{name}/{k}": run(lambda v, name=name, k=k: objective.head_features(v, name, k))
            for name in teacher_dims for k in cfg.eval.head_layers
        }
    out["eval_s"] = time.perf_counter() - t0
    return out


class _Progress:
    """Driver-side thread: a progress bar per epoch, a log line per epoch as it lands, and MLflow logging of
    each epoch's metrics once Ray Train has committed that epoch's checkpoint (``committed``): an epoch a
    failure makes the run redo is then logged once, by the attempt whose checkpoint the run continues from."""

    def __init__(self, state: Any, tracker: Tracker, images_per_epoch: int, epochs: int, committed: Any) -> None:
        self.state, self.tracker, self.total, self.epochs = state, tracker, images_per_epoch, epochs
        self.committed = committed  # () -> set of epochs whose checkpoints Ray Train has registered
        self.history: list[dict[str, float]] = []  # the latest report of each epoch, in order of arrival
        self.placements: list[str] = []
        self._seen = 0  # RunState reports consumed
        self._logged: set[int] = set()  # epochs written to MLflow
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()

    def _drain(self) -> tuple[int, int]:
        import ray

        epoch, done, new, placed = ray.get(self.state.poll.remote(self._seen, len(self.placements)))
        self._seen += len(new)
        for p in placed:
            self.placements.append(p)
            log.info(p)
        for m in new:
            self.history = [h for h in self.history if h["epoch"] != m["epoch"]] + [m]  # a redone epoch: its new report
            val = f", val 20-NN {m['val/top1_20nn']:.2f}" if "val/top1_20nn" in m else ""
            log.info(
                "epoch %d/%d: loss %.4f, %.0f images/s, %.1f s (%.1f s waiting for data, %.1f of it for the first batch)%s",
                int(m["epoch"]) + 1, self.epochs, m["train/loss"], m["train/images_per_s"], m["train/epoch_s"],
                m.get("train/data_wait_s", 0.0), m.get("train/first_batch_wait_s", 0.0), val,
            )
        pending = [m for m in self.history if int(m["epoch"]) not in self._logged]
        if pending:
            ready = self.committed()
            for m in pending:
                if int(m["epoch"]) in ready:
                    self.tracker.log_metrics(m, step=int(m["epoch"]))
                    self._logged.add(int(m["epoch"]))
        return epoch, done

    def _run(self) -> None:
        from tqdm import tqdm

        bar, bar_epoch = None, -1
        while not self._stop.wait(0.5):
            try:
                epoch, done = self._drain()
            except Exception:  # the state actor is gone: the run is ending
                break
            finished = {int(m["epoch"]) for m in self.history}
            if bar is not None and bar_epoch in finished:
                bar.n = bar.total
                bar.close()
                bar = None
            if epoch > bar_epoch and epoch not in finished:
                bar = tqdm(total=self.total, desc=f"epoch {epoch + 1}/{self.epochs}", unit="img", leave=True)
                bar_epoch = epoch
            if bar is not None:
                bar.n = min(done, self.total)
                bar.refresh()
        if bar is not None:
            bar.close()


def distill(cfg: SimRegConfig, output_dir: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run one distillation; writes ``output_dir/summary.json`` and returns the summary."""
    import ray
    import ray.train

    from simreg.orchestrator.export import export_student
    from simreg.orchestrator.pipeline import start_run_state

    t_start = time.perf_counter()
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_output_dir(output_dir)  # noqa: F841  (held until this function returns)
    resuming = check_resume(cfg, output_dir)
    (output_dir / "config.json").write_text(safe_config_json(cfg))

    # 1-2. data (distillation subset, k-NN bank and queries, validation sets) and teachers, before Ray
    prep = prepare(cfg)
    specs, teacher_dims, evals = prep.specs, prep.teacher_dims, prep.final_eval

    # 3. Ray, placement, tracking
    cluster = init_ray(cfg)
    placement = plan_placement(cfg, cluster)
    log.info(
        "ray: %g CPUs, %g GPUs; %d student worker(s) on %s; teacher actors on %s",
        cluster.get("CPU", 0), cluster.get("GPU", 0), cfg.scaling.num_workers, "GPU" if placement.use_gpu else "CPU",
        f"{placement.teacher_gpus:g} GPU each" if placement.teacher_gpus else f"CPU ({cfg.teacher_pool.threads} threads each)",
    )
    tracker = Tracker(
        tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri(output_dir),
        cfg.tracking.experiment, output_dir, cfg.name, {"simreg.command": "distill", "simreg.output_dir": str(output_dir)},
    )
    tracker.log_params(flatten(cfg))
    status = "FAILED"
    state = start_run_state()
    actors: list[Any] = []
    try:
        # 4. teacher actors + pipeline + trainer
        storage = train_storage(output_dir)
        trainer, actors = make_trainer(prep, placement, state, ray.train.RunConfig(
            name=storage.name, storage_path=str(storage.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=failure_config(cfg),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ))

        # 5. fit (from the latest checkpoint when the output dir holds an interrupted run)
        if resuming:
            log.info("resuming the interrupted run in %s from its latest checkpoint", output_dir)
        t_fit = time.perf_counter()
        with _Progress(state, tracker, images_per_epoch(prep), cfg.train.epochs, lambda: committed_epochs(storage)) as progress:
            result = trainer.fit()
        fit_s = time.perf_counter() - t_fit
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise SimRegError(f"training in {output_dir} produced no checkpoint: see the Ray log above")
        from simreg.orchestrator.checkpoint import load_state

        with result.checkpoint.as_directory() as d:
            final = load_state(Path(d))

        teacher_rows = ray.get(state.get_teacher_rows.remote())
        records = ray.get(state.get_records.remote())
        for name, r in teacher_rows.items():
            log.info("teacher %s: %d rows through the teacher, %d from the target cache", name, r["forward"], r["cached"])

        # 6. evaluate: k-NN of teachers, student, random-init student, in a Ray task (GPU when there is one)
        eval_remote = ray.remote(_eval_task).options(num_cpus=min(1.0, cluster.get("CPU", 1.0)), num_gpus=1 if placement.has_gpu else 0)
        ev = ray.get(eval_remote.remote(
            json.loads(cfg.model_dump_json()), [s.to_dict() for s in specs], teacher_dims, final["backbone"], final["heads"], evals.bank, evals.query,
        ))

        # 7. export
        weights = export_student(final["backbone"], cfg, output_dir / "student", {"student_knn": ev["student_knn"]})

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
            "mlflow_tracking_uri": redact_uri(tracker.tracking_uri),
            "mlflow_run_id": tracker.run_id,
            "student_arch": cfg.student.arch,
            "student_weights": str(weights),
            "student_input": {"size": cfg.student_input_size, "mean": list(cfg.student.mean), "std": list(cfg.student.std)},
            "teacher_placements": [p for p in progress.placements if p.startswith("teacher ")],
            "placements": records,  # each teacher actor start and student worker (per attempt): node, pid, resources
            "teacher_rows": teacher_rows,  # per teacher: rows computed ("forward") and served by the cache ("cached")
            "history": history,
            "output_dir": str(output_dir),
        }
        final_metrics = {f"knn/teacher/{n}/{k}": v for n, r in ev["teacher_knn"].items() for k, v in r.items()}
        final_metrics.update({f"knn/student/{k}": v for k, v in ev["student_knn"].items()})
        final_metrics.update({f"knn/random_student/{k}": v for k, v in ev["random_student_knn"].items()})
        final_metrics.update({
            f"knn/student_head/{where.replace('/', '_layers')}/{k}": v
            for where, r in summary["student_head_knn"].items() for k, v in r.items()
        })
        final_metrics.update({"knn/student_gain_20nn": summary["student_gain_20nn"], "wall_s": summary["wall_s"]})
        final_metrics.update({f"teacher/{n}/{k}_rows": float(v) for n, r in teacher_rows.items() for k, v in r.items()})
        tracker.log_metrics(final_metrics, step=cfg.train.epochs)
        tracker.log_missing_epochs(history)  # epochs of an earlier attempt whose driver died before logging them
        table = knn_table(summary)
        (output_dir / "knn.md").write_text(table + "\n")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        for f in ("summary.json", "knn.md", "config.json"):
            tracker.log_artifact(output_dir / f)
        tracker.log_artifact(weights, "student")
        tracker.log_artifact(weights.with_suffix(".json"), "student")
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (the CLI turns it into KeyboardInterrupt)
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
        for a in [state, *actors]:
            ray.kill(a)


def safe_config_json(cfg: SimRegConfig) -> str:
    """The run's config as written to the run folder (and MLflow): no password of a tracking URI."""
    tree = json.loads(cfg.model_dump_json())
    if tree["tracking"]["tracking_uri"]:
        tree["tracking"]["tracking_uri"] = redact_uri(tree["tracking"]["tracking_uri"])
    return json.dumps(tree, indent=2)


# Sections a rerun may change and still resume: where and how it runs, not what it computes.
RESUMABLE_CHANGES = ("scaling", "ray", "teacher_pool", "tracking", "cache")


def check_resume(cfg: SimRegConfig, output_dir: Path) -> bool:
    """True when ``output_dir`` holds a run to resume; refuses one whose config differs in what it computes."""
    saved_file = output_dir / "config.json"
    if not train_storage(output_dir).is_dir():
        return False
    if (output_dir / "summary.json").is_file():
        raise ConfigError(
            f"{output_dir} holds a finished run (summary.json): choose another --output-dir, or delete the folder to run again"
        )
    if not saved_file.is_file():
        return True
    saved = json.loads(validate_config(json.loads(saved_file.read_text()), str(saved_file)).model_dump_json())
    now = json.loads(cfg.model_dump_json())
    changed: list[str] = []
    for sec in sorted(set(saved) | set(now)):
        old, new = saved.get(sec), now.get(sec)
        if sec in RESUMABLE_CHANGES:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{sec}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(sec)
    if changed:
        raise ConfigError(
            f"{output_dir} holds an interrupted run with another config (differs in {', '.join(changed)}): "
            f"rerun with the same config to resume it (saved in {saved_file}), or choose another --output-dir"
        )
    return True


def hold_output_dir(output_dir: Path) -> Any:
    """An exclusive lock on the run folder for this process's lifetime (the OS drops it when the process
    dies), so two drivers never write one run."""
    import fcntl

    f = open(output_dir / ".simreg.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{output_dir} is in use by another simreg process: wait for it, or choose another --output-dir") from None
    return f


def knn_table(summary: dict[str, Any]) -> str:
    rows = [("model", "1-NN top-1", "20-NN top-1")]
    for name, r in summary["teacher_knn"].items():
        rows.append((f"teacher {name}", f"{r['top1_1nn']:.2f}", f"{r['top1_20nn']:.2f}"))
    s, r0 = summary["student_knn"], summary["random_student_knn"]
    rows.append((f"student {summary['student_arch']} (SimReg)", f"{s['top1_1nn']:.2f}", f"{s['top1_20nn']:.2f}"))
    for where, r in summary.get("student_head_knn", {}).items():
        name, k = where.split("/")
        rows.append((f"student after {k} layer(s) of head {name}", f"{r['top1_1nn']:.2f}", f"{r['top1_20nn']:.2f}"))
    rows.append((f"student {summary['student_arch']} (random init)", f"{r0['top1_1nn']:.2f}", f"{r0['top1_20nn']:.2f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, rows[1:])])
