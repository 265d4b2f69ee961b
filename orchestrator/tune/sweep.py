"""``sweep(cfg, space)``: Ray Tune over head designs / augmentation, one Ray Train run per trial, MLflow
parent run per sweep with a nested child run per trial.

    simreg sweep --space smoke                          # 3 small trials on the offline demo
    simreg sweep --config my.yaml --space head_design --output-dir runs/heads
    simreg sweep --space head_design --output-dir runs/heads --resume     # after an interruption
    simreg compare runs/heads                           # the comparison table, best first
    simreg sweep --space smoke --output-dir s3://bucket/sweeps/a --tracking-uri http://mlflow:5000

Train V2 pattern: a Tune *function* trainable builds and fits one TorchTrainer per trial with
``TuneReportCallback``; it asks Tune for a token CPU share only, the Train workers and teacher actors
hold the real resources. Only the driver writes to MLflow, from a Tune callback.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from simreg.models.errors import ConfigError, first_line
from simreg.orchestrator import console, fence
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.storage import Store, open_store, scratch
from simreg.orchestrator.tracking.backends import backend_for, default_tracking_uri
from simreg.orchestrator.tracking.base import TRACKING_URI_ENV
from simreg.orchestrator.tracking.redact import redact_json_text, redact_tree
from simreg.orchestrator.tracking.system_metrics import SystemMetrics, system_step
from simreg.orchestrator.tune.callback import CHILD_RUNS_FILE, TrialRunsCallback
from simreg.orchestrator.tune.outcome import SweepFailedError, sweep_outcome
from simreg.orchestrator.tune.space import check_space, trial_config, tune_param_space
from simreg.orchestrator.tune.trial import run_trial
from simreg.search_spaces import SearchSpace

log = logging.getLogger("simreg")


def sweep(
    cfg: SimRegConfig, space: SearchSpace, space_source: str, output_dir: str | Path | Store, *, resume: bool = False,
    tracking_uri: str | None = None, command_line: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep; writes ``output_dir/sweep_summary.json`` and returns it. ``output_dir``: a
    local folder or an object-store URI (Tune's experiment state, every trial's checkpoints, the comparison).
    The space's ``base`` applies over ``cfg``; the ``key=value`` overrides of the ``command_line`` (those that
    made ``cfg``) apply over both: a user's own value wins."""
    from simreg.orchestrator.train.rundir import hold_output_dir, preflight

    t0 = time.perf_counter()
    fence.reset()  # a new driver: no stop decided yet (a notebook may run several)
    out = open_store(output_dir)
    uri = tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri(out)
    preflight(cfg, out, uri)
    tune_dir = out / "tune"
    if resume and not (tune_dir / "sweep").is_dir():
        raise ConfigError(f"--resume: {out} holds no sweep to resume (no tune/sweep folder): drop --resume or fix --output-dir")
    if not resume and (tune_dir / "sweep").is_dir():
        raise ConfigError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --output-dir")
    with hold_output_dir(out) as lock, scratch(out) as local:
        return _sweep(cfg, space, space_source, out, local, resume, uri, t0, lock.token(), command_line or [])


