from __future__ import annotations

import json
from pathlib import Path

import pytest

from simreg.models import ConfigError
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.tune.space import check_space, trial_config, tune_param_space
from simreg.search_spaces import load_space, shipped

BASE = json.loads(SimRegConfig().model_dump_json())


@pytest.mark.parametrize("name", sorted(shipped()))
def test_every_shipped_space_validates_every_key(name):
    space, src = load_space(name)
    tree = check_space(space, BASE, src)
    for key, dom in space.params.items():
        for v in dom.values() or []:
            trial_config(tree, {key: v})  # each value of each key gives a valid config
    assert tune_param_space(space).keys() == space.params.keys()


def test_shipped_names():
    assert {"smoke", "head_design", "augmentation"} <= set(shipped())


def test_unknown_and_ill_typed_keys_named(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("params:\n  heads.dept: {choice: [1, 2]}\n  heads.depth: {choice: [a, 2]}\nbase:\n  train.epoch: 3\n")
    space, src = load_space(f)
    with pytest.raises(ConfigError) as e:
        check_space(space, BASE, src)
    msg = str(e.value)
    assert "params.heads.dept=1" in msg and "unknown key" in msg
    assert "params.heads.depth='a'" in msg and "valid integer" in msg
    assert "train.epoch" in msg


def test_bad_domains(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("search: {algorithm: grid}\nparams:\n  optim.lr: {loguniform: [0.0, 0.1]}\n")
    with pytest.raises(ConfigError, match="loguniform bounds must be > 0"):
        load_space(f)
    f.write_text("search: {algorithm: grid}\nparams:\n  optim.lr: {uniform: [0.01, 0.1]}\n")
    with pytest.raises(ConfigError, match="grid needs finite domains"):
        load_space(f)
    f.write_text("params:\n  optim.lr: {uniform: [0.01, 0.1], choice: [1]}\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_space(f)
    with pytest.raises(ConfigError, match="neither a file nor a shipped space"):
        load_space("no_such_space")
