"""Orchestration of SimReg on Ray: config, data, pipeline, training, sweeps, tracking, evaluation, CLI.

The Python API (``orchestrator/api.py``)::

    from simreg.orchestrator import distill, evaluate, load_config, sweep

Loaded on first use, so importing a submodule (``simreg.orchestrator.config``) stays light.
"""
from __future__ import annotations

from typing import Any

__all__ = ["distill", "evaluate", "load_config", "sweep"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from simreg.orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'simreg.orchestrator' has no attribute {name!r}")
