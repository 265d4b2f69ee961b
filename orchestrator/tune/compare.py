"""Comparison of a sweep's trials: table (CSV, Markdown, terminal), plots, and ``simreg compare``."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from simreg.models.errors import ConfigError
from simreg.orchestrator.storage import is_remote, open_store
from simreg.orchestrator.tracking.backends import backend_for, check_tracking_uri, default_tracking_uri
from simreg.orchestrator.tracking.mlflow_backend import RUN_ID_FILE
from simreg.orchestrator.tracking.redact import redact_text


def _score(row: dict[str, Any], key: str, mode: str) -> float:
    v = row.get("metrics", {}).get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return -math.inf
    return float(v) if mode == "max" else -float(v)


def comparison_rows(runs: dict[str, dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials best first by ``metric`` (``val/top1_20nn`` -> the row's ``metrics.top1_20nn``)."""
    key = metric.removeprefix("val/")
    rows = []
    for tid, e in runs.items():
        rows.append({
            "trial_id": tid,
            "params": e.get("params", {}),
            "metrics": e.get("metrics", {}),
            "status": e.get("status", "RUNNING"),
            "fate": e.get("fate", "running"),
            "epochs_run": e.get("last_epoch", -1) + 1,
            "mlflow_run_id": e.get("run_id"),
            "checkpoint": e.get("checkpoint"),
            "curve": e.get("curve", {}),
        })
    rows.sort(key=lambda r: r["trial_id"])
    return sorted(rows, key=lambda r: _score(r, key, mode), reverse=True)  # stable: ties by trial id


def table_lines(rows: list[dict[str, Any]], keys: list[str]) -> list[list[str]]:
    head = ["rank", "trial", *keys, "val 1-NN", "val 20-NN", "epochs", "status"]
    out = [head]
    for i, r in enumerate(rows, 1):
        m = r["metrics"]
        out.append([
            str(i), r["trial_id"], *[str(r["params"].get(k, "")) for k in keys],
            f"{m['top1_1nn']:.2f}" if "top1_1nn" in m else "-", f"{m['top1_20nn']:.2f}" if "top1_20nn" in m else "-",
            str(r["epochs_run"]), f"{r['status']} ({r['fate']})",
        ])
    return out


def markdown(lines: list[list[str]]) -> str:
    w = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(fmt, lines[1:])])


def _plots(rows: list[dict[str, Any]], keys: list[str], metric: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric.removeprefix("val/")
    done = [r for r in rows if key in r["metrics"]]
    paths = []
    for k in keys:
        vals = [r["params"].get(k) for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if numeric:
            xs = vals
        else:
            cats = sorted({str(v) for v in vals})
            xs = [cats.index(str(v)) for v in vals]
            ax.set_xticks(range(len(cats)), cats)
        ax.scatter(xs, [r["metrics"][key] for r in done])
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / f"{metric.replace('/', '_')}_vs_{k.replace('.', '_')}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        curve = sorted((int(e), v) for e, v in r.get("curve", {}).items())
        if curve:
            ax.plot([e + 1 for e, _ in curve], [v for _, v in curve], marker="o",
                    label=", ".join(f"{k.split('.')[-1]}={r['params'].get(k)}" for k in keys))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val/top1_20nn")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "learning_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_comparison(rows: list[dict[str, Any]], keys: list[str], metric: str, output_dir: Path, parent: Any) -> list[str]:
    """comparison.csv / comparison.md / PNG plots in DIR/comparison, logged on the parent MLflow run."""
    out = output_dir / "comparison"
    out.mkdir(exist_ok=True)
    lines = table_lines(rows, keys)
    (out / "comparison.md").write_text(markdown(lines) + "\n")
    with open(out / "comparison.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*lines[0], "mlflow_run_id", "checkpoint"])
        for line, r in zip(lines[1:], rows, strict=True):
            w.writerow([*line, r["mlflow_run_id"], r["checkpoint"] or ""])
    files = [out / "comparison.md", out / "comparison.csv", *_plots(rows, keys, metric, out)]
    for f in files:
        parent.log_artifact(f, "comparison")
    return [str(f) for f in files]


def compare(target: str, tracking_uri: str | None = None) -> str:
    """The comparison table of a sweep, best first, from its tracked runs: ``target`` is a sweep's output
    folder or a parent run id (with ``tracking_uri``)."""
    folder = open_store(target) if is_remote(target) or Path(target).is_dir() else None  # a folder or an object-store URI
    if folder is not None:
        id_file = folder / RUN_ID_FILE
        if not id_file.is_file():
            raise ConfigError(f"{target} is not a sweep folder (no {RUN_ID_FILE} file): pass the --output-dir of `simreg sweep`")
        parent_id = id_file.read_text().strip()
        tracking_uri = tracking_uri or default_tracking_uri(folder)
    else:
        if tracking_uri is None:
            raise ConfigError(f"{target!r} is not a folder; to compare a parent run id, also pass --tracking-uri")
        parent_id = target
    check_tracking_uri(tracking_uri)  # a server that is not there: one line now, not MLflow's minutes of retries
    backend = backend_for(tracking_uri)
    try:
        name, params = backend.parent_run(parent_id)
    except Exception as e:
        raise ConfigError(f"no run {parent_id!r} in {backend.uri}: check the id and --tracking-uri") from e
    keys = sorted(k.removeprefix("space.") for k in params if k.startswith("space."))
    metric = params.get("search.metric", "val/top1_20nn")
    mode = params.get("search.mode", "max")
    runs = {
        c.trial_id: {"run_id": c.run_id, "params": {k: _parse(c.params.get(k)) for k in keys}, "metrics": c.metrics,
                     "status": c.status, "fate": c.fate, "last_epoch": c.last_epoch}
        for c in backend.child_runs(parent_id)
    }
    rows = comparison_rows(runs, metric, mode)
    head = f"sweep {name} ({parent_id}), {len(rows)} trial(s), best first by {metric} ({mode})"
    return redact_text(head + "\n" + markdown(table_lines(rows, keys)))  # params hold what the user typed


def _parse(v: str | None) -> Any:
    if v is None:
        return None
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v
