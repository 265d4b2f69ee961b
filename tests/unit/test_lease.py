"""The lease that keeps one driver per run folder in a bucket, against a real S3 API (moto's standalone server
on 127.0.0.1) and real processes, no Ray: one holder at a time; a holder stops itself before anyone may take
over (on its own monotonic clock, even frozen); a takeover waits lease + margin on the contender's clock,
whatever the lease object says; a renewal whose answer was lost is still held; a server that ignores
conditional writes is refused; a driver frozen past its lease writes nothing after it wakes and exits 1."""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from simreg.models.errors import ConfigError
from simreg.orchestrator import fence, storage
from simreg.orchestrator.storage import FolderLock, Store
from tests.services import free_port, s3_objects

LEASE_S = 3.0  # margin 1 s, renewals every 0.5 s: the holder stops 2 s after its last renewal, a takeover waits 4 s


@pytest.fixture(autouse=True)
def short_lease(monkeypatch):
    """A short lease; a lost one decides the stop but never interrupts pytest's own main thread (the real
    interrupt is tested in test_fence.py and, in a real driver, by the process tests below)."""
    monkeypatch.setenv("SIMREG_LEASE_S", str(LEASE_S))
    monkeypatch.setattr(fence, "interrupt_main", lambda reason, exit_code=fence.EXIT_LOST, owned=False, **kw: fence.decide(
        reason, exit_code, owned))
    fence.reset()
    yield
    fence.reset()


def _prefix() -> str:
    return f"s3://simreg-test/{uuid.uuid4().hex[:8]}"


def _client(endpoint: str):  # noqa: ANN202
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _key(folder: Store) -> tuple[str, str]:
    bucket, _, prefix = folder.path.partition("/")
    return bucket, f"{prefix}/{storage.LOCK_NAME}"


def test_one_holder_a_takeover_after_lease_plus_margin(s3):
    folder = Store(_prefix())
    first = FolderLock(folder).acquire()
    assert first.valid() and json.loads((folder / storage.LOCK_NAME).read_text())["holder"] == first.holder
    with pytest.raises(ConfigError, match="in use by another simreg driver"):  # its renewals show it is alive
        FolderLock(folder).acquire()
    first.release()
    assert not (folder / storage.LOCK_NAME).exists()
    # a driver that dies keeps its lease; the next one waits lease + margin by its own clock, then takes over
    dead = FolderLock(folder).acquire()
    dead._stop.set()  # its renewals stop, as when the process is killed
    t0 = time.monotonic()
    second = FolderLock(folder).acquire()
    assert LEASE_S + LEASE_S / 3 <= time.monotonic() - t0 < 12
    assert json.loads((folder / storage.LOCK_NAME).read_text())["holder"] == second.holder
    second.release()


@pytest.mark.parametrize("body", [b'{"holder": "h:1:x", "expires": 0}', b'{"holder": "h:1:x"}', b"not json at all", b"[1, 2]"])
def test_a_lease_object_is_taken_over_by_the_contenders_clock_only(s3, body):
    """An expiry in the past (a host whose clock runs ahead wrote it, or one behind reads it), no expiry, a body
    that is not JSON: none is taken at first sight, each after lease + margin unchanged, never a traceback."""
    folder = Store(_prefix())
    bucket, key = _key(folder)
    _client(s3).put_object(Bucket=bucket, Key=key, Body=body)
    t0 = time.monotonic()
    lock = FolderLock(folder).acquire()
    assert time.monotonic() - t0 >= LEASE_S + LEASE_S / 3
    lock.release()


def test_a_holder_stops_itself_before_a_takeover_is_possible(s3, monkeypatch):
    """Renewals that fail (an outage, a hung request): the holder is no longer ``valid`` lease - margin after the
    last one that succeeded; the watchdog stops it then, while a contender waits until lease + margin."""
    stops: list[str] = []
    monkeypatch.setattr(storage, "stop_driver", lambda reason, **kw: stops.append(reason))
    folder = Store(_prefix())
    lock = FolderLock(folder).acquire()
    t_ok = time.monotonic()

    def fail(**kwargs):  # noqa: ANN003, ANN202
        raise OSError("connection timed out")

    monkeypatch.setattr(lock._client, "put_object", fail)
    while not stops and time.monotonic() - t_ok < 10:
        time.sleep(0.05)
    assert stops and "not renewed for 2 s" in stops[0]
    assert LEASE_S - LEASE_S / 3 - 0.6 <= time.monotonic() - t_ok < LEASE_S  # renewals every 0.5 s: the last ok one was sent <= 0.5 s after t_ok
    assert not lock.valid()
    with pytest.raises(fence.Stopped) as e:  # and the driver's next write is refused, with exit status 1
        (folder / "summary.json").write_text("{}")
    assert e.value.exit_code == 1 and not e.value.owned and not (folder / "summary.json").exists()
    lock.release()


