"""The ``simreg`` command: a thin layer over the Python API (orchestrator/api.py) and the data, cache and eval tools.

    simreg distill                                     # offline demo: Fashion-MNIST, SimCLR ResNet-10t -> resnet10t
    simreg distill --config configs/demo.yaml train.epochs=2 scaling.num_workers=1
    simreg distill --output-dir runs/mine --tracking-uri http://127.0.0.1:5000
    simreg sweep --space smoke --output-dir runs/smoke     # Ray Tune over the search space's keys
    simreg sweep --space smoke --output-dir runs/smoke --resume
    simreg compare runs/smoke                             # the trials, best first
    simreg export runs/demo --format onnx                  # the student as ONNX, checked against PyTorch
    simreg doctor --output-dir s3://bucket/runs/x --tracking-uri http://mlflow:5000   # everything a run needs, one row each
    simreg cache warm --config my.yaml                    # teacher targets computed once, before a sweep
    simreg cache info [--scan] | simreg cache clear [--key PREFIX]
    simreg data scan ~/images                              # corrupt, truncated, unreadable files; modes; empty classes
    simreg data pack ~/images ~/packs/images [--strict]    # Parquet shards + manifest.json, bad files left out
    simreg distill data.source=packed data.root=~/packs/images
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from simreg.models.errors import ConfigError
from simreg.orchestrator import console, fence
from simreg.orchestrator.cli.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, os_error, report


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line naming the command's help (its usage lines left out)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {n})")
        return n

    return parse


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return x


class _Version(argparse.Action):
    """``simreg --version``: the package and what it runs on, from the installed metadata (nothing imported)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        print(version_line())
        parser.exit()


