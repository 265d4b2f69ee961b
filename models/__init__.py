"""Pure-torch core of SimReg: students, teachers, heads, loss and the training step.

Nothing in this package imports Ray or MLflow, so it runs alone on any machine with torch + timm.
"""
from __future__ import annotations

from simreg.models.errors import ConfigError, DataError, ModelError, SimRegError, TeacherLoadError
from simreg.models.heads import HEAD_LAYOUTS, build_head, build_heads, head_prefix, head_widths
from simreg.models.loss import LOSSES, cosine_to_target, get_loss, register_loss, simreg_loss
from simreg.models.step import SimRegObjective
from simreg.models.students import build_backbone, feature_dim
from simreg.models.teachers import InputTransform, Teacher, load_teacher, load_weights_file

__all__ = [
    "HEAD_LAYOUTS",
    "LOSSES",
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