def _sweep(
    cfg: SimRegConfig, space: SearchSpace, space_source: str, out: Store, local: Path, resume: bool, uri: str, t0: float,
    lease: dict[str, str] | None, command_line: list[str],
) -> dict[str, Any]:
    from ray.tune.schedulers import ASHAScheduler

    from simreg.orchestrator.pipeline.fleet import start_fleet
    from simreg.orchestrator.train.placement import (
        concurrent_trials,
        plan_placement,
        resource_check,
        teacher_cpus,
        teacher_gpus,
    )
    from simreg.orchestrator.train.prepare import prepare
    from simreg.orchestrator.train.rundir import publish
    from simreg.orchestrator.train.trainer import init_ray, pool_resources

    tune_dir = out / "tune"
    # 1. the space, checked against the config; every trial must validate. A resumed sweep keeps the
    #    space and base config it started with (the trials already run used them). The base config is
    #    redacted: it is written here and pickled into Tune's state, and no trial needs the tracking URI
    #    (only this driver writes to the tracker, with the URI from its environment: _tracking_uri_env).
    if resume:
        space = SearchSpace.model_validate_json((out / "space.json").read_text())
        base_tree = redact_tree(json.loads((out / "base_config.json").read_text()))
        log.info("resuming the sweep in %s with its original space and base config", out)
    else:
        base_tree = redact_tree(check_space(space, json.loads(cfg.model_dump_json()), space_source, command_line))
    keys = list(space.params)
    base_cfg = trial_config(base_tree, {})
    epochs = base_cfg.train.epochs
    if base_cfg.eval.val_every != 1 and space.search.metric.startswith("val/"):
        raise ConfigError("sweeps report the validation k-NN every epoch: set eval.val_every=1")
    (out / "space.json").write_text(redact_json_text(space.model_dump_json(indent=2)))
    (out / "base_config.json").write_text(json.dumps(base_tree, indent=2))

    # 2. data and teachers once in the driver: a bad path fails here, not in every trial
    # a space that sets teachers[i].normalize: every teacher's statistics stored beside the cache now, read by the trials
    prep = prepare(base_cfg, stats_for_all=any(k.startswith("teachers.") and k.endswith(".normalize") for k in keys),
                   check_export=True)

    # 3. Ray, concurrency from the cluster's resources: with the teacher fleet (teacher_pool.fleet) the teachers
    #    hold their resources once and a trial only its student workers and view tasks
    cluster = init_ray(base_cfg)
    placement = plan_placement(base_cfg, cluster, check=False)
    resource_check(base_cfg, cluster, placement, cached=True)  # one trial's students, before any cache read
    # Every trial's targets already cached (a head-design sweep on a warm cache): read once, here, and shared by
    # the trials; no fleet, and a trial holds its student workers only
    cached = _shared_cached(space, base_tree, base_cfg, prep, cluster)
    _check_shared_on_resume(out, resume, cached is not None)
    resource_check(base_cfg, cluster, placement, cached=cached is not None)  # the fleet (or a trial's own teachers) + one trial
    use_fleet = base_cfg.teacher_pool.fleet and cached is None
    res = pool_resources(base_cfg, placement)
    unserved = _unserved_params(space, base_tree, prep.specs, res, cluster) if use_fleet else []
    if unserved:
        log.warning("sweep: %s change(s) a teacher the fleet runs (its weights, input, precision, layout or device): trials with "
                    "such a value start their own teacher actors, counted in each trial's resources", ", ".join(unserved))
    fit, per_trial = concurrent_trials(base_cfg, cluster, placement, use_fleet, trial_teachers=not use_fleet or bool(unserved),
                                       cached=cached is not None)
    concurrent = space.search.max_concurrent_trials or fit
    log.info("sweep: %d param(s) %s, %s search, %d concurrent trial(s) (%.2f CPUs each)%s", len(keys), keys,
             space.search.algorithm, concurrent, per_trial,
             "; every trial's targets are in the target cache: no teacher actor, the trials share one copy of them"
             if cached is not None else
             f"; one teacher fleet for all trials ({teacher_cpus(base_cfg):g} CPUs, {teacher_gpus(base_cfg, placement):g} GPUs)"
             if use_fleet else "; each trial starts its own teacher actors")

    # 4. MLflow parent run (reused on resume)
    parent = backend_for(uri).open_run(
        cfg.tracking.experiment, out, f"sweep-{cfg.name}", {"simreg.command": "sweep", "simreg.output_dir": out.uri},
    )
    parent.log_params({f"space.{k}": json.dumps(d.model_dump(exclude_none=True)) for k, d in space.params.items()}
                      | {f"search.{k}": v for k, v in space.search.model_dump().items()})
    runs_file = out / CHILD_RUNS_FILE
    children = TrialRunsCallback(parent.run_id, base_tree, keys, epochs, runs_file.uri)

    # 5. the teacher fleet, then Tune
    # Save Tune's experiment state at most every second (default: adaptive, >= 10 s), so a sweep killed
    # right after a trial ends does not restart that trial on --resume (its Train run would restore the
    # final checkpoint and train no further, but would still pay a start-up).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if not console.verbose():  # Tune's boxes and hints (its experiment path, TensorBoard) stay off the console
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C / SIGTERM / a lost lease stop the sweep (fence.py): Tune's own SIGINT handler would end it ENDED
    # and let it write its comparison, summary and registered model as if it had ended
    fence.quiet_ray_handlers()
    from simreg.orchestrator.ray_compat import fence_tune_state

    fence_tune_state(fence.check)  # nor does a stopped driver, or one past its lease, save Tune's state
    status = "FAILED"
    fleet = None
    tune_path, tune_fs = tune_dir.ray_storage()
    with _tracking_uri_env(uri):
        try:
            fleet = start_fleet(prep.specs, res) if use_fleet else None
            trainable = tune.with_resources(
                tune.with_parameters(run_trial, base=base_tree, keys=keys, storage=(out / "trials").uri, fleet=fleet, cached=cached,
                                     lease=lease, driver_cluster=cluster),
                {"CPU": 0.01},
            )
            scheduler = None
            if space.search.scheduler == "asha":
                scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=space.search.grace_period,
                                          reduction_factor=space.search.reduction_factor)
            search_alg = None
            if space.search.algorithm == "optuna":
                from ray.tune.search.optuna import OptunaSearch

                search_alg = OptunaSearch(seed=cfg.seed)
            if resume:
                tuner = tune.Tuner.restore(
                    (tune_dir / "sweep").ray_storage()[0], trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=tune_fs,
                )
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=tune_param_space(space),
                    tune_config=tune.TuneConfig(
                        metric=space.search.metric, mode=space.search.mode, num_samples=space.search.num_samples,
                        scheduler=scheduler, search_alg=search_alg, max_concurrent_trials=concurrent,
                    ),
                    run_config=tune.RunConfig(
                        name="sweep", storage_path=tune_path, storage_filesystem=tune_fs, callbacks=[children],
                        failure_config=tune.FailureConfig(max_failures=0),
                        verbose=1 if console.verbose() else 0,  # Tune's status tables; the callback logs a line per trial epoch
                    ),
                )
            with SystemMetrics(_to_sweep_runs(parent, runs_file, uri), base_cfg.tracking.system_metrics_s, system_step(parent)):
                tuner.fit()  # on --resume, Tune restores the pickled callback above: same runs file, same parent
            fence.check("the sweep's results")  # a stop decided while Tune ran ends the sweep here, KILLED
            status = "ENDED"
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM, a lost lease (fence.Stopped)
            status = "KILLED"
            raise
        finally:
            fleet_rows = _close_fleet(fleet, interrupted=status != "ENDED")
            if status != "ENDED":
                parent.end(status)

    # 6. the outcome (all trials failed: the sweep failed), comparison, plots, summary
    from simreg.orchestrator.tune.compare import comparison_rows, write_comparison

    ended = False
    try:  # whatever fails here (a comparison, an upload) still ends the parent run: FAILED, not RUNNING until the reaper
        runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
        outcome = sweep_outcome(runs, str(out))
        if outcome.message and outcome.status != "FAILED":
            log.warning("%s", outcome.message)
        rows = comparison_rows(runs, space.search.metric, space.search.mode)
        artifacts = write_comparison(rows, keys, space.search.metric, local, parent)
        (out / "comparison").upload(local / "comparison")
        artifacts = [str(out / "comparison" / Path(a).name) for a in artifacts]
        best = rows[0] if rows else None
        registered = None
        if best is not None and base_cfg.tracking.register_best:
            from simreg.orchestrator.tune.register import register_best

            try:  # the sweep's results stand without it: a registry error is one warning
                version = register_best(backend_for(uri), base_cfg.tracking.register_best, best, base_tree, out)
                registered = {"name": base_cfg.tracking.register_best, "version": version} if version else None
            except Exception as e:  # noqa: BLE001
                log.warning("tracking.register_best=%s: could not register the best trial (%s)", base_cfg.tracking.register_best,
                            first_line(e))
        summary = {
            "parent_run_id": parent.run_id,
            "mlflow_tracking_uri": parent.uri,
            "space": space_source,
            "metric": space.search.metric,
            "mode": space.search.mode,
            "best_trial": best,
            "trials": rows,
            "failed_trials": outcome.failed,
            "artifacts": artifacts,
            "registered_model": registered,
            "teacher_fleet": fleet_rows,  # per teacher: rows computed, from the cache, shared between trials; forwards
            "wall_s": time.perf_counter() - t0,
            "output_dir": out.uri,
        }
        parent.log_artifact(publish(out, local, "sweep_summary.json", json.dumps(summary, indent=2)))
        if best is not None:
            parent.log_metrics({f"best/{space.search.metric}": best["metrics"].get("top1_20nn", float("nan"))}, step=0)
        if fleet_rows:
            parent.log_metrics({f"fleet/{n}/{k}": float(v) for n, r in fleet_rows.items() for k, v in r.items()}, step=0)
        fence.check("the sweep's end")
        parent.end(outcome.status)
        ended = True
    except (KeyboardInterrupt, SystemExit):  # stopped while writing its results: nothing more is written
        parent.end("KILLED")
        ended = True
        raise
    finally:
        if not ended:
            parent.end("FAILED")
    if outcome.status == "FAILED":
        raise SweepFailedError(outcome.message or "")
    return summary