def version_line() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{n} {v(n)}" for n in ("torch", "torchvision", "timm", "ray", "mlflow", "pyarrow"))
    return f"simreg {v('simreg')} ({deps}; Python {platform.python_version()})"


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)  # --debug after any command too, without resetting a global one
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, print the full traceback, not only its one line")
    p = _Parser(prog="simreg", description="SimReg distillation of frozen SSL teachers on Ray")
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback, not only its one line")
    p.add_argument("--version", action=_Version, help="print simreg's version and those of the packages it runs on")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", parents=[common], help="distill teacher(s) into a student; writes OUTPUT_DIR/summary.json")
    d.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in offline demo)")
    d.add_argument("--output-dir", default=None, help="run folder or object-store URI, e.g. s3://bucket/runs/x (default: runs/<name>-<time>)")
    d.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the run folder)")
    d.add_argument("--verbose", action="store_true", help="also show Ray's own log lines (always in Ray's log files)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. heads.depth=2")
    sw = sub.add_parser("sweep", parents=[common], help="Ray Tune sweep over a search space; writes OUTPUT_DIR/sweep_summary.json")
    sw.add_argument("--config", type=Path, default=None, help="base YAML config (default: the offline demo)")
    sw.add_argument("--space", required=True, help="a shipped space name (smoke, head_design, augmentation) or a YAML file")
    sw.add_argument("--output-dir", default=None, help="sweep folder or object-store URI (default: runs/sweep-<space>-<time>)")
    sw.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output-dir")
    sw.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the sweep folder)")
    sw.add_argument("--verbose", action="store_true", help="also show Ray's and Tune's own output (always in Ray's log files)")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config")
    ex = sub.add_parser("export", parents=[common], help="export a run's student to ONNX, checked against PyTorch first")
    ex.add_argument("target", help="a run folder, its student/ folder or a student.safetensors file (with its student.json beside it)")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--output", default=None, help="the ONNX file (default: student.onnx beside the safetensors file)")
    dr = sub.add_parser("doctor", parents=[common], help="check everything a run needs (versions, cluster, folders, tracking, "
                        "teachers, data), one row each; exit 1 when a check fails")
    dr.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in offline demo)")
    dr.add_argument("--output-dir", default=None, help="the run folder or object-store URI the run would use (default: runs)")
    dr.add_argument("--tracking-uri", default=None, help="the MLflow tracking URI the run would use")
    dr.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for distill")
    cp = sub.add_parser("compare", parents=[common], help="print a sweep's comparison table, best first")
    cp.add_argument("target", help="a sweep's output folder, or a parent MLflow run id (with --tracking-uri)")
    cp.add_argument("--tracking-uri", default=None)
    ev = sub.add_parser("eval", parents=[common], help="k-NN (and linear probe) of a backbone weights file; no Ray")
    ev.add_argument("--weights", required=True, help="safetensors or torch state dict of a timm backbone (a path or an object-store URI), "
                    "or random[:SEED]: the arch randomly initialised")
    ev.add_argument("--arch", required=True, help="timm architecture of the weights")
    ev.add_argument("--format", default="auto", choices=["auto", "plain", "moco", "mocov3", "swav", "dino"],
                    help="checkpoint layout (auto: detected)")
    ev.add_argument("--data", default="fashion-mnist", help="fashion-mnist, a folder of its four IDX files, a pack (simreg data pack) or an ImageFolder directory")
    ev.add_argument("--input-size", type=_at_least(1), default=64, help="model input resolution (the demo student: 32)")
    ev.add_argument("--mean", type=float, nargs="+", default=[0.2860], help="per-channel mean (1 or 3 values)")
    ev.add_argument("--std", type=float, nargs="+", default=[0.3530], help="per-channel std (1 or 3 values)")
    ev.add_argument("--bank-size", type=_at_least(1), default=None, help="train-split images in the k-NN bank (default all)")
    ev.add_argument("--query-size", type=_at_least(1), default=None, help="held-out images queried (default all)")
    ev.add_argument("--linear", action="store_true", help="also run the paper's linear probe")
    ev.add_argument("--linear-epochs", type=_at_least(1), default=40)
    ev.add_argument("--linear-steps", type=_at_least(1), nargs="*", default=[15, 30], help="epochs at which the probe's LR drops 10x")
    ev.add_argument("--knn-weighting", default="majority", choices=["majority", "temperature"],
                    help="majority vote (the paper's) or exp(sim / T) weighted votes")
    ev.add_argument("--knn-temperature", type=_positive_float, default=0.07)
    ev.add_argument("--model-kwargs", default="{}", help="extra timm.create_model arguments as YAML, e.g. '{img_size: 224}'")
    ev.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    ca = sub.add_parser("cache", parents=[common], help="the teacher-target cache: info | warm | clear")
    cas = ca.add_subparsers(dest="action", required=True)
    dir_help = "cache folder (default: $SIMREG_CACHE_DIR or ~/.cache/simreg/targets)"
    ci = cas.add_parser("info", parents=[common], help="list cached keys: teacher, views, rows, size")
    ci.add_argument("--dir", default=None, help=dir_help)
    ci.add_argument("--scan", action="store_true", help="count rows by listing every bucket (a progress bar) instead of the writers' records")
    cw = cas.add_parser("warm", parents=[common], help="compute a config's teacher targets once, in this process (no Ray)")
    cw.add_argument("--dir", default=None, help=dir_help + "; overrides cache.dir")
    cw.add_argument("--config", type=Path, default=None, help="the run's YAML config (default: the offline demo)")
    cw.add_argument("--epochs", type=_at_least(1), default=None, help="view indices of this many epochs (default train.epochs)")
    cw.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    cc = cas.add_parser("clear", parents=[common], help="remove cached keys (all, or those given by --key)")
    cc.add_argument("--dir", default=None, help=dir_help)
    cc.add_argument("--key", action="append", default=None, help="a key (unique prefix) to remove; repeatable")
    da = sub.add_parser("data", parents=[common], help="your own images: scan an ImageFolder tree | pack it into Parquet shards")
    das = da.add_subparsers(dest="action", required=True)
    workers_help = "threads reading and decoding (default: CPU count, at most 8)"
    ds = das.add_parser("scan", parents=[common], help="decode every image once; count corrupt, truncated, unreadable files, modes, "
                        "empty class folders (exit 1 when a file is bad or a split holds no image)")
    ds.add_argument("folder", type=Path, metavar="IMAGE_FOLDER", help="ROOT/<class>/<image>, or ROOT/train + ROOT/val (or test)")
    ds.add_argument("--workers", type=_at_least(1), default=None, help=workers_help)
    dp = das.add_parser("pack", parents=[common], help="pre-scan, then write OUT_DIR/<split>/part-*.parquet and OUT_DIR/manifest.json")
    dp.add_argument("folder", type=Path, metavar="IMAGE_FOLDER", help="ROOT/<class>/<image>, or ROOT/train + ROOT/val (or test)")
    dp.add_argument("out", metavar="OUT_DIR", help="a new or empty folder (outside IMAGE_FOLDER), or an object-store URI (s3://bucket/prefix)")
    dp.add_argument("--strict", action="store_true", help="fail, naming the bad files the pre-scan finds, instead of leaving them out")
    dp.add_argument("--shard-rows", type=_at_least(1), default=1024, help="rows per Parquet shard (default 1024)")
    dp.add_argument("--overwrite", action="store_true", help="replace the pack in a non-empty OUT_DIR")
    dp.add_argument("--workers", type=_at_least(1), default=None, help=workers_help)
    sh = sub.add_parser("config", parents=[common], help="print the resolved config as YAML (defaults <- file <- overrides)")
    sh.add_argument("--config", type=Path, default=None)
    sh.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _yaml_mapping(raw: str, flag: str) -> dict[str, Any]:
    import yaml

    try:
        val = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag}={raw!r} is not YAML: write e.g. '{{img_size: 224}}' ({e})") from None
    if not isinstance(val, dict):
        raise ConfigError(f"{flag}={raw!r} must be a mapping, e.g. '{{img_size: 224}}'")
    return val


