"""``tracking.register_best=NAME``: the best trial's student, exported from its last checkpoint and registered in
the Model Registry (a version whose tags carry the architecture, the input transform and the validation k-NN).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from simreg.orchestrator.storage import Store
from simreg.orchestrator.tracking.base import TrackerBackend
from simreg.orchestrator.tune.space import trial_config

log = logging.getLogger("simreg")


def register_best(backend: TrackerBackend, name: str, best: dict[str, Any], base: dict[str, Any], out: Store) -> str | None:
    """Register ``best`` (a comparison row) under ``name``; returns the version, or None when the trial left no checkpoint."""
    from simreg.orchestrator.evaluation.export import export_student
    from simreg.orchestrator.train.checkpoint import STATE, load_state

    if not best.get("checkpoint") or not best.get("mlflow_run_id"):
        log.warning("tracking.register_best=%s: the best trial %s left no checkpoint; nothing registered", name, best.get("trial_id"))
        return None
    # the checkpoint path Tune reports is a path in the sweep's own filesystem (local, or the bucket)
    ckpt = out.at(best["checkpoint"])
    cfg = trial_config(base, best["params"])
    with tempfile.TemporaryDirectory(prefix="simreg-register-") as tmp:  # nothing left beside the sweep
        local = Path(tmp)
        (ckpt / STATE).download(local / "best" / STATE)
        folder = local / "student"
        export_student(load_state(local / "best")["backbone"], cfg, folder, {"val_knn": best["metrics"], "trial_id": best["trial_id"]})
        if cfg.export.onnx:  # the registered version carries student.onnx beside the safetensors
            from simreg.orchestrator.train.distill import student_onnx

            student_onnx(folder)
        version = backend.register_model(name, best["mlflow_run_id"], folder, tags_of(cfg, best))
    log.info("registered the best trial %s as model %s version %s", best["trial_id"], name, version)
    return version


def tags_of(cfg: Any, best: dict[str, Any]) -> dict[str, str]:
    return {
        "arch": cfg.student.arch, "input_size": str(cfg.student_input_size), "mean": str(list(cfg.student.mean)),
        "std": str(list(cfg.student.std)), "trial_id": best["trial_id"],
        **{f"val_{k}": f"{v:.2f}" for k, v in best["metrics"].items()},
        **{f"param.{k}": str(v) for k, v in best["params"].items()},
    }
