"""Which sweeps can train every trial from one shared copy of the cached targets: those whose params never change
the targets a trial reads (heads, optimizer), not those that change views, data or teachers."""
from __future__ import annotations

import json

from simreg.orchestrator.config import load_config
from simreg.orchestrator.train.placement import Placement
from simreg.orchestrator.tune.sweep import _params_keep_cached_targets
from simreg.search_spaces import SearchSpace

CPU_ONLY = Placement(has_gpu=False, use_gpu=False, teacher_gpus=0.0)


def _keeps(params: dict) -> bool:
    cfg = load_config(None, ["cache.enabled=true"])
    space = SearchSpace.model_validate({"search": {"algorithm": "random", "num_samples": 2}, "params": params})
    return _params_keep_cached_targets(space, json.loads(cfg.model_dump_json()), cfg, CPU_ONLY)


def test_head_and_optimizer_params_keep_the_cached_targets():
    assert _keeps({"heads.depth": {"grid": [1, 2, 3]}, "heads.width_mult": {"choice": [1.0, 2.0]}})
    assert _keeps({"optim.lr": {"loguniform": [0.01, 0.5]}})


def test_views_data_and_teacher_params_change_them():
    assert not _keeps({"heads.depth": {"grid": [1, 2]}, "augment.strength": {"grid": [0.5, 1.0]}})  # other views
    assert not _keeps({"data.train_size": {"choice": [1000, 2000]}})  # other images
    assert not _keeps({"train.epochs": {"choice": [2, 8]}})  # other view indices
    assert not _keeps({"teacher_pool.precision": {"choice": ["fp32", "bf16"]}})  # other targets
