"""What a run prints. The ``simreg`` command: simreg's own lines, one progress bar per epoch on a terminal
(redrawn in place), one line per epoch in a log file; Ray's own lines only with ``--verbose`` (those of
Ray's processes always reach Ray's log files under ``/tmp/ray/session_latest/logs``). The Python API, unless
a caller asks for quiet (``setup(verbose=False)``), leaves Ray's output as Ray prints it."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

_VERBOSE: bool | None = None  # None: not set by the command line (the Python API): Ray's own output shown
_NATIVE: Path | None = None


def setup(verbose: bool = False) -> None:
    """Logging for the ``simreg`` command: ``HH:MM:SS simreg message`` on stderr."""
    global _VERBOSE
    _VERBOSE = verbose
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simreg %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables..."
        # "Found credentials in environment variables."; the ONNX exporter's passes; a request line per Hub fetch
        for name in ("botocore", "boto3", "s3transfer", "urllib3", "onnxscript", "onnx_ir", "httpx", "httpx2", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.WARNING)
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)


def verbose() -> bool:
    """Whether Ray's own output reaches this console (``--verbose``, or the Python API)."""
    return _VERBOSE is not False


def ray_logging_level() -> int:
    """The driver's Ray log level: Ray Data's INFO lines and the token-auth notice of every start hidden
    unless verbose (``ray.init`` sets this level after ``import ray`` reset it)."""
    return logging.WARNING if verbose() else logging.ERROR


def interactive() -> bool:
    """A terminal on stderr: progress bars are redrawn in place; otherwise (a file, a pipe) one line per epoch."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def hide_native_stderr() -> Path | None:
    """Send what native code writes to this process's stderr (Ray's C++ core worker: ``core_worker.cc ...``
    lines; a native crash) to a file, keeping Python's ``sys.stderr`` (logging, progress bars, tracebacks)
    on the terminal. Only without ``--verbose`` and when stderr is the process's own; ``native_output()``
    names the file, which ``forget_native_output()`` removes (a failed run keeps it and says where)."""
    global _NATIVE
    if verbose() or sys.stderr is not sys.__stderr__:  # --verbose, or stderr already captured (a test, a notebook)
        return None
    try:
        folder = Path(tempfile.gettempdir()) / f"simreg-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.is_symlink() or folder.stat().st_uid != os.getuid():
            return None
        path = folder / f"native-stderr-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        if sys.stderr is not None:
            sys.stderr.flush()
        keep = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        return None
    old = sys.stderr
    sys.stderr = os.fdopen(keep, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8", errors="backslashreplace")
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is old:
            h.setStream(sys.stderr)
    _NATIVE = path
    return path


def native_output() -> Path | None:
    """The file holding this process's native stderr, when it holds anything."""
    try:
        return _NATIVE if _NATIVE is not None and _NATIVE.stat().st_size > 0 else None
    except OSError:
        return None


def forget_native_output(keep: bool = False) -> None:
    """Remove the native-stderr file (kept with ``keep`` when it holds anything: a failed run's)."""
    if _NATIVE is not None and not (keep and native_output() is not None):
        _NATIVE.unlink(missing_ok=True)
