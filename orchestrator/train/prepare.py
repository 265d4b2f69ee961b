"""Phases 1-2 of a run, before Ray starts: data, k-NN sets and the teachers, loaded and checked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from simreg.models.errors import ConfigError
from simreg.models.target_norm import NEEDS_STATS, NormMap, TargetStats
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.sources import load_splits
from simreg.orchestrator.evaluation.knn import check_bank
from simreg.orchestrator.pipeline.teacher import TeacherSpec
from simreg.orchestrator.train.builders import (
    build_objective,
    teacher_specs,
)

log = logging.getLogger("simreg")


@dataclass(frozen=True)
class EvalSets:
    bank: ImageSet
    query: ImageSet


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs before Ray: the images, the k-NN sets and the checked teachers."""

    cfg: SimRegConfig
    train: ImageSet
    final_eval: EvalSets  # bank: train split, queries: the held-out split (reported)
    val: EvalSets | None  # bank and queries both from the train split (for model selection)
    specs: list[TeacherSpec]
    teacher_dims: dict[str, int]
    target_stats: dict[str, TargetStats] = field(default_factory=dict)  # teachers[i].normalize=standardize|phi_s
    target_maps: dict[str, NormMap] = field(default_factory=dict)  # their maps, what the workers apply


def prepare(cfg: SimRegConfig, quiet: bool = False, stats_for_all: bool = False, check_export: bool = False) -> Prepared:
    """Phases 1-2: load data and every teacher once, so a bad path or name fails before Ray starts; the target
    statistics of the teachers whose ``normalize`` needs them (``stats_for_all``: of every teacher, stored beside
    the cache for trials that will need them); with ``check_export`` (a run's or a sweep's driver) and
    ``export.onnx=true``, the student's network tried through the ONNX exporter."""
    train_full, held_out = load_splits(cfg.data, cfg.seed)
    # A streamed source (a pack, synthetic images): only the evaluation images are decoded or generated here
    train = train_full.subset(cfg.data.train_size, cfg.seed)
    final = EvalSets(
        train_full.subset(cfg.data.knn_bank_size, cfg.seed + 1).materialized(),
        held_out.subset(cfg.data.knn_query_size, cfg.seed + 2).materialized(),
    )
    # before training, not after it: a bank smaller than k would fail the run's last step (or every validation)
    check_bank(len(final.bank), fix=f"raise data.knn_bank_size (now {cfg.data.knn_bank_size}) or use more images")
    val = None
    if cfg.eval.val_every > 0:
        val = EvalSets(*(s.materialized() for s in train_full.split_two(cfg.eval.val_bank_size, cfg.eval.val_query_size, cfg.seed + 3)))
        check_bank(len(val.bank), fix=f"raise eval.val_bank_size (now {cfg.eval.val_bank_size}), or set eval.val_every=0")
    if not quiet:
        log.info(
            "data: %s, %d images distilled on%s; k-NN bank %d, queries %d (%s)",
            train.name, len(train), " (streamed: the view stage reads or generates each piece)" if train.streamed else "",
            len(final.bank), len(final.query), held_out.name,
        )
    specs = teacher_specs(cfg)
    check_loss_options(cfg)
    from simreg.orchestrator.train.target_stats import StatsSource, teacher_map

    source = StatsSource(cfg, train, quiet) if stats_for_all or any(t.normalize in NEEDS_STATS for t in cfg.teachers) else None
    dims: dict[str, int] = {}
    stats: dict[str, TargetStats] = {}
    maps: dict[str, NormMap] = {}
    for i, (tcfg, spec) in enumerate(zip(cfg.teachers, specs, strict=True)):
        teacher = spec.build()  # one teacher in memory at a time
        dims[spec.name] = teacher.feature_dim
        if source is not None and (stats_for_all or tcfg.normalize in NEEDS_STATS):
            st = source.stats(tcfg, spec, teacher)
            if tcfg.normalize in NEEDS_STATS:
                stats[spec.name], maps[spec.name] = st, teacher_map(tcfg, f"teachers.{i}", st)
        del teacher
    build_objective(cfg, dims, maps)  # fails early on an unknown student arch or a bad head design
    if check_export and cfg.export.onnx:  # an operator ONNX lacks is found now, not after the training
        from simreg.orchestrator.evaluation.onnx_export import check_exports

        check_exports(cfg.student.arch, cfg.student_input_size, dict(cfg.student.model_kwargs))
    return Prepared(cfg, train, final, val, specs, dims, stats, maps)


def check_loss_options(cfg: SimRegConfig) -> None:
    """What the loss options allow, before Ray: teacher dropping needs a per-image loss; combinations that run but
    are probably not meant get one warning line."""
    import torch

    from simreg.models.loss import get_loss

    if cfg.loss.teacher_drop > 0:
        if get_loss(cfg.train.loss)(torch.zeros(2, 3), torch.ones(2, 3)).ndim != 1:
            raise ConfigError(f"loss.teacher_drop={cfg.loss.teacher_drop} needs a loss that returns one value per image, and "
                              f"train.loss={cfg.train.loss} returns a scalar: return (B,) from it (models/loss.py), or set loss.teacher_drop=0")
        if len(cfg.teachers) == 1:
            log.warning("loss.teacher_drop=%g has no effect with one teacher", cfg.loss.teacher_drop)
    if cfg.train.loss == "simreg":
        phi = [f"teachers.{i}" for i, t in enumerate(cfg.teachers) if t.normalize == "phi_s"]
        if phi:
            log.warning("%s: normalize=phi_s under train.loss=simreg (cosine) only centres the targets (the rotation and "
                        "scale do not change a cosine): train.loss=mse regresses them as PHI-S does", ", ".join(phi))
