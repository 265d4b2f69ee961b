"""Secrets kept out of what the project prints, logs and writes: credentials in URIs, secret-looking query
parameters, and the values of secret-named keys (params, configs, summaries). ``redact_text`` masks text
(messages, files, log records); ``redact_tree`` / ``redact`` / ``redact_json_text`` mask structures, by key
(``SECRET_KEY``) and every string in them with ``redact_text``.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

# A key names a secret when its last word is one of these: the word after the last ".", "_", "-" or camelCase
# boundary, or a two-word name ending it ("aws_secret_access_key", "apiKey"). Matching the last word only keeps
# "max_tokens", "tokens_per_s", "token_budget", "password_file" or "author" out, and matches a dotted
# flattened key ("teachers.0.model_kwargs.hf_token") as its last part. The words are case-insensitive, the
# camelCase boundary is not (so the pattern has no IGNORECASE flag, only the scoped (?i:...)).
_SECRET_WORDS = (
    r"token|secret|password|passwd|pwd|passphrase|credentials?|auth|authorization"
    r"|(?:api|access|secret|private)[_-]?key"
)
SECRET_KEY = re.compile(rf"(?:^|[._\-\s/]|(?<=[a-z0-9])(?=[A-Z]))(?i:{_SECRET_WORDS})$")
MASK = "***"

# scheme://RUN: the run is what may belong to the URI, up to whitespace, "<", ">" or a backslash. A quote ends it only
# where it closes a string (a quote followed by a separator or the end), so a quote inside a typed password
# ("u:p'w@h") stays in the run; JSON's '"uri": "...",' and Python's "('...')" still end at their quote. The
# run is read up to _RUN_MAX characters (a userinfo is far shorter): many URIs nested in one long token
# ("?next=http://...?next=http://...") then cost linear time.
_SCHEME = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://")
_RUN = re.compile(r"(?:[^\s<>\\'\"]+|['\"](?![\s,;:)\]}>]|$))*")
_RUN_MAX = 4096
# An "@" a host follows: a name, an address or an IPv6 "[...]"
_HOST_AT = re.compile(r"@(?=[A-Za-z0-9\[])")
# Azure's abfs[s]/wasb[s]://CONTAINER@ACCOUNT...: a container name, not a credential
_CONTAINER_SCHEMES = ("abfs://", "abfss://", "wasb://", "wasbs://")
# ?token=... &X-Amz-Signature=... ;sig=... (presigned URLs, tokens passed as parameters, ";"-separated
# parameters and connection strings). Long names match anywhere in the key, the short ones only as the whole
# key ("?author=", "?passes=", "?keys=" are no secrets).
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*(?:token|password|passwd|passphrase|secret|signature|credential|authorization"
    r"|(?:api|access|private)[_-]?key)[A-Za-z0-9_.-]*|auth|pwd|pass|sig|key|code))=(?P<value>[^&;\s'\"<>#]+)",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(r"(?P<kind>\bBearer|\bAuthorization:\s*Basic)\s+(?P<value>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)


def _first_of(text: str, chars: str, start: int = 0) -> int:
    """Index of the first of ``chars`` in ``text`` from ``start``, else ``len(text)``."""
    return min((i for i in (text.find(c, start) for c in chars) if i >= 0), default=len(text))


def _password_end(run: str, colon: int) -> int | None:
    """Index of the "@" that ends the password of ``run`` = ``user:password@host...`` (``colon`` after the user),
    None when no host follows any "@". A typed password may hold "@", "/", "?", "#" or a quote, so the host is
    after the LAST "@" a host follows; an "@" in the query ("?to=a@b.com") or opening a path segment
    ("/@scope/pkg") is passed over while an earlier one qualifies: there it is the URI's, not the password's."""
    ats = [m.start() for m in _HOST_AT.finditer(run, colon + 1)]
    if not ats:
        return None
    query = _first_of(run, "?#", colon + 1)
    plain = [i for i in ats if i < query and run[i - 1] != "/"]
    return max(plain or ats)  # the last: an "@" past the real host over-masks, one before it would leak


def _mask_head(scheme: str, run: str) -> tuple[str, int]:
    """The masked start of the URI ``scheme`` + ``run``, and how many characters of ``run`` it replaces (the
    rest, the host on, is scanned again: it may hold another URI, "?next=http://u:p@h")."""
    end = _first_of(run, "/?#")  # where the authority would end if nothing in it were unencoded
    colon = run.find(":", 0, end)
    # user:password@host, not host:PORT ("h:8080/a@b") nor an IPv6 host ("[::1]:5000/a@b") nor a drive ("C:/")
    if colon >= 0 and not run.startswith("[") and run[colon + 1:end] and not run[colon + 1:end].isdigit():
        at = _password_end(run, colon)
        if at is not None:
            return f"{scheme}{run[:colon]}:{MASK}@", at + 1
    at = run.rfind("@", 0, end)
    if at < 0 or scheme.lower() in _CONTAINER_SCHEMES:
        return scheme, 0
    return f"{scheme}{MASK}@", at + 1  # a token alone (https://TOKEN@host)


def _redact_uris(text: str) -> str:
    if "://" not in text:
        return text
    # A loop, not re.sub: a match gives back the part of its run after the userinfo, to be searched again
    parts: list[str] = []
    pos = 0
    while (m := _SCHEME.search(text, pos)) is not None:
        rm = _RUN.match(text, m.end(), m.end() + _RUN_MAX)
        run = rm.group() if rm else ""  # (it matches "" at least)
        head, used = _mask_head(m.group(), run)
        parts += [text[pos:m.start()], head]
        pos = m.end() + used  # past the scheme at least: the loop ends
    parts.append(text[pos:])
    return "".join(parts)


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URI in it masked: ``scheme://user:password@host`` ->
    ``scheme://user:***@host``, ``https://TOKEN@host`` -> ``https://***@host`` (any scheme; a password with an
    ``@``, ``/`` or quote in it included), secret-looking query parameters (``?token=``, ``X-Amz-Signature=``,
    ``;sig=``) and ``Bearer TOKEN`` / ``Authorization: Basic ...`` credentials. Anything else is unchanged."""
    text = _redact_uris(text)
    if "=" in text:
        text = _SECRET_QUERY.sub(lambda m: f"{m.group('key')}={MASK}", text)
    return _AUTH_HEADER.sub(lambda m: f"{m.group('kind')} {MASK}", text)


