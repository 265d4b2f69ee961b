"""The ``simreg`` command: a thin layer over ``distill(cfg)``.

    simreg distill                                     # offline demo: Fashion-MNIST, SimCLR ResNet-50 -> resnet10t
    simreg distill --config configs/demo.yaml train.epochs=2 scaling.num_workers=1
    simreg distill --output-dir runs/mine --tracking-uri http://127.0.0.1:5000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from simreg.models.errors import SimRegError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simreg", description="SimReg distillation of frozen SSL teachers on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="distill teacher(s) into a student; writes OUTPUT_DIR/summary.json")
    d.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in offline demo)")
    d.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/<name>-<time>)")
    d.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the run folder)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. heads.depth=2")
    sh = sub.add_parser("config", help="print the resolved config as YAML (defaults <- file <- overrides)")
    sh.add_argument("--config", type=Path, default=None)
    sh.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simreg %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        from simreg.orchestrator.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
            return 0
        from simreg.orchestrator.driver import distill, knn_table

        out = args.output_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = distill(cfg, out, args.tracking_uri)
        print(knn_table(summary))
        print(
            f"\nstudent 20-NN gain over random init: {summary['student_gain_20nn']:+.2f} points; "
            f"{summary['train_images_per_s']:.0f} train images/s; wall {summary['wall_s']:.0f} s\n"
            f"summary: {Path(summary['output_dir']) / 'summary.json'}\nstudent: {summary['student_weights']}\n"
            f"mlflow:  mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']} --host 127.0.0.1"
        )
        return 0
    except SimRegError as e:
        print(f"simreg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simreg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