MAX_PROBED_TRIALS = 4096  # combinations of probe values checked before a sweep shares the cached targets


def _params_keep_cached_targets(space: SearchSpace, base_tree: dict[str, Any], base_cfg: SimRegConfig, cluster: dict[str, float]) -> bool:
    """Whether no combination of the space's param values changes which cached targets a trial reads
    (``cached_identity``): heads, optimizer, student and the like do not; views, data, teachers do. Values
    combine: at ``augment.strength=0`` a crop range gives whole images, and so does strength 1 with a full-image
    range, but the two together crop. So every combination of the params' probe values is checked; more than
    ``MAX_PROBED_TRIALS`` of them count as a change, as does a combination that does not validate (nothing is
    known of its trial)."""
    from simreg.orchestrator.train.cached_data import cached_identity

    probes = {k: _probe_values(d) for k, d in space.params.items()}
    n = math.prod(len(v) for v in probes.values())
    if n > MAX_PROBED_TRIALS:
        log.info("sweep: %d combinations of param values, more than the %d checked for shared cached targets: "
                 "each trial reads its own", n, MAX_PROBED_TRIALS)
        return False
    base = cached_identity(base_cfg, cluster)
    for combo in itertools.product(*probes.values()):
        try:
            tcfg = trial_config(base_tree, dict(zip(probes, combo, strict=True)))
        except ConfigError:
            return False
        if cached_identity(tcfg, cluster) != base:
            return False
    return True


