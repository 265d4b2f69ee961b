"""A search space applied to the config: trial configs, the up-front check of every key and value, Tune's
param space.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from ray import tune

from simreg.models.errors import ConfigError
from simreg.orchestrator.config import SimRegConfig, apply_override, validate_config
from simreg.search_spaces import Domain, SearchSpace

log = logging.getLogger("simreg")


def trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> SimRegConfig:
    tree = copy.deepcopy(base)
    for k, v in overrides.items():
        apply_override(tree, k, v)
    return validate_config(tree, f"trial {overrides}")


def _sample(d: Domain) -> Any:
    vals = d.values()
    if vals is not None:
        return vals[0]
    return (d.uniform or d.loguniform or d.randint or d.quniform)[0]


def check_space(space: SearchSpace, base: dict[str, Any], source: str) -> dict[str, Any]:
    """Apply ``base`` and every param's values to the config; all problems named at once. Returns the
    base tree with the space's ``base`` overrides applied."""
    tree = copy.deepcopy(base)
    errors = []
    for k, v in space.base.items():
        try:
            apply_override(tree, k, v)
        except ConfigError as e:
            errors.append(f"  - base.{k}: {e}")
    for k, d in space.params.items():
        for v in (d.values() or [_sample(d)]):
            try:
                trial_config(tree, {k: v})
            except ConfigError as e:
                detail = str(e).split("\n", 1)[-1].strip()
                errors.append(f"  - params.{k}={v!r}: {detail}")
                break
    try:
        validate_config(tree, source)
    except ConfigError as e:
        errors.append(f"  - base: {e}")
    if errors:
        raise ConfigError(f"Found {len(errors)} error(s) in search space {source}:\n" + "\n".join(errors))
    return tree


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, d in space.params.items():
        if space.search.algorithm == "grid" or d.kind == "grid":
            out[k] = tune.grid_search(list(d.values() or []))
        elif d.kind == "choice":
            out[k] = tune.choice(list(d.choice or []))
        elif d.kind == "uniform":
            out[k] = tune.uniform(*d.uniform)
        elif d.kind == "loguniform":
            out[k] = tune.loguniform(*d.loguniform)
        elif d.kind == "randint":
            out[k] = tune.randint(*d.randint)
        elif d.kind == "quniform":
            out[k] = tune.quniform(*d.quniform)
    return out
