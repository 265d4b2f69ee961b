"""Phases 1-2 of a run, before Ray starts: data, k-NN sets and the teachers, loaded and checked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from simreg.models.target_norm import TargetStats
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


def prepare(cfg: SimRegConfig, quiet: bool = False) -> Prepared:
    """Phases 1-2: load data and every teacher once, so a bad path or name fails before Ray starts."""
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
    teachers = {s.name: s.build() for s in specs}
    dims = {name: t.feature_dim for name, t in teachers.items()}
    build_objective(cfg, dims)  # fails early on an unknown student arch or a bad head design
    from simreg.orchestrator.train.target_stats import target_stats

    stats = target_stats(cfg, train, specs, teachers, quiet=quiet)
    return Prepared(cfg, train, final, val, specs, dims, stats)
