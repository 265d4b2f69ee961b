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
    assert "MLflow tracking server https://***@127.0.0.1:9/x does not answer" in str(info.value) and "TOKEN42" not in str(info.value)


# A password as typed, unencoded: a quote, a "/", a "?" or an "@" stays inside the masked part; the host is
# after the last "@" that a host follows, and a query or a path segment starting with "@" holds no host.
@pytest.mark.parametrize(("raw", "want"), [
    ("http://u:p'w@h/x", "http://u:***@h/x"),
    ("http://u:p@ss/w@host/path", "http://u:***@host/path"),
    ("('http://u:p'w@h:1/x')", "('http://u:***@h:1/x')"),  # the closing quote is no part of the password
    ('{"a":"http://u:p/w@h","b":"x@y.com"}', '{"a":"http://u:***@h","b":"x@y.com"}'),  # compact JSON
    ("http://u:p'w@h/x?email=a@b.com", "http://u:***@h/x?email=a@b.com"),  # an "@" in the query: no host
    ("https://u:t/k@registry.corp/@scope/pkg", "https://u:***@registry.corp/@scope/pkg"),  # a "/@scope" path
    ("https://host/login?next=http://v:p/w@h2/y", "https://host/login?next=http://v:***@h2/y"),  # a URI in a URI
])
def test_userinfo_with_a_quote_or_a_slash_masked(raw: str, want: str):
    assert redact_text(raw) == want


@pytest.mark.parametrize("clean", [
    "s3://bucket/a@b/c",  # no "user:" in front of the "@"
    "abfs://container@account.dfs.core.windows.net/p", "abfss://container@account.dfs.core.windows.net:443/p",
    "mailto:bob@example.com", "see https://host/x and user@example.com",
    "http://localhost:4873/@scope/pkg", "http://host:8080/users/bob@example.com",  # host:PORT, then a path
    "http://host:8080?to=a@b.com", "http://[::1]:5000/a@b", "file://C:/Users/a@b/x", "https://medium.com/@user/post",
    "'http://h:80/x','a@b.com'", '{"a":"http://h:1/x","b":"x@y.com"}',
])
def test_at_signs_that_are_no_credentials_unchanged(clean: str):
    assert redact_text(clean) == clean


@pytest.mark.parametrize(("raw", "want"), [
    ("https://h/x?auth=abc&x=1", "https://h/x?auth=***&x=1"),
    ("https://h/x;token=abc", "https://h/x;token=***"),  # ";" separates parameters too
    ("db?pwd=abc", "db?pwd=***"), ("db?u=a&pass=abc", "db?u=a&pass=***"), ("k?passphrase=abc", "k?passphrase=***"),
    ("h?authorization=Basic%20Zm9v", "h?authorization=***"), ("h?access_token=abc", "h?access_token=***"),
])
def test_secret_query_keys_masked(raw: str, want: str):
    assert redact_text(raw) == want


@pytest.mark.parametrize("clean", [
    "https://h/x?author=x", "https://h/x?passes=3", "h?keys=2&codec=h264", "h;authority=a",
])
def test_harmless_query_keys_unchanged(clean: str):
    assert redact_text(clean) == clean


