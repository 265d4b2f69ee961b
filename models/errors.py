"""User-facing error hierarchy. Every message names the bad input and says how to fix it."""
from __future__ import annotations


class SimRegError(Exception):
    """Base class: the CLI prints the message (no traceback). Raised as is, a run that could not go on (a diverged
    loss, a checkpoint that cannot be read): exit status 1. The subclasses below are bad input: exit status 2."""

    exit_code = 1


class ConfigError(SimRegError):
    """A configuration file, key or value is invalid."""

    exit_code = 2


class DataError(SimRegError):
    """A data source is missing, empty or unreadable."""

    exit_code = 2


class ModelError(SimRegError):
    """A model architecture cannot be built (unknown timm name, bad head design)."""

    exit_code = 2


class TeacherLoadError(SimRegError):
    """A teacher checkpoint cannot be read or does not match its architecture."""

    exit_code = 2


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line for a one-line message (a service's error can run to many lines), or its
    type's name when it has no text."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
