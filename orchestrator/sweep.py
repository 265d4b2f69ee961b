"""``sweep(cfg, space)``: Ray Tune over head designs / augmentation, one Ray Train run per trial, MLflow
parent run per sweep with a nested child run per trial.

    simreg sweep --space smoke                          # 3 small trials on the offline demo
    simreg sweep --config my.yaml --space head_design --output-dir runs/heads
    simreg sweep --space head_design --output-dir runs/heads --resume     # after an interruption
    simreg compare runs/heads                           # the comparison table, best first

Train V2 pattern: a Tune *function* trainable builds and fits one TorchTrainer per trial with
``TuneReportCallback``; it asks Tune for a token CPU share only, the Train workers and teacher actors
hold the real resources. Only the driver writes to MLflow, from a Tune callback.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ray import tune

from simreg.models.errors import ConfigError, SimRegError
from simreg.orchestrator.config import SimRegConfig, apply_override, flatten, validate_config
from simreg.orchestrator.tracking import Tracker, default_tracking_uri, log_metrics, log_params, redact_uri
from simreg.search_spaces import Domain, SearchSpace

log = logging.getLogger("simreg")
CHILD_RUNS_FILE = "mlflow_child_runs.json"


# ------------------------------------------------------------------ config <-> space


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


# ------------------------------------------------------------------ the trial (runs in a Tune actor)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], keys: list[str], storage: str) -> None:
    import ray
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from simreg.orchestrator.pipeline import start_run_state
    from simreg.orchestrator.run import failure_config, make_trainer, plan_placement, prepare

    cfg = trial_config(base, {k: config[k] for k in keys})
    prep = prepare(cfg, quiet=True)
    placement = plan_placement(cfg, dict(ray.cluster_resources()), check=False)
    state = start_run_state()
    trial_id = tune.get_context().get_trial_id()
    actors: list[Any] = []
    try:
        trainer, actors = make_trainer(prep, placement, state, ray.train.RunConfig(
            name=f"trial_{trial_id}", storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1), failure_config=failure_config(cfg),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ))
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    finally:
        for a in [state, *actors]:
            ray.kill(a)


# ------------------------------------------------------------------ MLflow from the driver


class MlflowTrialsCallback(tune.Callback):
    """A Tune callback in the driver: one nested child run per trial under the sweep's parent run.

    Picklable (Tune stores it with the experiment and restores it on ``--resume``): it holds plain values,
    opens its MLflow client lazily, and keeps the trial -> run map in ``DIR/mlflow_child_runs.json`` so a
    resumed sweep reuses its runs instead of creating duplicates."""

    def __init__(self, tracking_uri: str, parent_run_id: str, base: dict[str, Any], keys: list[str], epochs: int, runs_file: str) -> None:
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.base, self.keys, self.epochs, self.runs_file = base, keys, epochs, runs_file
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_client"} | {"_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _load(self) -> dict[str, dict[str, Any]]:
        p = Path(self.runs_file)
        return json.loads(p.read_text()) if p.is_file() else {}

    def _save(self, runs: dict[str, dict[str, Any]]) -> None:
        p = Path(self.runs_file)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=2))
        tmp.replace(p)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from mlflow.entities import RunStatus

        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is not None:  # a resumed trial: same run, running again
            self.client.update_run(entry["run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
            entry["status"] = "RUNNING"
            self._save(runs)
            return
        overrides = {k: trial.config[k] for k in self.keys}
        exp_id = self.client.get_run(self.parent_run_id).info.experiment_id
        run = self.client.create_run(exp_id, run_name=f"trial_{trial.trial_id}", tags={
            "mlflow.parentRunId": self.parent_run_id, "simreg.trial_id": trial.trial_id, "simreg.command": "sweep-trial",
        })
        log_params(self.client, run.info.run_id, flatten(trial_config(self.base, overrides)))
        runs[trial.trial_id] = {"trial_id": trial.trial_id, "run_id": run.info.run_id, "params": overrides, "status": "RUNNING"}
        self._save(runs)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is None or "epoch" not in result:
            return
        step = int(result["epoch"])
        log_metrics(self.client, entry["run_id"], {
            k: v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("train/", "val/"))
        }, step)
        entry["last_epoch"] = step
        entry.setdefault("curve", {})[str(step)] = float(result.get("val/top1_20nn", float("nan")))
        entry["metrics"] = {k.removeprefix("val/"): float(result[k]) for k in ("val/top1_1nn", "val/top1_20nn") if k in result}
        if result.get("checkpoint_path"):
            entry["checkpoint"] = str(result["checkpoint_path"])
        self._save(runs)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)

    def _end(self, trial: Any, errored: bool) -> None:
        runs = self._load()
        entry = runs.get(trial.trial_id)
        if entry is None:
            return
        if errored:
            status, fate = "FAILED", "error"
        elif entry.get("last_epoch", -1) + 1 < self.epochs:
            status, fate = "KILLED", "early_stopped"  # the scheduler stopped it before its last epoch
        else:
            status, fate = "FINISHED", "completed"
        self.client.set_tag(entry["run_id"], "simreg.trial_fate", fate)
        for k, v in entry.get("metrics", {}).items():  # the trial's final validation k-NN
            self.client.log_metric(entry["run_id"], f"final/val_{k}", v)
        self.client.set_terminated(entry["run_id"], status=status)
        entry["status"], entry["fate"] = status, fate
        self._save(runs)


# ------------------------------------------------------------------ the sweep driver


def sweep(
    cfg: SimRegConfig, space: SearchSpace, space_source: str, output_dir: Path, *, resume: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep; writes ``output_dir/sweep_summary.json`` and returns it."""
    from ray.tune.schedulers import ASHAScheduler

    from simreg.orchestrator.driver import hold_output_dir
    from simreg.orchestrator.run import init_ray, plan_placement, prepare, trial_cpus, trial_gpus

    t0 = time.perf_counter()
    output_dir = output_dir.resolve()
    tune_dir = output_dir / "tune"
    if resume and not (tune_dir / "sweep").is_dir():
        raise ConfigError(f"--resume: {output_dir} holds no sweep to resume (no tune/sweep folder): drop --resume or fix --output-dir")
    if not resume and (tune_dir / "sweep").is_dir():
        raise ConfigError(f"{output_dir} already holds a sweep: pass --resume to continue it, or choose another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_output_dir(output_dir)  # noqa: F841  (held until this function returns)

    # 1. the space, checked against the config; every trial must validate. A resumed sweep keeps the
    #    space and base config it started with (the trials already run used them).
    if resume:
        space = SearchSpace.model_validate_json((output_dir / "space.json").read_text())
        base_tree = json.loads((output_dir / "base_config.json").read_text())
        log.info("resuming the sweep in %s with its original space and base config", output_dir)
    else:
        base_tree = check_space(space, json.loads(cfg.model_dump_json()), space_source)
    keys = list(space.params)
    base_cfg = trial_config(base_tree, {})
    epochs = base_cfg.train.epochs
    if base_cfg.eval.val_every != 1 and space.search.metric.startswith("val/"):
        raise ConfigError("sweeps report the validation k-NN every epoch: set eval.val_every=1")
    (output_dir / "space.json").write_text(space.model_dump_json(indent=2))
    (output_dir / "base_config.json").write_text(json.dumps(base_tree, indent=2))

    # 2. data and teachers once in the driver: a bad path fails here, not in every trial
    prepare(base_cfg)

    # 3. Ray, concurrency from the cluster's resources
    cluster = init_ray(base_cfg)
    placement = plan_placement(base_cfg, cluster)
    per_trial = trial_cpus(base_cfg, placement) + 0.01
    fit_cpu = max(1, math.floor(cluster.get("CPU", 1.0) / per_trial))
    gpu_per_trial = trial_gpus(base_cfg, placement)
    fit_gpu = math.floor(cluster.get("GPU", 0.0) / gpu_per_trial) if gpu_per_trial else fit_cpu
    concurrent = space.search.max_concurrent_trials or max(1, min(fit_cpu, fit_gpu))
    log.info("sweep: %d param(s) %s, %s search, %d concurrent trial(s) (%.2f CPUs each)", len(keys), keys,
             space.search.algorithm, concurrent, per_trial)

    # 4. MLflow parent run (reused on resume)
    parent = Tracker(
        tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri(output_dir), cfg.tracking.experiment,
        output_dir, f"sweep-{cfg.name}", {"simreg.command": "sweep", "simreg.output_dir": str(output_dir)},
    )
    parent.log_params({f"space.{k}": json.dumps(d.model_dump(exclude_none=True)) for k, d in space.params.items()}
                      | {f"search.{k}": v for k, v in space.search.model_dump().items()})
    runs_file = output_dir / CHILD_RUNS_FILE
    children = MlflowTrialsCallback(parent.tracking_uri, parent.run_id, base_tree, keys, epochs, str(runs_file))

    # 5. Tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base_tree, keys=keys, storage=str(output_dir / "trials")), {"CPU": 0.01}
    )
    scheduler = None
    if space.search.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=space.search.grace_period,
                                  reduction_factor=space.search.reduction_factor)
    search_alg = None
    if space.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.seed)
    # Save Tune's experiment state at most every second (default: adaptive, >= 10 s), so a sweep killed
    # right after a trial ends does not restart that trial on --resume (its Train run would restore the
    # final checkpoint and train no further, but would still pay a start-up).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    status = "FAILED"
    try:
        if resume:
            tuner = tune.Tuner.restore(str(tune_dir / "sweep"), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=tune_param_space(space),
                tune_config=tune.TuneConfig(
                    metric=space.search.metric, mode=space.search.mode, num_samples=space.search.num_samples,
                    scheduler=scheduler, search_alg=search_alg, max_concurrent_trials=concurrent,
                ),
                run_config=tune.RunConfig(
                    name="sweep", storage_path=str(tune_dir), callbacks=[children],
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        tuner.fit()  # on --resume, Tune restores the pickled callback above: same runs file, same parent
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (the CLI turns it into KeyboardInterrupt)
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            parent.end(status)

    # 6. comparison, plots, summary
    from simreg.orchestrator.compare import comparison_rows, write_comparison

    rows = comparison_rows(json.loads(runs_file.read_text()) if runs_file.is_file() else {}, space.search.metric, space.search.mode)
    artifacts = write_comparison(rows, keys, space.search.metric, output_dir, parent)
    best = rows[0] if rows else None
    summary = {
        "parent_run_id": parent.run_id,
        "mlflow_tracking_uri": redact_uri(parent.tracking_uri),
        "space": space_source,
        "metric": space.search.metric,
        "mode": space.search.mode,
        "best_trial": best,
        "trials": rows,
        "artifacts": artifacts,
        "wall_s": time.perf_counter() - t0,
        "output_dir": str(output_dir),
    }
    (output_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2))
    parent.log_artifact(output_dir / "sweep_summary.json")
    if best is not None:
        parent.client.log_metric(parent.run_id, f"best/{space.search.metric}", best["metrics"].get("top1_20nn", float("nan")))
    parent.end("FINISHED")
    if not rows:
        raise SimRegError(f"the sweep in {output_dir} finished no trial: see the Ray log above")
    return summary