def test_a_renewal_that_hangs_does_not_keep_the_holder_writing(s3, monkeypatch):
    """A renewal request that never returns: the watchdog stops the driver on time anyway, and the lease's own
    requests give up within seconds (boto3's defaults: 60 s connect, 60 s read, 3 attempts)."""
    stops: list[str] = []
    monkeypatch.setattr(storage, "stop_driver", lambda reason, **kw: stops.append(reason))
    folder = Store(_prefix())
    lock = FolderLock(folder).acquire()
    config = lock._client.meta.config
    assert config.connect_timeout <= 3 and config.read_timeout <= 5 and config.retries["total_max_attempts"] <= 2
    t_ok = time.monotonic()
    monkeypatch.setattr(lock._client, "put_object", lambda **kwargs: time.sleep(30))
    while not stops and time.monotonic() - t_ok < 10:
        time.sleep(0.05)
    assert stops and time.monotonic() - t_ok < LEASE_S and not lock.valid()
    lock._stop.set()  # the hung renewal thread is a daemon: let the test go on without it


def test_a_taken_lease_stops_the_driver_and_is_not_deleted(s3, monkeypatch):
    stops: list[str] = []
    monkeypatch.setattr(storage, "stop_driver", lambda reason, **kw: stops.append(reason))
    folder = Store(_prefix())
    lock = FolderLock(folder).acquire()
    bucket, key = _key(folder)
    _client(s3).put_object(Bucket=bucket, Key=key, Body=b'{"holder": "other"}')
    deadline = time.monotonic() + 10
    while not stops and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stops and "another driver took it over" in stops[0]
    assert not lock.valid() and fence.tracking_allowed() is False
    lock.release()
    assert json.loads((folder / storage.LOCK_NAME).read_text())["holder"] == "other"  # not ours to delete


def test_a_renewal_whose_answer_was_lost_is_still_held(s3, monkeypatch):
    """The renewal went through but its answer never came (a timeout): the retry with the old ETag gets 412.
    The lease still names this driver, so it is still held, and renewals go on."""
    stops: list[str] = []
    monkeypatch.setattr(storage, "stop_driver", lambda reason, **kw: stops.append(reason))
    folder = Store(_prefix())
    lock = FolderLock(folder).acquire()
    real = lock._client.put_object
    lost = threading.Event()

    def answer_lost(**kwargs):  # noqa: ANN003, ANN202
        out = real(**kwargs)
        if not lost.is_set():
            lost.set()
            raise OSError("Read timeout on endpoint URL")
        return out

    monkeypatch.setattr(lock._client, "put_object", answer_lost)
    time.sleep(LEASE_S * 1.5)
    assert lost.is_set() and not stops and lock.valid()
    monkeypatch.setattr(lock._client, "put_object", real)
    etag = lock._etag
    time.sleep(1.2)
    assert lock._etag != etag and lock.valid()  # renewed again since
    lock.release()
    assert not (folder / storage.LOCK_NAME).exists()


def test_release_waits_for_a_renewal_in_flight(s3, monkeypatch):
    folder = Store(_prefix())
    lock = FolderLock(folder).acquire()
    real = lock._client.put_object
    started = threading.Event()

    def slow(**kwargs):  # noqa: ANN003, ANN202
        started.set()
        time.sleep(0.8)
        return real(**kwargs)

    monkeypatch.setattr(lock._client, "put_object", slow)
    assert started.wait(5)
    lock.release()  # deletes with the ETag of the renewal that was in flight, not the one before it
    assert not (folder / storage.LOCK_NAME).exists()


