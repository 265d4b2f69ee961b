"""What a run prints: simreg's own lines, one progress bar per epoch on a terminal (redrawn in place), one
line per epoch in a log file; Ray's own lines only with ``--verbose`` (they always reach Ray's log files
under ``/tmp/ray/session_latest/logs``)."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

_VERBOSE = False


def setup(verbose: bool = False) -> None:
    """Logging for the ``simreg`` command: ``HH:MM:SS simreg message`` on stderr."""
    global _VERBOSE
    _VERBOSE = verbose
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simreg %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)  # Ray Data's INFO lines, the token-auth notice of every start
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables..."
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)


def hide_native_stderr() -> Path | None:
    """Send what native code writes to this process's stderr (Ray's C++ core worker: ``core_worker.cc ...``
    lines) to a file, keeping Python's ``sys.stderr`` (logging, progress bars, errors) on the terminal.
    Only without ``--verbose``; returns the file (None when nothing was redirected)."""
    if _VERBOSE or sys.stderr is not sys.__stderr__:  # --verbose, or stderr already captured (a test, a notebook)
        return None
    try:
        sys.stderr.flush()
        keep = os.dup(2)
        folder = Path(tempfile.gettempdir()) / "simreg"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"native-stderr-{os.getpid()}.log"
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
    except OSError:
        return None
    old = sys.stderr
    sys.stderr = os.fdopen(keep, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8", errors="backslashreplace")
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is old:
            h.setStream(sys.stderr)
    return path


def verbose() -> bool:
    return _VERBOSE


def interactive() -> bool:
    """A terminal on stderr: progress bars are redrawn in place; otherwise (a file, a pipe) one line per epoch."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
