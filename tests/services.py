"""Real services for the cluster tests, as processes on 127.0.0.1: an S3-compatible server (the standalone
moto server, as Ray's own test suite uses) and an MLflow tracking server whose artifacts go to that S3.
Each runs in its own process group and is ended with it."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "simreg-test", "AWS_SECRET_ACCESS_KEY": "simreg-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}); its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s; log:\n{log.read_text()[-3000:]}")


def _end(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextlib.contextmanager
def moto_server(log_dir: Path, auth_after: int | None = None) -> Iterator[str]:
    """An S3 API on 127.0.0.1 (moto's standalone server); yields its endpoint URL. ``auth_after=N``: requests
    after the first N must be signed with an access key of a user the server knows (its IAM)."""
    port = free_port()
    log = log_dir / "moto.log"
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": str(auth_after)} if auth_after is not None else {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_http(f"{endpoint}/moto-api/", proc, log)
        yield endpoint
    finally:
        _end(proc)


@contextlib.contextmanager
def mlflow_server(log_dir: Path, s3_endpoint: str | None, artifacts: str, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` with a sqlite store (``log_dir/mlflow-server.db``: a server started again on the same
    folder and port finds its runs) and proxied artifacts in ``artifacts`` (an s3:// URI with ``s3_endpoint``,
    or a local folder); one worker, no job runner; yields its URL."""
    port = port or free_port()
    log = log_dir / "mlflow-server.log"
    s3 = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {}
    env = {**os.environ, **s3, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{log_dir / 'mlflow-server.db'}",
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log_dir)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", proc, log, timeout_s=120)
        yield url
    finally:
        _end(proc)


def s3_objects(endpoint: str, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every object under ``prefix``: key -> size."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