class _CarelessS3(http.server.BaseHTTPRequestHandler):
    """An S3 API that ignores If-None-Match / If-Match: every PUT succeeds."""

    objects: dict[str, bytes] = {}

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def _reply(self, code: int, body: bytes = b"", etag: str | None = None) -> None:
        self.send_response(code)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.objects[self.path.split("?")[0]] = data
        self._reply(200, etag=f'"{uuid.uuid4().hex}"')

    def do_GET(self) -> None:  # noqa: N802
        data = self.objects.get(self.path.split("?")[0])
        if data is None:
            self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
        else:
            self._reply(200, data, etag='"x"')

    def do_DELETE(self) -> None:  # noqa: N802
        self.objects.pop(self.path.split("?")[0], None)
        self._reply(204)


@contextmanager
def careless_s3() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _CarelessS3)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_server_that_ignores_conditional_writes_is_refused(s3):
    with careless_s3() as endpoint:
        folder = Store(f"s3://careless/run?endpoint_override={endpoint}&scheme=http")
        with pytest.raises(ConfigError) as e:
            FolderLock(folder).acquire()
    msg = str(e.value)
    assert msg.startswith("--output-dir s3://careless/run: this S3 server ignores conditional writes "
                          "(If-None-Match, If-Match, If-Match on delete)")
    assert "use a store that enforces them" in msg and "\n" not in msg
    assert _CarelessS3.objects == {}  # its lease deleted again


HOLDER = textwrap.dedent("""
    import sys, time
    from simreg.orchestrator import fence
    from simreg.orchestrator.storage import FolderLock, Store

    fence.install_signal_handlers()
    out, tag, commits = Store(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    try:
        with FolderLock(out):
            print("held", flush=True)
            for n in range(commits):  # a driver's commit points: each one a write to the run folder
                (out / "commits" / f"{tag}-{n:05d}").write_text(str(time.time()))
                time.sleep(0.1)
    except fence.Stopped as e:
        print(f"stopped: {e.reason}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
""")


def _start(tmp_path: Path, uri: str, tag: str, commits: int) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    return subprocess.Popen([sys.executable, str(script), uri, tag, str(commits)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SIMREG_LEASE_S": str(LEASE_S)})


def test_a_driver_frozen_past_its_lease_writes_nothing_after_it_wakes(s3, tmp_path):
    """Two real processes on one folder: the first is frozen (SIGSTOP) past its lease, the second takes the folder
    over and commits; the first, woken (SIGCONT), stops at once, exits 1 and commits nothing more."""
    uri = _prefix()
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    a = _start(tmp_path, uri, "a", 100_000)
    assert a.stdout is not None and a.stdout.readline().strip() == "held"
    time.sleep(1.0)
    a.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.0)  # a request the server had received when the process froze lands meanwhile
        frozen = {k for k in s3_objects(s3, bucket, f"{prefix}/commits") if "/a-" in k}
        assert frozen
        b = _start(tmp_path, uri, "b", 30)  # waits lease + margin for the frozen holder's lease, then takes over
        assert b.stdout is not None and b.stdout.readline().strip() == "held"
        time.sleep(0.5)  # b commits
    finally:
        a.send_signal(signal.SIGCONT)
    t_woken = time.monotonic()
    _, err = a.communicate(timeout=30)
    assert a.returncode == 1, err
    assert time.monotonic() - t_woken < 5
    assert "stopped: lost the lease of " in err and "rerun the command to resume the run" in err
    assert b.wait(timeout=60) == 0, b.stderr.read() if b.stderr else ""
    after = {k for k in s3_objects(s3, bucket, f"{prefix}/commits") if "/a-" in k}
    assert after == frozen  # not one write after it woke
    assert len([k for k in s3_objects(s3, bucket, f"{prefix}/commits") if "/b-" in k]) == 30
    assert not s3_objects(s3, bucket, f"{prefix}/{storage.LOCK_NAME}")  # b released it; a deleted nothing of b's


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_holder_with_status_130_and_releases_its_lease(s3, tmp_path, sig):
    uri = _prefix()
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    p = _start(tmp_path, uri, "a", 100_000)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and f"stopped: interrupted ({sig.name})" in err
    assert not s3_objects(s3, bucket, f"{prefix}/{storage.LOCK_NAME}")
