"""A search space applied to the config: trial configs, the up-front check of every key and value, Tune's
param space.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from ray import tune

from simreg.models.errors import ConfigError
from simreg.orchestrator.config import SimRegConfig, apply_override, parse_overrides, validate_config
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


def check_space(space: SearchSpace, base: dict[str, Any], source: str, command_line: list[str] | None = None) -> dict[str, Any]:
    """Apply the space's ``base``, then the ``key=value`` overrides of the ``command_line`` (the user's own
    value wins over the space's), and every param's values to the config; all problems named at once. Returns
    the base tree with both applied."""
    tree = copy.deepcopy(base)
    errors = []
    for k, v in space.base.items():
        try:
            apply_override(tree, k, v)
        except ConfigError as e:
            errors.append(f"  - base.{k}: {e}")
    given = parse_overrides(command_line or [])
    for k, v in given:
        apply_override(tree, k, v)
    won = [f"{u}={v!r}" for u, v in given if any(k == u or k.startswith(u + ".") or u.startswith(k + ".") for k in space.base)]
    if won:
        log.info("sweep: the command line sets %s, over the space's base", ", ".join(won))
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
