from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from simreg.models import ConfigError
from simreg.orchestrator.config import SimRegConfig, flatten, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_demo_yaml_equals_defaults():
    assert load_config(REPO / "configs" / "demo.yaml") == SimRegConfig()


def test_builtin_teacher_weights_exist():
    for t in SimRegConfig().teachers:
        assert t.weights_path().is_file(), t.weights


def test_vendored_teachers_match_their_provenance():
    """Every vendored file's sha256 is the one models/weights/README.md records, and each loads strictly as its arch."""
    import hashlib

    from simreg.orchestrator.config import WEIGHTS_DIR
    from simreg.orchestrator.train.builders import teacher_specs

    readme = (WEIGHTS_DIR / "README.md").read_text()
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    assert [f.name for f in files] == ["fmnist_byol_convnext_atto.safetensors", "fmnist_simclr_resnet10t.safetensors"]
    for f in files:
        assert hashlib.sha256(f.read_bytes()).hexdigest() in readme, f.name
    teachers = [{"name": "byol", "arch": "convnext_atto", "weights": "builtin:fmnist_byol_convnext_atto", "input_size": 32}]
    (spec,) = teacher_specs(load_config(None, [f"teachers={json.dumps(teachers)}"]))
    assert spec.build().feature_dim == 320


def test_the_two_teacher_config_loads_and_fits_two_cores():
    from simreg.orchestrator.train.placement import plan_placement, resource_check

    cfg = load_config(REPO / "configs" / "two-teachers.yaml")
    assert [t.normalize for t in cfg.teachers] == ["standardize", "standardize"] and cfg.train.loss == "mse"
    assert [t.weights_path().is_file() for t in cfg.teachers] == [True, True]
    resource_check(cfg, {"CPU": 2.0}, plan_placement(cfg, {"CPU": 2.0}))  # the resource rule on a 2-core machine
    # every other key is the demo's
    demo = SimRegConfig().model_dump()
    mine = cfg.model_dump()
    assert {k for k in demo if demo[k] != mine[k]} == {"name", "teachers", "train", "teacher_pool"}


def test_overrides_nested_and_list_items():
    cfg = load_config(None, ["heads.depth=2", "teachers.0.arch=resnet50", "augment.crop_scale=[0.5, 1.0]", "data.train_size=null"])
    assert cfg.heads.depth == 2 and cfg.teachers[0].arch == "resnet50"
    assert cfg.augment.crop_scale == (0.5, 1.0) and cfg.data.train_size is None


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["heads.dept=2", "optim.lr=-1", "train.epochs=abc"])
    msg = str(e.value)
    assert msg.startswith("Found 3 errors in the config")
    assert "heads.dept: unknown key; valid keys here: ['depth', 'layout', 'width_mult']" in msg
    assert "optim.lr: Input should be greater than 0 (got -1)" in msg
    assert "train.epochs:" in msg and "'abc'" in msg


def test_bad_values_name_the_fix():
    with pytest.raises(ConfigError, match=r"crop_scale=\[0.9, 0.2\] must satisfy 0 < low <= high <= 1"):
        load_config(None, ["augment.crop_scale=[0.9, 0.2]"])
    with pytest.raises(ConfigError, match="duplicate names"):
        validate_config({"teachers": [{"name": "a", "arch": "resnet10t", "weights": "x"}] * 2})
    with pytest.raises(ConfigError, match=r"index '3' is out of range"):
        load_config(None, ["teachers.3.arch=resnet50"])


def test_frozen():
    cfg = SimRegConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.heads.depth = 3  # type: ignore[misc]


def test_flatten_round_trip_keys():
    flat = flatten(SimRegConfig())
    assert flat["heads.depth"] == 4 and flat["teachers.0.arch"] == "resnet10t"
    assert flat["augment.crop_scale"] == "[0.2, 1.0]"
    # every flattened key is a valid override
    overrides = [f"{k}={v if v is not None else 'null'}" for k, v in flat.items()]
    assert load_config(None, overrides) == SimRegConfig()


def test_unknown_loss_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"train\.loss: unknown loss; use one of \['mse', 'simreg'\]"):
        load_config(None, ["train.loss=huber"])
    assert load_config(None, ["train.loss=simreg"]).train.loss == "simreg"
    assert load_config(None, ["train.loss=mse"]).train.loss == "mse"


def test_normalize_and_teacher_drop_are_checked():
    cfg = load_config(None, ["teachers.0.normalize=phi_s", "loss.teacher_drop=0.5"])
    assert cfg.teachers[0].normalize == "phi_s" and cfg.loss.teacher_drop == 0.5
    with pytest.raises(ConfigError, match=r"teachers\.0\.normalize"):
        load_config(None, ["teachers.0.normalize=whiten"])
    with pytest.raises(ConfigError, match=r"loss\.teacher_drop"):
        load_config(None, ["loss.teacher_drop=1"])
