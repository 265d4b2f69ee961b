"""A run's output folder: one driver at a time (a lock), the rules for resuming it, its config.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from simreg.models.errors import ConfigError
from simreg.orchestrator.config import SimRegConfig, validate_config
from simreg.orchestrator.tracking.redact import redact_uri
from simreg.orchestrator.train.checkpoint import train_storage

log = logging.getLogger("simreg")


def safe_config_json(cfg: SimRegConfig) -> str:
    """The run's config as written to the run folder (and MLflow): no password of a tracking URI."""
    tree = json.loads(cfg.model_dump_json())
    if tree["tracking"]["tracking_uri"]:
        tree["tracking"]["tracking_uri"] = redact_uri(tree["tracking"]["tracking_uri"])
    return json.dumps(tree, indent=2)


# Sections a rerun may change and still resume: where and how it runs, not what it computes.
RESUMABLE_CHANGES = ("scaling", "ray", "teacher_pool", "tracking", "cache")


def check_resume(cfg: SimRegConfig, output_dir: Path) -> bool:
    """True when ``output_dir`` holds a run to resume; refuses one whose config differs in what it computes."""
    saved_file = output_dir / "config.json"
    if not train_storage(output_dir).is_dir():
        return False
    if (output_dir / "summary.json").is_file():
        raise ConfigError(
            f"{output_dir} holds a finished run (summary.json): choose another --output-dir, or delete the folder to run again"
        )
    if not saved_file.is_file():
        return True
    saved = json.loads(validate_config(json.loads(saved_file.read_text()), str(saved_file)).model_dump_json())
    now = json.loads(cfg.model_dump_json())
    changed: list[str] = []
    for sec in sorted(set(saved) | set(now)):
        old, new = saved.get(sec), now.get(sec)
        if sec in RESUMABLE_CHANGES:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{sec}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(sec)
    if changed:
        raise ConfigError(
            f"{output_dir} holds an interrupted run with another config (differs in {', '.join(changed)}): "
            f"rerun with the same config to resume it (saved in {saved_file}), or choose another --output-dir"
        )
    return True


def hold_output_dir(output_dir: Path) -> Any:
    """An exclusive lock on the run folder for this process's lifetime (the OS drops it when the process
    dies), so two drivers never write one run."""
    import fcntl

    f = open(output_dir / ".simreg.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{output_dir} is in use by another simreg process: wait for it, or choose another --output-dir") from None
    return f