def _probe_values(d: Any) -> list[Any]:
    """A domain's values to check a sweep against: every listed value; a range's ends and middle."""
    listed = d.values()
    if listed is not None:
        return list(listed)
    if d.randint is not None:  # [lo, hi): hi excluded
        lo, hi = d.randint
        return sorted({lo, (lo + hi - 1) // 2, hi - 1})
    if d.quniform is not None:
        lo, hi, q = d.quniform
        return [lo, round((lo + hi) / 2 / q) * q, hi]
    lo, hi = d.uniform or d.loguniform
    return [lo, math.sqrt(lo * hi) if d.loguniform is not None else (lo + hi) / 2, hi]


def _one_param_trials(space: SearchSpace, base_tree: dict[str, Any]) -> Iterator[tuple[str, SimRegConfig | None]]:
    """(param, the base config with that param at one of its probe values, or None where that value does not
    validate) for each param of the space."""
    for k, d in space.params.items():
        for v in _probe_values(d):
            try:
                yield k, trial_config(base_tree, {k: v})
            except ConfigError:
                yield k, None


def _shared_cached(space: SearchSpace, base_tree: dict[str, Any], base_cfg: SimRegConfig, prep: Any, cluster: dict[str, float]) -> Any:
    """A ``CachedSource`` for every trial when the cache holds every target of the base config and no param of the
    space changes which targets a trial reads; else None."""
    if not base_cfg.cache.enabled or not _params_keep_cached_targets(space, base_tree, base_cfg, cluster):
        return None
    from simreg.orchestrator.train.cached_data import cached_source
    from simreg.orchestrator.train.placement import plan_placement

    teacher_gpus = plan_placement(base_cfg, cluster, check=False).teacher_gpus
    return cached_source(base_cfg, prep.train, prep.specs, prep.teacher_dims, teacher_gpus)


SHARED_TARGETS_FILE = "shared_targets.json"


def _check_shared_on_resume(out: Store, resume: bool, shared: bool) -> None:
    """A sweep that started on a warm cache sized its concurrency for student workers only, and Tune restores
    that concurrency on ``--resume``: resuming it without every target in the cache would start a fleet beside
    as many trials as the students' CPUs hold, and no view task could ever be placed. Refused instead."""
    f = out / SHARED_TARGETS_FILE
    if not resume or not f.is_file():
        f.write_text(json.dumps({"shared": shared}))
        return
    if json.loads(f.read_text()).get("shared") and not shared:
        raise ConfigError(
            f"the sweep in {out} started with every target in the target cache, which no longer holds them all: "
            "fill it again (simreg cache warm with the sweep's base config) or start a new sweep"
        )


def _unserved_params(space: SearchSpace, base_tree: dict[str, Any], specs: list[Any], res: Any, cluster: dict[str, float]) -> list[str]:
    """The space's params with a value (each listed value; a range's ends and middle) that gives a trial a teacher
    the fleet does not run."""
    from simreg.orchestrator.pipeline.fleet import teacher_identity
    from simreg.orchestrator.train.builders import teacher_specs
    from simreg.orchestrator.train.placement import plan_placement
    from simreg.orchestrator.train.trainer import pool_resources

    fleet_ids = {teacher_identity(s, res) for s in specs}
    out: list[str] = []
    for k, tcfg in _one_param_trials(space, base_tree):
        if tcfg is None or k in out:  # a value that does not validate fails its trial: it starts no teacher
            continue
        tres = pool_resources(tcfg, plan_placement(tcfg, cluster, check=False))
        if any(teacher_identity(s, tres) not in fleet_ids for s in teacher_specs(tcfg)):
            out.append(k)
    return out


def _close_fleet(fleet: Any, interrupted: bool) -> dict[str, dict[str, int]]:
    """The fleet's counts (logged, and returned for the summary), then its actors ended (an interrupted sweep
    waits briefly for cache uploads)."""
    if fleet is None:
        return {}
    from simreg.orchestrator.pipeline.fleet import fleet_placements, fleet_stats, stop_fleet

    rows: dict[str, dict[str, int]] = {}
    try:
        for where in fleet_placements(fleet):
            log.info("teacher fleet: %s", where)
        rows = fleet_stats(fleet, timeout_s=5.0 if interrupted else 30.0)
        for name, r in rows.items():
            log.info("teacher fleet: %s: %d rows computed, %d from the target cache, %d shared between trials, %d forwards",
                     name, r["forward"], r["cached"], r["shared"], r["batches"])
    finally:
        stop_fleet(fleet, timeout_s=5.0 if interrupted else 60.0)
    return rows


@contextmanager
def _tracking_uri_env(uri: str) -> Iterator[None]:
    """The tracking URI in this driver's environment while Tune runs (the trials' callback reads it there):
    never in Tune's experiment state, a pickle in the sweep folder. Set once Ray has started, so a local
    cluster's processes do not inherit it; the previous value is restored after."""
    previous = os.environ.get(TRACKING_URI_ENV)
    os.environ[TRACKING_URI_ENV] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = previous


def _to_sweep_runs(parent: Any, runs_file: Store, uri: str) -> Any:
    """System metrics of the sweep's nodes to its parent run and to every trial's run that is running now (they share
    the nodes): each trial's System metrics tab shows the cluster while it trained."""
    backend = backend_for(uri)

    def log_metrics(metrics: Any, step: int) -> None:
        parent.log_metrics(metrics, step)  # raises when the store fails: the step is not counted
        try:  # the trials' copies are best effort: the parent's step is logged, so the step counts
            runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
            for entry in runs.values():
                if entry.get("status") == "RUNNING":
                    backend.attach(entry["run_id"]).log_metrics(metrics, step)
        except Exception as e:  # noqa: BLE001
            log.debug("system metrics: not logged to every trial (%s)", first_line(e, 200))

    return log_metrics
