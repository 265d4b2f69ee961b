"""``simreg doctor``: everything a run needs, checked in one go before a long run, one row per check.

    simreg doctor                                           # the offline demo on this machine
    simreg doctor --config my.yaml --output-dir s3://bucket/runs/x --tracking-uri http://mlflow:5000 ray.address=auto

Rows: the installed versions against simreg's pins; the Ray cluster (or the machine a local one would use)
against the resources the config asks for; the output folder and ``cache.dir`` (a probe object written, read
and deleted; a bucket folder must enforce conditional writes, as the run's lease needs); free disk for a local
cache; the tracking server; each teacher's weights (read and loaded into its timm architecture); the data.
Each failure names the fix; the command exits 1 when any check fails.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simreg.models.errors import SimRegError, first_line
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.tracking.redact import redact_text

MIN_FREE_GIB = 1.0  # below this, a local target cache would soon fill its disk


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run_checks(cfg: SimRegConfig, output_dir: str | None, tracking_uri: str | None) -> list[Check]:
    """Every check, in order; none raises (a check that fails is a row)."""
    from simreg.orchestrator.storage import open_store

    out = open_store(output_dir or "runs")
    checks: list[tuple[str, Callable[[], str]]] = [
        ("versions", _versions),
        ("ray cluster", lambda: _ray(cfg)),
        ("output folder", lambda: _folder(out, "--output-dir", lease=True)),
    ]
    if cfg.cache.enabled:
        from simreg.orchestrator.cache.targets import default_cache_dir

        checks.append(("cache.dir", lambda: _cache(open_store(cfg.cache.dir or default_cache_dir()))))
    checks.append(("tracking", lambda: _tracking(cfg, out, tracking_uri)))
    from simreg.orchestrator.train.builders import teacher_specs

    for spec in teacher_specs(cfg):
        checks.append((f"teacher {spec.name}", lambda spec=spec: _teacher(spec)))
    checks.append(("data", lambda: _data(cfg)))
    rows = []
    for name, fn in checks:
        try:
            rows.append(Check(name, True, fn()))
        except Exception as e:  # noqa: BLE001  (each failure is a row of the table, with its fix)
            rows.append(Check(name, False, first_line(e, 400) if isinstance(e, SimRegError) else f"{type(e).__name__}: {first_line(e, 300)}"))
    return rows


def table(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r.name:<{width}}  {'ok' if r.ok else 'FAIL':<6}  {redact_text(r.detail)}" for r in rows]
    failed = [r.name for r in rows if not r.ok]
    lines.append("")
    lines.append(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "every check passed")
    return "\n".join(lines)


def _versions() -> str:
    """The installed packages against simreg's own requirements (its metadata), and Python."""
    import platform
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    bad, seen = [], []
    for raw in requires("simreg") or []:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (tests): not needed to run
        try:
            have = version(req.name)
        except PackageNotFoundError:
            bad.append(f"{req.name} is not installed (needs {req.specifier or 'any'})")
            continue
        if req.name in ("torch", "ray", "mlflow", "pyarrow", "timm"):
            seen.append(f"{req.name} {have}")
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append(f"{req.name} {have} (needs {req.specifier})")
    if bad:
        raise SimRegError("; ".join(bad) + ": reinstall simreg's environment (bash scripts/setup.sh)")
    return f"simreg {version('simreg')}; {', '.join(seen)}; Python {platform.python_version()}"


def _ray(cfg: SimRegConfig) -> str:
    """The cluster the run would use, against what the config asks (the run's own resource rule). A local
    cluster is not started: this machine's CPUs and GPUs stand for it."""
    from simreg.orchestrator.train.placement import plan_placement, resource_check

    if cfg.ray.address is None:
        import torch

        cluster = {"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        where = "local (started by the run)"
        auth = ""
    else:
        import ray

        ray.init(address=cfg.ray.address, logging_level="ERROR", log_to_driver=False)
        try:
            cluster = dict(ray.cluster_resources())
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        finally:
            ray.shutdown()
        where = f"{cfg.ray.address}: {nodes} node(s)"
        auth = f"; token auth {'on' if os.environ.get('RAY_AUTH_MODE', '').lower() == 'token' else 'off here (RAY_AUTH_MODE=token)'}"
    placement = plan_placement(cfg, cluster, check=False)
    resource_check(cfg, cluster, placement)
    return f"{where}, {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs: the plan fits{auth}"


def _folder(store: Any, what: str, lease: bool = False) -> str:
    """A probe written, read back and deleted; in a bucket, with ``lease``, the conditional writes the run's
    lease needs (a probe lease taken and released)."""
    detail = ""
    if lease and store.remote and str(store).startswith("s3://"):  # first: a server without them is refused for runs
        from simreg.orchestrator.storage import FolderLock

        FolderLock(store / f".simreg-doctor-lease-{uuid.uuid4().hex[:8]}").acquire().release()
        detail = "; conditional writes enforced (the run's lease)"
    store.check_reachable(what)
    made = store.local_path is not None and not store.local_path.exists()  # removed again: a check leaves no folder
    probe = store / f".simreg-doctor-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    probe.write_bytes(b"simreg doctor")
    if probe.read_bytes() != b"simreg doctor":
        raise SimRegError(f"{what} {store}: a probe read back differs from what was written")
    probe.delete()
    if made:
        store.local_path.rmdir()
    return f"{store}: write, read, delete ok ({1000 * (time.perf_counter() - t0):.0f} ms){detail}"


def _cache(store: Any) -> str:
    detail = _folder(store, "cache.dir")
    local = store.local_path
    if local is not None:
        free = shutil.disk_usage(local).free / 2**30
        if free < MIN_FREE_GIB:
            raise SimRegError(f"cache.dir {store}: {free:.2f} GiB free: free some disk, or point cache.dir at another disk")
        detail += f"; {free:.0f} GiB free"
    return detail


def _tracking(cfg: SimRegConfig, out: Any, tracking_uri: str | None) -> str:
    from simreg.orchestrator.tracking.backends import check_tracking_uri, default_tracking_uri

    uri = tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri(out)
    check_tracking_uri(uri)
    return f"{uri}: answers" if uri.startswith(("http://", "https://")) else f"{uri}: a local store"


def _teacher(spec: Any) -> str:
    teacher = spec.build()
    n = sum(p.numel() for p in teacher.parameters())
    from simreg.models.random_init import names_random

    where = "random init" if names_random(spec.weights) else spec.weights
    return f"{spec.arch} from {where}: loaded, {n / 1e6:.1f} M parameters, feature dim {teacher.feature_dim}"


def _data(cfg: SimRegConfig) -> str:
    from simreg.orchestrator.data.sources import get_source

    train, held_out = get_source(cfg.data.source).load(cfg.data, cfg.seed, stream=True)
    return f"{cfg.data.source}: {len(train):,} train images, {len(held_out):,} held out"
