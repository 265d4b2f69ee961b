"""User-facing error hierarchy. Every message names the bad input and says how to fix it."""
from __future__ import annotations


class SimRegError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with status 2."""


class ConfigError(SimRegError):
    """A configuration file, key or value is invalid."""


class DataError(SimRegError):
    """A data source is missing, empty or unreadable."""


class ModelError(SimRegError):
    """A model architecture cannot be built (unknown timm name, bad head design)."""


class TeacherLoadError(SimRegError):
    """A teacher checkpoint cannot be read or does not match its architecture."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line for a one-line message (a service's error can run to many lines), or its
    type's name when it has no text."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