redact_uri = redact_text  # the older name: a URI is masked as any text is


def _secret_key(key: Any) -> bool:
    return isinstance(key, str) and SECRET_KEY.search(key) is not None


def _redact_node(obj: Any, secret: bool) -> Any:
    # A secret-named key masks its string or number, and those of a list it holds ("api_key": ["k1", "k2"]);
    # None, "" and booleans ("use_auth_token": true) hide nothing and stay. A dict below it goes by its own keys
    # ("auth": {"user": ..., "password": ...}): dicts keyed by names are data too (a summary's "teacher_knn"
    # by teacher name), and a teacher named "clip_token" must not lose its results.
    if isinstance(obj, dict):
        return {k: _redact_node(v, _secret_key(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact_node(v, secret) for v in obj]
    if secret and ((isinstance(obj, str) and obj) or (isinstance(obj, (int, float)) and not isinstance(obj, bool))):
        return MASK
    return redact_text(obj) if isinstance(obj, str) else obj


def redact_tree(obj: Any) -> Any:
    """A JSON-able tree (a config, a summary) safe to write: the values of secret-named keys (``SECRET_KEY``)
    masked at any depth, every other string redacted (``redact_text``)."""
    return _redact_node(obj, False)


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Flat params (``"teachers.0.model_kwargs.hf_token"``) safe to log, by the rules of ``redact_tree``."""
    return {k: _redact_node(v, _secret_key(k)) for k, v in params.items()}


def redact_json_text(text: str) -> str:
    """A file's text safe to write: JSON holding an object or an array comes back as ``redact_tree`` of it,
    indented by 2 (a trailing newline kept); anything else as ``redact_text`` of it."""
    try:
        tree = json.loads(text)
    except (ValueError, RecursionError):  # not JSON (a table, a log) or nested past the parser
        return redact_text(text)
    if not isinstance(tree, (dict, list)):  # a bare JSON scalar: no keys to go by
        return redact_text(text)
    out = json.dumps(redact_tree(tree), indent=2)
    return out + "\n" if text.endswith("\n") else out


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
