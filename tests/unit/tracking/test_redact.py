"""Redaction of credentials in URIs, query parameters, params, files, log records and tracebacks."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from simreg.orchestrator.tracking.redact import install_redaction, redact, redact_text, redact_tree


@pytest.mark.parametrize(("raw", "want"), [
    ("http://alice:s3cr3t@mlflow:5000/x", "http://alice:***@mlflow:5000/x"),
    ("https://TOKEN123@mlflow.example.com/api", "https://***@mlflow.example.com/api"),  # a token alone
    ("http://user:p@ss@host:5000", "http://user:***@host:5000"),  # an "@" in the password: host after the last "@"
    ("postgresql://u:pw@db/mlflow", "postgresql://u:***@db/mlflow"),  # any scheme
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abcdef&n=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&n=1"),
    ("sqlite:////tmp/mlflow.db?token=s3cr3t", "sqlite:////tmp/mlflow.db?token=***"),
    ("Authorization: Basic Ym9iOmh1bnRlcjI=", "Authorization: Basic ***"),
    ("sent Bearer eyJhbGciOi.x.y", "sent Bearer ***"),
])
def test_secrets_masked(raw: str, want: str):
    assert redact_text(raw) == want


@pytest.mark.parametrize("clean", [
    "http://127.0.0.1:5000", "sqlite:////tmp/a@b/mlflow.db",  # an "@" in a path is no userinfo
    "abfs://container@account.dfs.core.windows.net/runs",  # Azure's container@account is no secret
    "s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http", "Basic authentication failed", "heads.depth=2",
])
def test_clean_text_unchanged(clean: str):
    assert redact_text(clean) == clean


def test_several_uris_in_one_message():
    msg = ("API request to http://bob:hunter2@h:5000/api/2.0/mlflow/runs/get failed; retried https://tok3n@e.com/a "
           "and ('http://x:p@q@c:1')")
    out = redact_text(msg)
    assert out == ("API request to http://bob:***@h:5000/api/2.0/mlflow/runs/get failed; retried https://***@e.com/a "
                   "and ('http://x:***@c:1')")


def test_uri_in_an_exception_message_and_its_traceback():
    try:
        raise ConnectionError("HTTPConnectionPool: http://bob:hunter2@mlflow:5000/api refused")
    except ConnectionError as e:
        err = e
    assert "hunter2" not in redact_text(str(err))
    r = subprocess.run([sys.executable, "-c", (
        "from simreg.orchestrator.tracking.redact import install_redaction\n"
        "install_redaction()\n"
        "raise RuntimeError('API request to http://bob:hunter2@mlflow:5000/api failed')\n")],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert "http://bob:***@mlflow:5000/api" in r.stderr and "hunter2" not in r.stderr


def test_log_records_redacted(caplog, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test, as the record factory below
    factory = logging.getLogRecordFactory()
    try:
        _log_records_redacted(caplog)
    finally:
        logging.setLogRecordFactory(factory)


def _log_records_redacted(caplog) -> None:
    install_redaction()
    log = logging.getLogger("simreg.test_redact")
    with caplog.at_level(logging.INFO, logger="simreg.test_redact"):
        log.info("tracking at %s", "https://TOKEN99@mlflow/x")
        try:
            raise ValueError("no answer from http://u:hunter2@h:1")
        except ValueError:
            log.exception("failed")
    text = caplog.text
    assert "https://***@mlflow/x" in text and "http://u:***@h:1" in text
    assert "TOKEN99" not in text and "hunter2" not in text


def test_params_tree_and_files(tmp_path: Path):
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.storage import open_store
    from simreg.orchestrator.train.rundir import publish, safe_config_json

    out = redact({"tracking.tracking_uri": "https://tok@h:5000", "x.api_key": "abc", "x.token": None, "heads.depth": 4})
    assert out == {"tracking.tracking_uri": "https://***@h:5000", "x.api_key": "***", "x.token": None, "heads.depth": 4}
    assert redact_tree({"a": ["http://u:p@ss@h"], "b": 1}) == {"a": ["http://u:***@h"], "b": 1}
    cfg = load_config(None, ["tracking.tracking_uri=http://bob:hunt@er2@host:5000"])
    assert "er2" not in safe_config_json(cfg) and "http://bob:***@host:5000" in safe_config_json(cfg)
    copy = publish(open_store(tmp_path), tmp_path, "summary.json", json.dumps({"uri": "https://TOKEN77@h/x"}))
    assert "TOKEN77" not in (tmp_path / "summary.json").read_text() and copy.read_text() == (tmp_path / "summary.json").read_text()


def test_compare_names_an_unreachable_store_without_its_token(monkeypatch):
    from simreg.models.errors import ConfigError
    from simreg.orchestrator.tune.compare import compare

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(ConfigError) as info:
        compare("abc123", "https://TOKEN42@127.0.0.1:9/x")  # nothing listens on port 9
    assert "no run 'abc123' in https://***@127.0.0.1:9/x" in str(info.value) and "TOKEN42" not in str(info.value)
