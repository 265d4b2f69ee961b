"""Secrets kept out of what the project logs and writes: passwords in URIs, secret-looking params.
"""
from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)


URI_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:]*)(:(?P<pw>[^/@]*))?@")


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://user:***@host/...`` (anything else unchanged)."""
    m = URI_USERINFO.match(uri)
    if m is None or m.group("pw") is None:
        return uri
    return f"{m.group('scheme')}{m.group('user')}:***@{uri[m.end():]}"


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Params safe to log: values of secret-looking keys hidden, passwords in URIs masked."""
    return {
        k: "***" if SECRET_KEY.search(k) and v not in (None, "") else (redact_uri(v) if isinstance(v, str) else v)
        for k, v in params.items()
    }
