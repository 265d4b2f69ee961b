"""The Python API: the same functions the ``simreg`` command runs, for notebooks and scripts.

    from simreg.orchestrator import distill, evaluate, load_config, sweep

    cfg = load_config("my.yaml", ["train.epochs=4"])      # defaults <- YAML <- dotted overrides, validated
    summary = distill(cfg, "runs/mine")                   # -> the dict written to runs/mine/summary.json
    distill(cfg, "s3://bucket/runs/mine", "http://mlflow:5000")   # an object store and an MLflow server
    result = sweep(cfg, "head_design", "runs/heads")      # a shipped space name, a YAML file or a SearchSpace
    evaluate(summary["student_weights"], cfg.student.arch, input_size=cfg.student_input_size)

Errors a user can cause raise ``simreg.models.SimRegError`` subclasses whose message names the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.config import load_config as _load_config
from simreg.orchestrator.evaluation.weights import evaluate_weights
from simreg.orchestrator.train.distill import distill as _distill
from simreg.orchestrator.tune.sweep import sweep as _sweep
from simreg.search_spaces import SearchSpace, load_space


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimRegConfig:
    """The defaults (the offline demo) <- a YAML file <- ``key=value`` overrides, validated at once."""
    return _load_config(path, overrides)


def distill(cfg: SimRegConfig, output_dir: str | Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """One distillation on Ray (a local cluster, or ``ray.address``); resumes an interrupted ``output_dir``.
    Returns the summary (k-NN of teachers / student / random-init student, paths, timings, history)."""
    return _distill(cfg, output_dir, tracking_uri)


def sweep(
    cfg: SimRegConfig, space: str | Path | SearchSpace, output_dir: str | Path, *, resume: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """A Ray Tune sweep of ``space`` over the base config ``cfg``; returns the sweep summary (trials best first)."""
    if isinstance(space, SearchSpace):
        loaded, source = space, "SearchSpace object"
    else:
        loaded, source = load_space(str(space))
    return _sweep(cfg, loaded, source, output_dir, resume=resume, tracking_uri=tracking_uri)


def evaluate(weights: str | Path, arch: str, **options: Any) -> dict[str, Any]:
    """k-NN (and with ``linear=True`` the linear probe) of a backbone weights file, in this process (no Ray);
    ``options`` are those of ``simreg eval`` (data, input_size, mean, std, bank_size, query_size, ...)."""
    return evaluate_weights(weights, arch, **options)
