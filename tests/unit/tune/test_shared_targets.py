"""One copy of the cached targets serves every trial of a sweep only when no trial, whatever its combination of
param values, reads other targets; and each trial checks the copy it is handed against its own config."""
from __future__ import annotations

import json
from typing import Any

from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.train.cached_data import CachedSource, cached_identity
from simreg.orchestrator.tune.space import trial_config
from simreg.orchestrator.tune.sweep import _params_keep_cached_targets
from simreg.orchestrator.tune.trial import usable_shared
from simreg.search_spaces import SearchSpace

CLUSTER = {"CPU": 2.0}
# whole-image teacher views: no crop range at strength 0, and a full-image crop range at any strength
WHOLE = {"augment.crop_scale": [1.0, 1.0], "augment.strength": 0.0}


def _base() -> tuple[dict[str, Any], SimRegConfig]:
    cfg = trial_config(json.loads(SimRegConfig().model_dump_json()), WHOLE)
    return json.loads(cfg.model_dump_json()), cfg


def _grid(params: dict[str, list[Any]]) -> SearchSpace:
    return SearchSpace.model_validate({"search": {"algorithm": "grid"}, "params": {k: {"grid": v} for k, v in params.items()}})


def test_each_augment_param_alone_keeps_whole_images_but_together_they_crop():
    tree, base = _base()
    ident = cached_identity(base, CLUSTER)
    assert cached_identity(trial_config(tree, {"augment.strength": 1.0}), CLUSTER) == ident
    assert cached_identity(trial_config(tree, {"augment.crop_scale": [0.2, 1.0]}), CLUSTER) == ident
    both = trial_config(tree, {"augment.strength": 1.0, "augment.crop_scale": [0.2, 1.0]})
    assert cached_identity(both, CLUSTER) != ident  # random crops: other targets


def test_a_grid_combining_the_two_augment_params_does_not_share_the_base_targets():
    tree, base = _base()
    space = _grid({"augment.strength": [0.0, 1.0], "augment.crop_scale": [[1.0, 1.0], [0.2, 1.0]]})
    assert not _params_keep_cached_targets(space, tree, base, CLUSTER)


def test_head_params_share_them():
    tree, base = _base()
    assert _params_keep_cached_targets(_grid({"heads.depth": [1, 2, 4], "heads.width_mult": [1.0, 2.0]}), tree, base, CLUSTER)


def test_too_many_combinations_to_check_share_nothing():
    tree, base = _base()
    space = SearchSpace.model_validate({"params": {
        "heads.depth": {"choice": list(range(1, 17))}, "optim.lr": {"choice": [0.01 * i for i in range(1, 17)]},
        "optim.momentum": {"choice": [0.5 + 0.02 * i for i in range(17)]},
    }})  # 16 * 16 * 17 combinations, none of which changes the targets
    assert not _params_keep_cached_targets(space, tree, base, CLUSTER)


def test_a_trial_uses_the_shared_targets_only_when_they_were_read_for_its_identity():
    tree, base = _base()
    shared = CachedSource(None, {}, (0, 1, 2, 3), base.teacher_pool.batch_size, identity=cached_identity(base, CLUSTER))
    assert usable_shared(shared, trial_config(tree, {"heads.depth": 2}), CLUSTER)
    crops = trial_config(tree, {"augment.strength": 1.0, "augment.crop_scale": [0.2, 1.0]})
    assert not usable_shared(shared, crops, CLUSTER)
    assert not usable_shared(shared, base, {"CPU": 8.0, "GPU": 1.0})  # a GPU teacher's targets are bf16
