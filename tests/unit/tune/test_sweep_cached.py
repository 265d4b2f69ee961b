"""Which sweeps can train every trial from one shared copy of the cached targets: those whose params never change
the targets a trial reads (heads, optimizer), not those that change views, data or teachers."""
from __future__ import annotations

import json

from simreg.orchestrator.config import load_config
from simreg.orchestrator.tune.sweep import _params_keep_cached_targets
from simreg.search_spaces import SearchSpace


def _keeps(params: dict, cluster: dict | None = None) -> bool:
    cfg = load_config(None, ["cache.enabled=true"])
    space = SearchSpace.model_validate({"search": {"algorithm": "random", "num_samples": 2}, "params": params})
    return _params_keep_cached_targets(space, json.loads(cfg.model_dump_json()), cfg, cluster or {"CPU": 2.0})


def test_head_and_optimizer_params_keep_the_cached_targets():
    assert _keeps({"heads.depth": {"grid": [1, 2, 3]}, "heads.width_mult": {"choice": [1.0, 2.0]}})
    assert _keeps({"optim.lr": {"loguniform": [0.01, 0.5]}})


def test_views_data_and_teacher_params_change_them():
    assert not _keeps({"heads.depth": {"grid": [1, 2]}, "augment.strength": {"grid": [0.5, 1.0]}})  # other views
    assert not _keeps({"data.train_size": {"choice": [1000, 2000]}})  # other images
    assert not _keeps({"train.epochs": {"choice": [2, 8]}})  # other view indices
    assert not _keeps({"teacher_pool.precision": {"choice": ["fp32", "bf16"]}})  # other targets


def test_a_teacher_on_a_gpu_or_not_reads_other_targets():
    """On a GPU cluster a teacher with a GPU runs bf16 (precision auto), one without fp32: each trial's own placement."""
    gpus = {"CPU": 8.0, "GPU": 2.0}
    assert not _keeps({"teacher_pool.gpus_per_actor": {"choice": [0, 1]}}, gpus)
    assert _keeps({"teacher_pool.gpus_per_actor": {"choice": [1]}}, gpus)  # what "auto" gives the base there


def test_a_range_is_probed_at_its_ends_and_middle_and_a_value_that_does_not_validate_counts_as_a_change():
    assert not _keeps({"augment.strength": {"uniform": [1.0, 1.5]}})  # 1.25 and 1.5 do not validate; 1.0 is the base
    assert not _keeps({"augment.strength": {"uniform": [0.5, 1.0]}})
    assert _keeps({"heads.depth": {"randint": [1, 4]}})  # 1, 2, 3 (4 is excluded, never probed)


def test_a_sweep_started_on_a_warm_cache_is_not_resumed_without_it(tmp_path):
    """Tune restores the concurrency sized for student workers only: with a fleet beside that many trials no view
    task could be placed, so the resume is refused with what to do."""
    import pytest

    from simreg.models import ConfigError
    from simreg.orchestrator.storage import open_store
    from simreg.orchestrator.tune.sweep import _check_shared_on_resume

    warm, cold = open_store(str(tmp_path / "warm")), open_store(str(tmp_path / "cold"))
    _check_shared_on_resume(warm, resume=False, shared=True)
    _check_shared_on_resume(warm, resume=True, shared=True)  # still warm: resumes
    with pytest.raises(ConfigError, match="no longer holds them all: fill it again"):
        _check_shared_on_resume(warm, resume=True, shared=False)
    _check_shared_on_resume(cold, resume=False, shared=False)
    _check_shared_on_resume(cold, resume=True, shared=True)  # started with a fleet, warm now: fewer trials at once, no harm
