"""What the ``simreg`` command prints when a command fails: one line on stderr and an exit status.

    2    bad input: a config, an argument, data or a file the user pointed to (``ConfigError``, ``DataError``, ...)
    1    a failure: a service down, a full disk, a training that failed, an internal error
    130  interrupted (Ctrl-C, SIGTERM)

Errors raised inside Ray arrive wrapped (Ray Train's ``TrainingFailedError`` holding each worker's error,
``RayTaskError``, Tune's errors): the chain is unwrapped and the original error's line printed. ``--debug``
prints the full traceback before that line.
"""
from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Iterator
from typing import Any

from simreg.models.errors import SimRegError, first_line
from simreg.orchestrator.tracking.redact import redact_text

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DEBUG_HINT = "rerun with --debug for the traceback"
RAY_LOGS = "/tmp/ray/session_latest/logs"

# a full disk, a broken device, a service that does not answer: failures, not bad input
_FAILURE_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOMEM,
}
# MLflow error codes that mean the request itself was wrong (a bad URI, run id or credentials)
_MLFLOW_BAD_INPUT = {
    "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "RESOURCE_DOES_NOT_EXIST", "UNAUTHENTICATED",
    "PERMISSION_DENIED", "ENDPOINT_NOT_FOUND",
}


def _inner(e: BaseException) -> list[BaseException]:
    """The exceptions ``e`` wraps: its ``__cause__`` and what Ray's wrappers carry (``RayTaskError.cause``, Ray
    Train's ``WorkerGroupError.worker_failures`` by rank, ``ControllerError.controller_failure``, a worker's
    ``UserExceptionWithTraceback``, a failed health check)."""
    out: list[BaseException] = []
    for attr in ("cause", "_base_exc", "controller_failure", "health_check_failure"):
        try:
            v = getattr(e, attr, None)
        except Exception:  # noqa: BLE001  (a wrapper's __getattr__ that forwards and fails)
            v = None
        if isinstance(v, BaseException):
            out.append(v)
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict):
        out += [failures[k] for k in sorted(failures, key=str) if isinstance(failures[k], BaseException)]
    if e.__cause__ is not None:
        out.append(e.__cause__)
    return out


def chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and everything it wraps, outermost first (breadth first, each once)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += _inner(x)


def _is_ray_wrapper(e: BaseException) -> bool:
    """An exception of Ray's own that wraps another (Ray's exception classes are imported only where Ray was)."""
    exc = sys.modules.get("ray.exceptions")
    if exc is not None and isinstance(e, exc.RayTaskError):  # RayTaskError(SimRegError) is also a SimRegError
        return True
    return type(e).__module__.startswith("ray.") and bool(_inner(e))


def _mlflow_exception() -> type[BaseException] | None:
    mod = sys.modules.get("mlflow.exceptions")
    return getattr(mod, "MlflowException", None)


def original(e: BaseException) -> BaseException:
    """The error to report for ``e``: the first ``SimRegError`` in its chain, else the first MLflow or OS error,
    else the innermost exception (what a Ray worker raised)."""
    found = [x for x in chain(e) if not _is_ray_wrapper(x)]
    kinds: tuple[type[BaseException], ...] = (OSError, UnicodeDecodeError)
    mlflow_exc = _mlflow_exception()
    if mlflow_exc is not None:
        kinds = (mlflow_exc, *kinds)
    for want in ((SimRegError,), kinds):
        for x in found:
            if isinstance(x, want):
                return x
    leaf = e
    while inner := _inner(leaf):
        leaf = inner[0]
    return leaf


_NETWORK_WORDS = ("NETWORK_CONNECTION", "Couldn't connect", "Connection refused", "timed out", "SERVICE_UNAVAILABLE",
                  "SLOW_DOWN", "INTERNAL_FAILURE")


def os_error(e: OSError, what: str = "") -> tuple[int, str]:
    """(exit status, line) for a file or store that cannot be read or written. A full disk or a service that does
    not answer is a failure (1); a path or URI the user gave (missing, a file for a folder, no permission) is bad
    input (2)."""
    where = f"{what}: " if what else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        name = f" writing {e.filename}" if e.filename else ""
        return EXIT_FAILURE, f"{where}no space left on the device{name}: free some space or write elsewhere"
    # pyarrow's S3 client raises plain OSErrors (no errno) that name the AWS error: a network one is a service down
    unreachable = e.errno is None and any(w in str(e) for w in _NETWORK_WORDS)
    if e.errno in _FAILURE_ERRNOS or isinstance(e, (TimeoutError, ConnectionError)) or unreachable:
        return EXIT_FAILURE, f"{where}{first_line(e, 500)}: check that the service or device is up, then rerun"
    return EXIT_BAD_INPUT, (f"{where}{first_line(e, 500)} (check the path or URI, AWS_ENDPOINT_URL and the credentials; "
                            "--verbose for Ray's own lines)")


def _mlflow_error(e: BaseException, tracking_uri: str | None) -> tuple[int, str]:
    code = str(getattr(e, "error_code", "") or "")
    uri = tracking_uri or "the run folder's sqlite store (no --tracking-uri given)"
    status = EXIT_BAD_INPUT if code in _MLFLOW_BAD_INPUT else EXIT_FAILURE
    return status, (f"MLflow tracking at {uri} failed ({code or type(e).__name__}: {first_line(e, 400)}): check that the "
                    "server runs and answers there (mlflow server --host HOST --port PORT), or fix --tracking-uri / "
                    "tracking.tracking_uri")


def describe(e: BaseException, tracking_uri: str | None = None) -> tuple[int, str]:
    """(exit status, the one line to print) for an exception a command raised; the line is redacted."""
    err = original(e)
    wrapped = err is not e and any(_is_ray_wrapper(x) for x in chain(e))
    mlflow_exc = _mlflow_exception()
    if isinstance(err, SimRegError):
        status, line = err.exit_code, f"error: {err}"
    elif mlflow_exc is not None and isinstance(err, mlflow_exc):
        status, line = _mlflow_error(err, tracking_uri)
        line = f"error: {line}"
    elif isinstance(err, OSError):
        status, line = os_error(err)
        line = f"error: {line}"
    elif isinstance(err, UnicodeDecodeError):
        status, line = EXIT_BAD_INPUT, f"error: a file is not UTF-8 text ({err}): save it as UTF-8"
    elif wrapped:
        status = EXIT_FAILURE
        line = (f"error: training failed in Ray: {type(err).__name__}: {first_line(err, 400)} "
                f"({DEBUG_HINT}; Ray's logs are in {RAY_LOGS})")
    else:
        status = EXIT_FAILURE
        line = f"internal error: {type(err).__name__}: {first_line(err, 400)} ({DEBUG_HINT})"
    return status, redact_text(f"simreg: {line}")


def report(e: BaseException, *, debug: bool = False, tracking_uri: str | None = None, file: Any = None) -> int:
    """Print ``e`` as one line (with ``debug``: its full traceback first) and return the exit status."""
    out = file or sys.stderr
    status, line = describe(e, tracking_uri)
    if debug:
        out.write(redact_text("".join(traceback.format_exception(type(e), e, e.__traceback__))))
    print(line, file=out)
    return status
