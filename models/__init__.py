"""Pure-torch core of SimReg: students, teachers, heads, loss and the training step.

Nothing in this package imports Ray or MLflow, so it runs alone on any machine with torch + timm.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ConfigError": "simreg.models.errors",
    "DataError": "simreg.models.errors",
    "ModelError": "simreg.models.errors",
    "SimRegError": "simreg.models.errors",
    "TeacherLoadError": "simreg.models.errors",
    "HEAD_LAYOUTS": "simreg.models.heads",
    "build_head": "simreg.models.heads",
    "build_heads": "simreg.models.heads",
    "head_prefix": "simreg.models.heads",
    "head_widths": "simreg.models.heads",
    "LOSSES": "simreg.models.loss",
    "cosine_to_target": "simreg.models.loss",
    "get_loss": "simreg.models.loss",
    "register_loss": "simreg.models.loss",
    "simreg_loss": "simreg.models.loss",
    "SimRegObjective": "simreg.models.step",
    "NORMALIZATIONS": "simreg.models.target_norm",
    "TargetNorm": "simreg.models.target_norm",
    "TargetStats": "simreg.models.target_norm",
    "estimate_stats": "simreg.models.target_norm",
    "build_backbone": "simreg.models.students",
    "feature_dim": "simreg.models.students",
    "InputTransform": "simreg.models.teachers",
    "Teacher": "simreg.models.teachers",
    "load_teacher": "simreg.models.teachers",
    "load_weights_file": "simreg.models.teachers",
}


__all__ = [
    "HEAD_LAYOUTS",
    "LOSSES",
    "NORMALIZATIONS",
    "TargetNorm",
    "TargetStats",
    "estimate_stats",
    "get_loss",
    "register_loss",
    "ConfigError",
    "DataError",
    "InputTransform",
    "ModelError",
    "SimRegError",
    "SimRegObjective",
    "Teacher",
    "TeacherLoadError",
    "build_backbone",
    "feature_dim",
    "build_head",
    "build_heads",
    "cosine_to_target",
    "head_prefix",
    "head_widths",
    "load_teacher",
    "load_weights_file",
    "simreg_loss",
]


def __getattr__(name: str) -> Any:
    """Loaded on first use: ``simreg.models.errors`` (imported everywhere) stays light, torch and timm come
    with the modules that need them."""
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'simreg.models' has no attribute {name!r}")
