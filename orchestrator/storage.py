"""Where a run reads and writes: a local folder or a folder in an object store, addressed by one URI.

    runs/demo                                        a local folder
    s3://bucket/prefix                               S3 (endpoint and credentials: the standard AWS chain)
    s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http   MinIO / any S3-compatible server
    gs://bucket/prefix, abfs://container@account.dfs.core.windows.net/prefix

One layer on ``pyarrow.fs`` (what Ray Train and Ray Data use too: ``Store.ray_storage`` gives RunConfig's
``storage_path`` and ``storage_filesystem``). Credentials are never part of a URI: pyarrow and boto3 read
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` (or ``~/.aws``, an instance
role, ...) in each process that opens a store, so nothing secret is pickled or logged.

Atomic writes: a local file is written to a temporary name, fsynced and renamed; an object store has no
rename, but an object appears only when its upload completes, whole, so readers never see part of a
file there either. Exclusive ownership of a folder: ``hold`` (flock locally, a lease with conditional
writes on S3).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from simreg.models.errors import ConfigError, first_line
from simreg.orchestrator import fence

log = logging.getLogger("simreg")

REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
# Query parameters pyarrow accepts on an S3 URI; anything else (a key, a secret) is refused.
S3_QUERY_KEYS = ("endpoint_override", "scheme", "region", "allow_bucket_creation", "allow_bucket_deletion")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)``, fsync, rename to ``path``, fsync the folder: readers never see a partial file, a crash leaves the
    old file or the new one, and the temp file never stays."""
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}-{path.name}"
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself on disk: a crash after this returns keeps the new file
    finally:
        tmp.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    """A written file's bytes on disk (before a rename or a copy makes it count)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform or filesystem that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder: the rename is as durable as they make it
        pass
    finally:
        os.close(fd)


def is_remote(uri: str | Path) -> bool:
    return isinstance(uri, str) and urlsplit(uri).scheme.lower() in REMOTE_SCHEMES


_FS: dict[tuple[str, ...], Any] = {}
_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION")


def _from_uri(raw: str) -> tuple[Any, str]:
    """``pyarrow.fs.FileSystem.from_uri``, with one filesystem per bucket, parameters and credentials: a new
    S3 filesystem resolves the bucket's region over the network, which a pack's every piece would repeat."""
    import pyarrow.fs as pafs

    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("s3", "gs", "gcs"):
        return pafs.FileSystem.from_uri(raw)
    key = (parts.scheme.lower(), parts.netloc, parts.query, *(os.environ.get(k, "") for k in _CRED_ENV))
    if key not in _FS:
        root = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
        _FS[key] = pafs.FileSystem.from_uri(root)[0]
    return _FS[key], f"{parts.netloc}{parts.path}"


class Store:
    """A folder addressed by URI (local path or object store). ``store / "a" / "b"`` is a sub-folder or file;
    ``str(store)`` is the URI for messages (without its query parameters), ``store.uri`` the one to reopen it
    from; no secret is ever part of either."""

    def __init__(self, uri: str | Path) -> None:
        import pyarrow.fs as pafs

        raw = str(uri)
        self.remote = is_remote(raw)
        if self.remote:
            parts = urlsplit(raw)
            bad = [k for k, _ in parse_qsl(parts.query) if k not in S3_QUERY_KEYS]
            if bad:
                raise ConfigError(
                    f"{parts.scheme}://{parts.netloc}{parts.path}: unsupported URI parameter(s) {bad}; allowed: "
                    f"{list(S3_QUERY_KEYS)} (credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never a URI)"
                )
            if parts.password or (parts.username and parts.scheme.lower() in ("s3", "gs", "gcs")):  # abfs://container@account is no secret
                raise ConfigError(f"{parts.scheme}://...{parts.path}: a storage URI must not hold credentials; export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
            self._base = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
            self._query = parts.query
            try:
                self.fs, path = _from_uri(raw)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{self._base}: cannot open this storage URI ({e}); check it, and AWS_ENDPOINT_URL / the ?endpoint_override= parameter") from None
            self.path = path.rstrip("/")
        else:
            p = Path(raw.removeprefix("file://")).expanduser().resolve()
            self._base, self._query = str(p), ""
            self.fs, self.path = pafs.LocalFileSystem(), str(p)

    @classmethod
    def _child(cls, parent: Store, name: str) -> Store:
        s = cls.__new__(cls)
        s.remote, s.fs, s._query = parent.remote, parent.fs, parent._query
        s._base = f"{parent._base}/{name}"
        s.path = f"{parent.path}/{name}"
        return s

    def at(self, path: str) -> Store:
        """Another path in this store's filesystem (a path Ray reports, e.g. a checkpoint's, has no scheme)."""
        s = Store._child(self, "_")
        s.path = path.rstrip("/")
        s._base = f"{urlsplit(self._base).scheme}://{s.path}" if self.remote else s.path
        return s

    def __truediv__(self, name: str) -> Store:
        return Store._child(self, name.strip("/"))

    @property
    def uri(self) -> str:
        """The URI other processes reopen the store from (endpoint parameters kept)."""
        return f"{self._base}?{self._query}" if self._query else self._base

    def __str__(self) -> str:
        return self._base

    def __repr__(self) -> str:
        return f"Store({self._base!r})"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def local_path(self) -> Path | None:
        return None if self.remote else Path(self.path)

    # ------------------------------------------------------------------ reads
    def _info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type == pafs.FileType.File)

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        if not self.remote:
            return bool(self._info().type == pafs.FileType.Directory)
        # an object store has no folders: a prefix "exists" when an object lies under it
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return bool(self.fs.get_file_info(sel))

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return bytes(f.read())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def listdir(self, dirs_only: bool = False) -> list[str]:
        """Names directly under this folder (empty when it does not exist or is a file); ``dirs_only``:
        sub-folders (prefixes in an object store) only."""
        import pyarrow.fs as pafs

        if not self.remote and not Path(self.path).is_dir():
            return []
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if not dirs_only or i.type == pafs.FileType.Directory)

    def etag(self) -> str | None:
        """An S3 object's ETag (it changes with the object's bytes, where a modification time has whole seconds);
        None for other stores."""
        if not str(self).startswith("s3://"):
            return None
        bucket, _, key = self.path.partition("/")
        return str(self.s3_client().head_object(Bucket=bucket, Key=key)["ETag"])

    def s3_client(self, config: Any = None) -> Any:
        """A boto3 S3 client for this store's endpoint (the URI's ``endpoint_override``/``scheme``/``region``, else
        the standard AWS chain): what pyarrow cannot do (conditional writes, ETags)."""
        import boto3

        q = dict(parse_qsl(self._query))
        endpoint = q.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{q.get('scheme', 'https')}://{endpoint}"
        return boto3.client("s3", endpoint_url=endpoint, region_name=q.get("region"), config=config)

    # ------------------------------------------------------------------ writes
    def write_bytes(self, data: bytes) -> None:
        """Atomically: a reader sees the old file, or the whole new one. Never after this driver's stop
        (``fence.check``: raises ``fence.Stopped``)."""
        fence.check(str(self))
        if self.remote:
            with self.fs.open_output_stream(self.path) as f:  # one object, visible when complete
                f.write(data)
            return
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, lambda t: t.write_bytes(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        if not self.remote:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def upload(self, local: Path) -> None:
        """Copy a local file or folder here (a no-op when this store is that very local path)."""
        import pyarrow.fs as pafs

        fence.check(str(self))
        if not self.remote and Path(self.path) == local.resolve():
            return
        if local.is_dir():
            pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        else:
            self.write_bytes(local.read_bytes())

    def download(self, local: Path) -> Path:
        """Copy this file or folder to ``local``; returns ``local``."""
        import pyarrow.fs as pafs

        if self.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.read_bytes())
        else:
            local.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(self.path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return local

    def delete(self) -> None:
        """Delete this file or folder (nothing when absent)."""
        import pyarrow.fs as pafs

        fence.check(str(self))
        t = self._info().type
        if t == pafs.FileType.File:
            self.fs.delete_file(self.path)
        elif t == pafs.FileType.Directory or (self.remote and self.is_dir()):
            self.fs.delete_dir(self.path)

    # ------------------------------------------------------------------ Ray
    def ray_storage(self) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for a Ray Train / Tune RunConfig."""
        return (self.path, self.fs) if self.remote else (self.path, None)

    # ------------------------------------------------------------------ checks
    def check_reachable(self, what: str) -> None:
        """One clear error (naming the URI and what to fix) when the store cannot be reached or written."""
        if not self.remote:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            import pyarrow.fs as pafs

            info = self.fs.get_file_info(bucket)
            if info.type == pafs.FileType.NotFound:
                raise ConfigError(f"{what} {self}: bucket {bucket!r} does not exist; create it, or fix the URI")
            probe = self / f".simreg-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.delete()
        except ConfigError:
            raise
        except Exception as e:  # pyarrow raises OSError with the service's message; keep its first line
            raise ConfigError(
                f"{what} {self}: cannot reach or write it ({first_line(e)}); check AWS_ENDPOINT_URL (or ?endpoint_override=), "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and that the bucket exists"
            ) from None


