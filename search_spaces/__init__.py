"""YAML sweep definitions keyed by the config's dotted names, validated against the config.

A space file::

    description: what the sweep compares
    search:            # all optional
      algorithm: grid | random | optuna
      num_samples: 1   # grid: repeats of the whole grid; random/optuna: trials
      metric: val/top1_20nn
      mode: max
      scheduler: none | asha
      grace_period: 1  # asha: epochs before a trial can be stopped
      reduction_factor: 2
      max_concurrent_trials: null   # null: as many as the cluster's CPUs/GPUs hold
    base:              # overrides applied to every trial (dotted keys)
      train.epochs: 4
    params:            # dotted key -> one domain
      heads.depth: {choice: [1, 2, 4]}
      augment.crop_scale.0: {uniform: [0.08, 0.5]}
      optim.lr: {loguniform: [0.01, 0.2]}
      heads.width_mult: {grid: [1, 2, 4]}
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simreg.models.errors import ConfigError

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


class Domain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    quniform: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Domain:
        given = [d for d in DOMAINS if getattr(self, d) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(DOMAINS)} (got {given or 'none'})")
        for d in ("choice", "grid"):
            v = getattr(self, d)
            if v is not None and not v:
                raise ValueError(f"{d} needs at least one value")
        lo_hi = self.uniform or self.loguniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"bounds {list(lo_hi)} must be increasing")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(d for d in DOMAINS if getattr(self, d) is not None)

    def values(self) -> list[Any] | None:
        """The finite values of a choice/grid domain (None for continuous ones)."""
        return self.choice if self.choice is not None else self.grid


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    algorithm: Literal["grid", "random", "optuna"] = "random"
    num_samples: int = Field(1, ge=1)
    metric: str = "val/top1_20nn"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent_trials: int | None = Field(None, ge=1)


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = ""
    search: SearchOptions = SearchOptions()
    base: dict[str, Any] = {}
    params: dict[str, Domain]

    @model_validator(mode="after")
    def _grid(self) -> SearchSpace:
        if not self.params:
            raise ValueError("params is empty: give at least one dotted key with a domain")
        if self.search.algorithm == "grid":
            cont = [k for k, d in self.params.items() if d.values() is None]
            if cont:
                raise ValueError(f"search.algorithm=grid needs finite domains (choice/grid); {cont} are continuous")
        if self.search.algorithm == "optuna" and any(d.kind == "grid" for d in self.params.values()):
            raise ValueError("search.algorithm=optuna cannot take grid domains: use choice")
        return self


def shipped() -> dict[str, Path]:
    """Name -> path of the search spaces shipped with simreg."""
    root = Path(str(resources.files(__package__)))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def load_space(name_or_path: str | Path) -> tuple[SearchSpace, str]:
    """Parse a shipped space by name or a YAML file; returns (space, source). Keys are checked by
    ``check_keys`` against a config."""
    p = Path(name_or_path)
    if not p.is_file():
        spaces = shipped()
        if str(name_or_path) not in spaces:
            raise ConfigError(
                f"search space {str(name_or_path)!r} is neither a file nor a shipped space: use one of "
                f"{sorted(spaces)} or a path to a YAML file"
            )
        p = spaces[str(name_or_path)]
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"search space {str(p)!r} is not valid YAML: {e}") from e
    try:
        return SearchSpace.model_validate(raw), str(p)
    except ValidationError as e:
        lines = [f"  - {'.'.join(str(x) for x in err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise ConfigError(f"Found {len(lines)} error(s) in search space {str(p)!r}:\n" + "\n".join(lines)) from None