def _data(args: argparse.Namespace) -> int:
    from simreg.orchestrator.data.pack.scan import scan_image_folder
    from simreg.orchestrator.data.pack.write import manifest_summary, pack_image_folder

    if args.action == "scan":
        report = scan_image_folder(args.folder, workers=args.workers)
        print(report.table())
        return 0 if report.clean else 1
    manifest = pack_image_folder(args.folder, args.out, strict=args.strict, shard_rows=args.shard_rows,
                                 overwrite=args.overwrite, workers=args.workers, on_scan=lambda r: print(r.table() + "\n"))
    print(manifest_summary(manifest, args.out))
    print(f"\nuse it: simreg distill data.source=packed data.root={args.out}")
    return 0


def _cache_line(summary: dict[str, Any], cache_dir: str | None) -> str:
    """What the target cache saved in this run: teacher forwards computed against targets read from it."""
    from simreg.orchestrator.cache.targets import default_cache_dir
    from simreg.orchestrator.storage import open_store

    rows = summary.get("teacher_rows", {})
    computed, cached = sum(r["forward"] for r in rows.values()), sum(r["cached"] for r in rows.values())
    total = computed + cached
    share = f" ({100 * cached / total:.0f}% of {total:,} teacher targets)" if total else ""
    where = open_store(cache_dir or default_cache_dir())
    return (f"\ntarget cache: {cached:,} targets read from the cache{share}, {computed:,} computed by the teacher; "
            f"a rerun of this config computes none ({where})")


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            rc = _main(argv)
        except KeyboardInterrupt:  # a stop that landed while an error was being reported
            stop = fence.decided()
            rc = stop.exit_code if stop is not None else EXIT_INTERRUPTED
            print(f"simreg: {stop.reason}" if stop is not None and rc != EXIT_INTERRUPTED else "simreg: interrupted", file=sys.stderr)
    except BaseException:
        rc = 1
        raise
    finally:
        native = console.native_output()
        if native is not None and rc != 0:
            print(f"simreg: native output of this run (Ray's C++ lines, a crash): {native}", file=sys.stderr)
        console.forget_native_output(keep=rc != 0)
    return rc