SECRET_KEYS = [
    "hf_token", "HF_TOKEN", "token", "x.token", "teachers.0.model_kwargs.hf_token", "api_key", "apiKey", "X-Api-Key",
    "password", "db.passwd", "pwd", "passphrase", "aws_secret_access_key", "secretAccessKey", "access_key",
    "client_secret", "Authorization", "auth", "basic_auth", "private_key", "privateKey", "credentials", "credential",
]
PLAIN_KEYS = [
    "tokens_per_s", "max_tokens", "num_tokens", "token_budget", "tokenizer", "train.max_tokens", "author", "authority",
    "password_file", "credentials_path", "key", "sort_key", "secretary", "heads.depth", "tracking.tracking_uri",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_named_keys_masked(key: str):
    assert redact({key: "abc"}) == {key: "***"}
    assert redact_tree({"a": [{"b": {key: "abc"}}]}) == {"a": [{"b": {key: "***"}}]}
    assert redact_tree({key: 12345}) == {key: "***"}  # a number too (a PIN, a numeric token)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_keys_that_only_look_secret_unchanged(key: str):
    assert redact({key: 7}) == {key: 7}
    assert redact_tree({"a": {key: "abc"}}) == {"a": {key: "abc"}}


def test_secret_key_values_in_a_tree():
    tree = {
        "teachers": [{"name": "t", "model_kwargs": {"hf_token": "hf_abc", "img_size": 64}}],
        "x": {"password": "", "token": None, "use_auth_token": True,  # nothing to hide
              "api_key": ["k1", "k2"], "auth": {"user": "bob", "password": "pw"},  # a dict goes by its own keys
              "note": "http://u:pw@h"},
        "teacher_knn": {"clip_token": {"top1_20nn": 50.0}},  # a teacher's name, not a secret's
    }
    assert redact_tree(tree) == {
        "teachers": [{"name": "t", "model_kwargs": {"hf_token": "***", "img_size": 64}}],
        "x": {"password": "", "token": None, "use_auth_token": True,
              "api_key": ["***", "***"], "auth": {"user": "bob", "password": "***"},
              "note": "http://u:***@h"},
        "teacher_knn": {"clip_token": {"top1_20nn": 50.0}},
    }


def test_a_secret_named_model_kwarg_is_refused_and_a_saved_one_masked():
    """A config never carries a secret (it is written to the run folder, MLflow and Ray's run state): refused with
    one line naming the key and the fix; a config file written before holds it masked."""
    from simreg.models.errors import ConfigError
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.tracking.redact import redact_tree

    for key in ("teachers.0.model_kwargs.hf_token", "student.model_kwargs.api_key"):
        with pytest.raises(ConfigError, match=r"look like secrets: pass them through the environment"):
            load_config(None, [f"{key}=hf_abc123"])
    cfg = load_config(None, ["teachers.0.model_kwargs.class_token=false"])  # a flag of timm's ViT: no secret
    assert cfg.teachers[0].model_kwargs == {"class_token": False}
    tree = redact_tree({"teachers": [{"model_kwargs": {"hf_token": "hf_abc123", "img_size": 64}}]})
    assert tree == {"teachers": [{"model_kwargs": {"hf_token": "***", "img_size": 64}}]}


def test_redact_json_text():
    from simreg.orchestrator.tracking.redact import redact_json_text

    tree = {"cfg": {"teachers": [{"model_kwargs": {"hf_token": "hf_abc"}}]}, "uri": "https://TOK9@h/x", "n": 1}
    text = json.dumps(tree)
    out = redact_json_text(text)
    assert json.loads(out) == {"cfg": {"teachers": [{"model_kwargs": {"hf_token": "***"}}]}, "uri": "https://***@h/x",
                               "n": 1}
    assert out == json.dumps(json.loads(out), indent=2)
    assert redact_json_text(text + "\n").endswith("}\n")  # a trailing newline kept
    table = "| model | top-1 |\n|---|---|\n| http://u:pw@h | 1.0 |\n"  # not JSON: masked as text
    assert redact_json_text(table) == redact_text(table) == table.replace(":pw@", ":***@")
    assert redact_json_text('"token=abc"') == redact_text('"token=abc"')  # a JSON scalar: text, as it was


def test_many_uris_nested_in_one_token():
    # each URI's run is searched again after its userinfo: a loop, not recursion, and a capped run
    assert redact_text("http://" * 3000 + "u:p/w@h").endswith("http://u:***@h")
    deep = "?next=http://x" * 3000
    assert redact_text(deep + "?next=http://u:p@h") == deep + "?next=http://u:***@h"
