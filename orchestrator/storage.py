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

    # ------------------------------------------------------------------ writes
    def write_bytes(self, data: bytes) -> None:
        """Atomically: a reader sees the old file, or the whole new one."""
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


def stop_driver() -> None:
    """Stop this driver as Ctrl-C would (KeyboardInterrupt in its main thread): its run ends KILLED."""
    import _thread

    _thread.interrupt_main()


def _code(e: Any) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))

LOCK_NAME = ".simreg.lock"
LEASE_S = 30.0  # a remote lease lapses this long after its holder's last renewal
RENEW_S = 10.0


class FolderLock:
    """Held while a driver owns a run folder. Local: ``flock`` (the OS drops it when the process dies).
    S3: a lease object created with a conditional PUT (``If-None-Match: *``) and renewed every ``RENEW_S``
    with ``If-Match`` on its ETag; a driver that dies without releasing it leaves a lease that lapses after
    ``LEASE_S``, and the next driver waits for that instead of failing."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._file: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._etag: str | None = None
        self._client: Any = None
        self._held = False
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
        self._thread = threading.Thread(target=self._renew, name="simreg-lease", daemon=True)
        self._thread.start()
        return self

    # --- S3 lease (boto3: pyarrow has no conditional writes)
    def _s3(self) -> tuple[Any, str, str]:
        if self._client is None:
            import boto3

            q = dict(parse_qsl(urlsplit(self.store.uri).query))
            endpoint = q.get("endpoint_override")
            if endpoint and "://" not in endpoint:
                endpoint = f"{q.get('scheme', 'https')}://{endpoint}"
            self._client = boto3.client("s3", endpoint_url=endpoint, region_name=q.get("region"))
        bucket, _, prefix = self.store.path.partition("/")
        return self._client, bucket, f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + LEASE_S}).encode()

    def _acquire_lease(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client, bucket, key = self._s3()
        seen: tuple[str, float] | None = None  # (etag, when first seen on this host's monotonic clock)
        try:
            while True:
                try:
                    self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")["ETag"]
                    return
                except ClientError as e:
                    if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                        raise
                try:
                    obj = client.get_object(Bucket=bucket, Key=key)
                except ClientError as e:
                    if _code(e) not in ("NoSuchKey", "404"):
                        raise
                    continue  # released meanwhile: try again
                etag, lease = obj["ETag"], json.loads(obj["Body"].read() or b"{}")
                if seen is not None and seen[0] != etag:  # renewed while we waited: its driver is alive
                    raise ConfigError(
                        f"{self.store} is in use by another simreg driver ({lease.get('holder', '?')}): wait for it, or choose another --output-dir"
                    )
                if seen is None:
                    seen = (etag, time.monotonic())
                # Lapsed: unchanged for LEASE_S by this host's own clock, or expired LEASE_S ago by the holder's
                # (a margin for clocks that differ between hosts).
                if time.monotonic() - seen[1] >= LEASE_S or time.time() > float(lease.get("expires", 0)) + LEASE_S:
                    try:  # take it over, unless someone else just did
                        client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
                    except ClientError as e:
                        if _code(e) not in ("PreconditionFailed", "NoSuchKey", "404"):
                            raise
                    seen = None
                    continue
                if time.monotonic() - seen[1] < 0.01:
                    log.info("%s: waiting up to %.0f s for the lease of %s (a driver that died leaves it until it lapses)",
                             self.store, LEASE_S, lease.get("holder", "?"))
                time.sleep(1.0)
        except (ClientError, BotoCoreError) as e:
            raise ConfigError(
                f"--output-dir {self.store}: cannot take the folder's lease ({first_line(e)}); the store must accept conditional writes "
                "(If-None-Match / If-Match); check AWS_ENDPOINT_URL and the credentials"
            ) from None

    def _renew(self) -> None:
        """Renew every RENEW_S. A lease another driver took over, or one not renewed for LEASE_S (an outage), is
        lost: this driver stops (KeyboardInterrupt in its main thread), so two drivers never write one run."""
        client, bucket, key = self._s3()
        last_ok = time.monotonic()
        while not self._stop.wait(RENEW_S):
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfMatch=self._etag)["ETag"]
                last_ok = time.monotonic()
                continue
            except Exception as e:  # noqa: BLE001  (an outage is retried at the next renewal)
                taken = getattr(e, "response", {}).get("Error", {}).get("Code") in ("PreconditionFailed", "NoSuchKey")
                if not taken and time.monotonic() - last_ok < LEASE_S:
                    log.warning("%s: could not renew the folder lease (%s)", self.store, first_line(e, 200))
                    continue
            log.error("%s: lost the folder lease (%s): stopping this driver; rerun the command to resume",
                      self.store, "another driver took it over" if taken else "not renewed in time")
            self._thread = None
            stop_driver()
            return

    def release(self) -> None:
        self._held = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            client, bucket, key = self._s3()
            try:
                client.delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception:  # noqa: BLE001  (lost already: it lapses by itself)
                pass

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> FolderLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