def _main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may sit anywhere among the options (argparse takes positionals in one run only)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    console.setup(verbose=getattr(args, "verbose", False))
    if args.command in ("distill", "sweep"):
        fence.install_signal_handlers()  # Ctrl-C and SIGTERM stop the driver: exit 130, its runs KILLED
        console.hide_native_stderr()  # Ray's C++ lines; Python's stderr stays on the terminal
    try:
        return _run(args)
    except fence.Stopped as e:  # a signal (130), a lost folder lease (1): never 0
        print(f"simreg: {e.reason}" if e.exit_code != EXIT_INTERRUPTED else "simreg: interrupted", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ray may raise its own in place of ours: the decision says why
        stop = fence.decided()
        if stop is not None and stop.exit_code != EXIT_INTERRUPTED:
            print(f"simreg: {stop.reason}", file=sys.stderr)
            return stop.exit_code
        print("simreg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # one line (the full traceback with --debug), exit status 2 for bad input, 1 for a failure
        uri = getattr(args, "tracking_uri", None) or getattr(args, "tracking_uri_in_use", None)
        return report(e, debug=args.debug, tracking_uri=uri)


def _check_output_dir(value: str | None) -> None:
    """A local --output-dir must be a folder or a path that can become one (not a file, nor below one)."""
    if value is None or "://" in value:
        return
    p = Path(value).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "is a file" if q == p else f"lies below the file {str(q)!r}"
                raise ConfigError(f"--output-dir {value!r} {what}: pass a folder (a new one, or the run folder to resume)")
            return


def _eval(args: argparse.Namespace) -> int:
    """``simreg eval``: the result is printed first, so a failed --output write loses nothing."""
    from simreg.orchestrator.evaluation.weights import evaluate_weights, write_json

    for flag, vals in (("--mean", args.mean), ("--std", args.std)):
        if len(vals) not in (1, 3):
            raise ConfigError(f"{flag} takes 1 or 3 values (got {len(vals)})")
    if args.output is not None and args.output.is_dir():
        raise ConfigError(f"--output {str(args.output)!r} is a folder: name a JSON file to write, e.g. {args.output / 'eval.json'}")
    res = evaluate_weights(
        args.weights, args.arch, data=args.data, input_size=args.input_size, mean=tuple(args.mean),
        std=tuple(args.std), bank_size=args.bank_size, query_size=args.query_size, linear=args.linear,
        linear_epochs=args.linear_epochs, linear_steps=tuple(args.linear_steps), layout=args.format,
        knn_weighting=args.knn_weighting, knn_temperature=args.knn_temperature,
        model_kwargs=_yaml_mapping(args.model_kwargs, "--model-kwargs"),
    )
    print(json.dumps(res, indent=2), flush=True)
    try:
        write_json(res, args.output)
    except OSError as e:
        if args.debug:
            traceback.print_exc()
        status, line = os_error(e, f"cannot write --output {str(args.output)!r}")
        print(f"simreg: error: {line} (the result is printed above)", file=sys.stderr)
        return status
    return 0


def _run(args: argparse.Namespace) -> int:
    """The command, by name; its errors are the caller's to print."""
    if args.command == "compare":
        from simreg.orchestrator.tune.compare import compare

        print(compare(args.target, args.tracking_uri))
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "export":
        from simreg.orchestrator.evaluation.onnx_export import export_onnx

        r = export_onnx(args.target, args.output)
        print(f"{r['onnx']}: ONNX opset {r['opset']}, input (batch, 3, {r['input'][2]}, {r['input'][3]}); matches PyTorch within "
              f"{r['parity_max_abs_diff']:.1e} on {r['parity_inputs']} random inputs")
        return 0
    if args.command == "cache" and args.action != "warm":
        from simreg.orchestrator.cache.admin import cache_entries, clear_cache, entries_table
        from simreg.orchestrator.cache.targets import default_cache_dir
        from simreg.orchestrator.console import interactive
        from simreg.orchestrator.storage import open_store

        root = open_store(args.dir or default_cache_dir())  # a local folder or an object-store URI
        if args.action == "info":
            rows = cache_entries(root, scan=args.scan, progress=interactive())
            print(f"target cache {root}: {len(rows)} key(s), {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB")
            if rows:
                print(entries_table(rows))
            return 0
        gone = clear_cache(root, args.key)
        print(f"removed {len(gone)} key(s) from {root}" + (f": {', '.join(gone)}" if gone else ""))
        return 0
    if args.command == "data":
        return _data(args)
    from simreg.orchestrator.config import load_config

    if args.command in ("distill", "sweep"):
        _check_output_dir(args.output_dir)
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "tracking_uri", None) is None:  # the URI an MLflow error names
        args.tracking_uri_in_use = cfg.tracking.tracking_uri
    if args.command == "doctor":
        from simreg.orchestrator.cli.doctor import run_checks, table

        rows = run_checks(cfg, args.output_dir, args.tracking_uri)
        print(table(rows))
        return 0 if all(r.ok for r in rows) else 1
    if args.command == "cache":  # warm: the run's config decides teachers, data and views
        from simreg.orchestrator.cache.warm import warm_cache

        cfg = load_config(args.config, [*args.overrides, "cache.enabled=true", *([f"cache.dir={args.dir}"] if args.dir else [])])
        print(json.dumps(warm_cache(cfg, args.epochs), indent=2))
        return 0
    if args.command == "sweep":
        from simreg.orchestrator.tune.sweep import sweep
        from simreg.search_spaces import load_space

        space, source = load_space(args.space)
        if args.resume and args.output_dir is None:
            raise ConfigError("--resume needs --output-dir of the sweep to continue")
        out = args.output_dir or Path("runs") / f"sweep-{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = sweep(cfg, space, source, out, resume=args.resume, tracking_uri=args.tracking_uri, command_line=args.overrides)
        from simreg.orchestrator.tune.compare import markdown, table_lines

        print(markdown(table_lines(summary["trials"], list(space.params))))
        print(f"\nsweep summary: {summary['output_dir']}/sweep_summary.json\n"
              f"mlflow: {_mlflow_hint(summary['mlflow_tracking_uri'], summary['parent_run_id'])}")
        return 0
    if args.command == "config":
        import yaml

        from simreg.orchestrator.tracking.redact import redact_tree

        print(yaml.safe_dump(redact_tree(json.loads(cfg.model_dump_json())), sort_keys=False))  # secrets masked, as everywhere
        return 0
    from simreg.orchestrator.api import distill
    from simreg.orchestrator.evaluation.final import knn_table

    out = args.output_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = distill(cfg, out, args.tracking_uri)
    print(knn_table(summary))
    if cfg.cache.enabled:
        print(_cache_line(summary, cfg.cache.dir))
    print(
        f"\nstudent 20-NN gain over random init: {summary['student_gain_20nn']:+.2f} points; "
        f"{summary['train_images_per_s']:.0f} train images/s; wall {summary['wall_s']:.0f} s\n"
        f"summary: {summary['output_dir']}/summary.json\nstudent: {summary['student_weights']}\n"
        f"mlflow:  {_mlflow_hint(summary['mlflow_tracking_uri'], summary['mlflow_run_id'])}"
    )
    return 0


def _mlflow_hint(uri: str, run_id: str) -> str:
    """How to look at a run: the server's address, or the command that serves a run folder's sqlite store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri} (run {run_id})"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"


if __name__ == "__main__":
    sys.exit(main())