def open_store(uri: str | Path | Store) -> Store:
    return uri if isinstance(uri, Store) else Store(uri)


@contextmanager
def scratch(store: Store) -> Iterator[Path]:
    """A local folder for files that must exist on disk before they reach ``store`` (an exported model, an
    MLflow artifact): the store's own folder when it is local, else a temporary folder removed afterwards."""
    if store.local_path is not None:
        store.local_path.mkdir(parents=True, exist_ok=True)
        yield store.local_path
        return
    d = Path(tempfile.mkdtemp(prefix="simreg-scratch-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def local_copy(uri: str | Path) -> Iterator[Path]:
    """A local path to a file given by path or URI: the file itself, or a temporary download removed afterwards."""
    if not is_remote(str(uri)):
        yield Path(str(uri)).expanduser()
        return
    src = Store(str(uri))
    if not src.is_file():
        raise ConfigError(f"{src} does not exist (or is not a file): check the URI")
    d = Path(tempfile.mkdtemp(prefix="simreg-fetch-"))
    try:
        yield src.download(d / src.name)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------- one driver per folder


def stop_driver(reason: str, hard_after_s: float = 0.0) -> None:
    """Stop this driver: the main thread unwinds (``fence.Stopped``), no write of it goes out after this, its
    command exits 1 (ended with ``os._exit`` when still there ``hard_after_s`` later); the run is left to the
    driver that took the folder over."""
    fence.interrupt_main(reason, hard_after_s=hard_after_s)


def _clock() -> float:
    """Seconds on this host's own clock, counting time suspended (a laptop's sleep, a paused VM where the guest
    kernel sees it): CLOCK_BOOTTIME on Linux, else the monotonic clock. Never the wall clock."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _code(e: Any) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


_TAKEN = ("PreconditionFailed", "ConditionalRequestConflict", "412")
LOCK_NAME = ".simreg.lock"


def lease_times() -> tuple[float, float, float]:
    """(lease, margin, renewal interval) in seconds. The holder renews every ``interval`` and stops itself
    ``lease - margin`` after the last renewal that succeeded (timed from when it was sent); another driver takes
    the folder over once the lease object has not changed for ``lease + margin`` on its own clock: 2 x margin
    between the two. ``SIMREG_LEASE_S`` sets the lease (default 30 s; margin a third of it)."""
    lease = float(os.environ.get("SIMREG_LEASE_S") or 30.0)
    margin = lease / 3
    return lease, margin, margin / 2


class FolderLock:
    """Held while a driver owns a run folder. Local: ``flock`` (the OS drops it when the process dies).
    S3: a lease object created with a conditional PUT (``If-None-Match: *``) and renewed with ``If-Match`` on
    its ETag. Only each host's own clock counts (``_clock``, never the wall clock): the holder stops itself ``lease - margin`` after
    its last successful renewal was sent (``valid``, checked by every write of the driver: ``fence``), and a
    contender takes over a lease unchanged for ``lease + margin`` by its own clock (a driver that died, or one
    frozen that will stop when it wakes). A server that ignores conditional writes is refused: with it two
    drivers could both hold the lease."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._file: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._io = threading.Lock()  # one lease request at a time: a release never races a renewal in flight
        self._etag: str | None = None
        self._client: Any = None
        self._held = False
        self._seq = 0
        self._sent: dict[int, float] = {}  # renewal number -> when it was sent (_clock)
        self._valid_until = float("inf")
        self._lost: str | None = None
        self.lease_s, self.margin_s, self.renew_s = lease_times()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def acquire(self) -> FolderLock:
        if not self.store.remote:
            import fcntl

            self.store.mkdir()
            f = open(Path(self.store.path) / LOCK_NAME, "a+")  # noqa: SIM115
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise ConfigError(f"{self.store} is in use by another simreg process: wait for it, or choose another --output-dir") from None
            self._file, self._held = f, True
            return self
        if not str(self.store).startswith("s3://"):
            log.warning("%s: no conditional writes on this store; run one driver per output folder", self.store)
            self._held = True
            return self
        self._acquire_lease()
        self._held = True
        fence.hold(self)
        self._thread = threading.Thread(target=self._renew, name="simreg-lease", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="simreg-lease-watchdog", daemon=True)
        self._watchdog.start()
        return self

    # --- S3 lease (boto3: pyarrow has no conditional writes)
    def _s3(self) -> tuple[Any, str, str]:
        if self._client is None:
            from botocore.config import Config

            # short: a renewal that hangs must not keep a driver writing past its lease
            self._client = self.store.s3_client(Config(connect_timeout=min(3.0, self.margin_s / 2), read_timeout=min(5.0, self.margin_s / 2),
                                                       retries={"total_max_attempts": 2, "mode": "standard"}))
        bucket, _, prefix = self.store.path.partition("/")
        return self._client, bucket, f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME

    def _body(self, seq: int) -> bytes:
        return json.dumps({"holder": self.holder, "seq": seq}).encode()

    def _read(self) -> tuple[str, dict[str, Any]] | None:
        """(ETag, body) of the lease object; None when there is none. A body that is not a JSON object reads as
        a holder of unknown name (it is waited for like any other)."""
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise
        raw = obj["Body"].read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return str(obj["ETag"]), body if isinstance(body, dict) else {"holder": f"an unreadable lease object ({len(raw)} bytes)"}

    def _acquire_lease(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client, bucket, key = self._s3()
        seen: tuple[str, float] | None = None  # (etag, when first seen on this host's own clock)
        try:
            while True:
                sent = _clock()
                try:
                    self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(0), IfNoneMatch="*")["ETag"]
                    self._sent, self._valid_until = {0: sent}, sent + self.lease_s - self.margin_s
                    self._check_conditional_writes()
                    return
                except ClientError as e:
                    if _code(e) not in _TAKEN:
                        raise
                current = self._read()
                if current is None:
                    continue  # released meanwhile: try again
                etag, lease = current
                holder = lease.get("holder", "?")
                if seen is not None and seen[0] != etag:  # renewed while we waited: its driver is alive
                    raise ConfigError(
                        f"{self.store} is in use by another simreg driver ({holder}): wait for it, or choose another --output-dir"
                    )
                if seen is None:
                    seen = (etag, _clock())
                    log.info("%s: waiting up to %.0f s for the lease of %s (a driver that died leaves it until it lapses)",
                             self.store, self.lease_s + self.margin_s, holder)
                # Lapsed: unchanged for lease + margin by this host's own clock (its holder stopped itself by now)
                if _clock() - seen[1] >= self.lease_s + self.margin_s:
                    try:  # take it over, unless someone else just did
                        client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
                    except ClientError as e:
                        if _code(e) not in (*_TAKEN, "NoSuchKey", "404"):
                            raise
                    log.info("%s: took over the lapsed lease of %s", self.store, holder)
                    seen = None
                    continue
                time.sleep(min(1.0, self.renew_s))
        except (ClientError, BotoCoreError) as e:
            raise ConfigError(
                f"--output-dir {self.store}: cannot take the folder's lease ({first_line(e)}); the store must accept conditional writes "
                "(If-None-Match / If-Match); check AWS_ENDPOINT_URL and the credentials"
            ) from None

    def _check_conditional_writes(self) -> None:
        """Prove the server enforces conditional writes: a second create (``If-None-Match: *``) of the lease,
        an update and a delete with an ETag that is not its own (``If-Match``) must all be refused (412). A server
        that accepts either would let two drivers hold one folder: refused for runs."""
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        ignored = []
        for cond, kwargs in (("If-None-Match", {"IfNoneMatch": "*"}), ("If-Match", {"IfMatch": '"00000000000000000000000000000000"'})):
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(0), **kwargs)["ETag"]
                ignored.append(cond)
            except ClientError as e:
                if _code(e) not in _TAKEN:
                    raise
        try:  # a takeover and a release delete with If-Match: a foreign ETag must be refused too
            client.delete_object(Bucket=bucket, Key=key, IfMatch='"00000000000000000000000000000000"')
            ignored.append("If-Match on delete")
        except ClientError as e:
            if _code(e) not in _TAKEN:
                raise
        if ignored:
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except ClientError:
                pass
            raise ConfigError(
                f"--output-dir {self.store}: this S3 server ignores conditional writes ({', '.join(ignored)}), so two drivers "
                "could write one run; use a store that enforces them (AWS S3, MinIO, Ceph RGW) or a local --output-dir"
            )

    # --- holding it
    def token(self) -> dict[str, str] | None:
        """What a Train worker needs to check the lease is still this driver's (``lease_still_held``) before it
        writes a checkpoint to the folder; None for a local folder (flock: nobody else can hold it)."""
        return {"uri": self.store.uri, "holder": self.holder} if self._thread is not None else None

    def valid(self) -> bool:
        """Whether this driver may still write: the lease is held and its last successful renewal was sent less
        than ``lease - margin`` ago (its own clock), so no other driver can have taken it over."""
        return self._held and self._lost is None and _clock() < self._valid_until

    def describe_loss(self) -> str:
        why = self._lost or f"not renewed for {self.lease_s - self.margin_s:.0f} s"
        return f"lost the lease of {self.store} ({why}): this driver stops; rerun the command to resume the run"

    def _renew(self) -> None:
        """Renew every ``renew_s`` while ``valid``. A 412 may mean a renewal whose answer was lost went through:
        the lease is read, and still naming this driver it is still held. Another holder, or no renewal that
        succeeded for ``lease - margin``, is a lost lease: the driver stops (``stop_driver``)."""
        client, bucket, key = self._s3()
        while not self._stop.wait(self.renew_s):
            with self._io:
                if self._stop.is_set():
                    return
                if _clock() >= self._valid_until:
                    break
                self._seq += 1
                sent = self._sent[self._seq] = _clock()
                try:
                    self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(self._seq), IfMatch=self._etag)["ETag"]
                    self._ok(sent)
                    continue
                except Exception as e:  # noqa: BLE001  (an outage is retried at the next renewal, until the lease runs out)
                    if _code(e) in (*_TAKEN, "NoSuchKey", "404"):
                        if self._still_ours():
                            continue
                        self._lost = "another driver took it over"
                        break
                    log.warning("%s: could not renew the folder lease (%s)", self.store, first_line(e, 200))
        if not self._stop.is_set():
            stop_driver(self.describe_loss(), hard_after_s=self.margin_s)

    def _watch(self) -> None:
        """Stops the driver when the lease runs out on this host's clock, even while a renewal hangs."""
        while not self._stop.wait(max(0.05, min(self.renew_s, self._valid_until - _clock()))):
            if not self.valid():
                stop_driver(self.describe_loss(), hard_after_s=self.margin_s)
                return

    def _ok(self, sent: float) -> None:
        self._valid_until = max(self._valid_until, sent + self.lease_s - self.margin_s)

    def _still_ours(self) -> bool:
        """After a 412: the lease object still names this driver when one of its renewals landed (its answer
        lost, or the retry of it refused): take its ETag and count from when that renewal was sent."""
        try:
            current = self._read()
        except Exception as e:  # noqa: BLE001
            log.warning("%s: could not read the folder lease (%s)", self.store, first_line(e, 200))
            return True  # unknown: the next renewal tries again, the lease's clock still runs
        if current is None or current[1].get("holder") != self.holder:
            return False
        self._etag = current[0]
        sent = self._sent.get(int(current[1].get("seq", -1)))
        if sent is not None:
            self._ok(sent)
        return True

    def release(self) -> None:
        fence.let_go(self)
        self._stop.set()
        for t in (self._thread, self._watchdog):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=self.renew_s + 10)
        self._thread = self._watchdog = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._held and self._etag is not None and self._lost is None:
            with self._io:  # after any renewal in flight: its ETag is the one to delete
                client, bucket, key = self._s3()
                try:
                    client.delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
                except Exception:  # noqa: BLE001  (lost already, or an outage: it lapses by itself)
                    pass
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> FolderLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


_READERS: dict[str, FolderLock] = {}  # per lease URI: a client kept between a worker's checks


def lease_still_held(token: dict[str, str] | None) -> bool:
    """Whether the folder lease ``token`` (``FolderLock.token``) still names its holder: checked by a Train worker
    before it writes a checkpoint to a leased run folder (one GET), so a stale driver's workers, running on while
    their driver was frozen, stop writing once another driver took the run over. True without a token, and when
    the lease cannot be read now (the holder's own renewals decide then)."""
    if token is None:
        return True
    try:
        lock = _READERS.get(token["uri"])
        if lock is None:
            lock = _READERS[token["uri"]] = FolderLock(Store(token["uri"]))
        current = lock._read()
    except Exception as e:  # noqa: BLE001
        log.warning("%s: could not read the folder lease (%s)", token["uri"].split("?")[0], first_line(e, 200))
        return True
    return current is not None and current[1].get("holder") == token["holder"]
