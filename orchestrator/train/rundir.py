"""A run's output folder (local or in an object store): one driver at a time (a lock or a lease), the rules
for resuming it, its config.json, the files it publishes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from simreg.models.errors import ConfigError
from simreg.orchestrator.config import SimRegConfig, validate_config
from simreg.orchestrator.storage import FolderLock, Store, open_store
from simreg.orchestrator.tracking.redact import redact_json_text, redact_tree
from simreg.orchestrator.train.checkpoint import train_storage

log = logging.getLogger("simreg")


def safe_config_json(cfg: SimRegConfig) -> str:
    """The run's config as written to the run folder (and MLflow): every URI's credentials masked."""
    return json.dumps(redact_tree(json.loads(cfg.model_dump_json())), indent=2)


# Sections a rerun may change and still resume: where and how it runs, not what it computes.
RESUMABLE_CHANGES = ("scaling", "ray", "teacher_pool", "tracking", "cache")


def check_resume(cfg: SimRegConfig, output_dir: Store | Path) -> bool:
    """True when ``output_dir`` holds a run to resume; refuses one whose config differs in what it computes."""
    output_dir = open_store(output_dir)
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
    now = redact_tree(json.loads(cfg.model_dump_json()))  # as the saved file was written
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


def hold_output_dir(output_dir: Store | Path) -> FolderLock:
    """Exclusive ownership of the run folder while the returned lock is held (``with`` it, or ``release``):
    two drivers never write one run. Local: flock (dropped by the OS when the process dies); S3: a lease."""
    return FolderLock(open_store(output_dir)).acquire()


def publish(out: Store, local: Path, name: str, text: str) -> Path:
    """Write ``out/name`` atomically, redacted (tracking/redact.py), and return a local copy of it (for MLflow
    artifacts): the same file when the output folder is local, a file in the scratch folder ``local`` when it
    is in an object store."""
    text = redact_json_text(text)
    (out / name).write_text(text)
    copy = local / name
    if out.remote:
        copy.write_text(text)
    return copy


def preflight(cfg: SimRegConfig, out: Store, tracking_uri: str) -> None:
    """Everything a run writes to outside this process, checked before Ray starts: the output folder, a
    target cache in an object store, the tracking server. Each failure is one line naming the URI and the fix."""
    from simreg.orchestrator.cache.targets import default_cache_dir
    from simreg.orchestrator.tracking.backends import check_tracking_uri

    out.check_reachable("--output-dir")
    if cfg.cache.enabled:
        cache = open_store(cfg.cache.dir or default_cache_dir())
        cache.check_reachable("cache.dir")
    check_tracking_uri(tracking_uri)
