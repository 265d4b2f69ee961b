"""Secrets kept out of what the project prints, logs and writes: credentials in URIs, secret-looking query
parameters and params. ``redact_text`` is the one masking function: messages, files, MLflow params and log
records all go through it.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any

SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)
MASK = "***"

# scheme://AUTHORITY: the authority runs to the first "/" (or whitespace, a quote, a bracket); its userinfo is
# everything before its LAST "@", so an unencoded "@" in a password stays inside the masked part.
_URI_AUTHORITY = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/\s'\"<>\\]*)")
# Azure's abfs[s]/wasb[s]://CONTAINER@ACCOUNT...: a container name, not a credential
_CONTAINER_SCHEMES = ("abfs://", "abfss://", "wasb://", "wasbs://")
# ?token=... &X-Amz-Signature=... (presigned URLs, tokens passed as query parameters)
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:[A-Za-z0-9_.-]*(?:token|password|passwd|secret|signature|credential|api[_-]?key)[A-Za-z0-9_.-]*|"
    r"sig|key|code))=(?P<value>[^&\s'\"<>#]+)",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(r"(?P<kind>\bBearer|\bAuthorization:\s*Basic)\s+(?P<value>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)


def _mask_authority(m: re.Match[str]) -> str:
    scheme, authority = m.group("scheme"), m.group("authority")
    at = authority.rfind("@")
    if at < 0:
        return m.group(0)
    userinfo, host = authority[:at], authority[at + 1:]
    if ":" in userinfo:  # user:password -> user:***
        return f"{scheme}{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    if scheme.lower() in _CONTAINER_SCHEMES:
        return m.group(0)
    return f"{scheme}{MASK}@{host}"  # a token alone (https://TOKEN@host)


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URI in it masked: ``scheme://user:password@host`` ->
    ``scheme://user:***@host``, ``https://TOKEN@host`` -> ``https://***@host`` (any scheme, an ``@`` inside the
    password included), secret-looking query parameters (``?token=``, ``X-Amz-Signature=``) and
    ``Bearer TOKEN`` / ``Authorization: Basic ...`` credentials. Anything else is unchanged."""
    if "://" in text:
        text = _URI_AUTHORITY.sub(_mask_authority, text)
    if "=" in text:
        text = _SECRET_QUERY.sub(lambda m: f"{m.group('key')}={MASK}", text)
    return _AUTH_HEADER.sub(lambda m: f"{m.group('kind')} {MASK}", text)


redact_uri = redact_text  # the older name: a URI is masked as any text is


def redact_tree(obj: Any) -> Any:
    """A JSON-able tree (a config, a summary) with every string in it redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return obj


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Params safe to log: values of secret-looking keys hidden, every string value redacted."""
    return {
        k: MASK if SECRET_KEY.search(k) and v not in (None, "") else (redact_text(v) if isinstance(v, str) else v)
        for k, v in params.items()
    }


def _redacting_factory(make: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a bad format string: leave it to logging's own error report)
            return record
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:  # Formatter.format uses a set exc_text as it is
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    factory._simreg_redacts = True  # type: ignore[attr-defined]
    return factory


def _redacting_excepthook(hook: Any) -> Any:
    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        import traceback

        sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))

    excepthook._simreg_redacts = True  # type: ignore[attr-defined]
    return excepthook


def install_redaction() -> None:
    """Redact every log record of this process (message and traceback) and a traceback that ends it
    (``sys.excepthook``). Idempotent; called where a process first holds a tracking URI."""
    if not getattr(logging.getLogRecordFactory(), "_simreg_redacts", False):
        logging.setLogRecordFactory(_redacting_factory(logging.getLogRecordFactory()))
    if not getattr(sys.excepthook, "_simreg_redacts", False):
        sys.excepthook = _redacting_excepthook(sys.excepthook)
