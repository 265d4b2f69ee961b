"""Teacher weights from where users keep them, as a local file on whatever node loads them.

    teachers.0.weights=s3://bucket/teachers/dino.safetensors    # gs://, abfs:// too (the storage layer)
    teachers.0.weights=https://example.org/weights/dino.safetensors
    teachers.0.weights=hf-hub:timm/resnet18.a1_in1k              # the Hugging Face Hub (@REVISION optional)
    teachers.0.sha256=<64 hex>                                   # optional pin, checked before use

A bucket or https file is fetched once per node into a content-addressed cache (``SIMREG_WEIGHTS_CACHE``,
default ``~/.cache/simreg/weights``: ``<sha256><suffix>``), with an index per reference; a bucket object is
fetched again when its size, modification time or (S3) ETag changed; a URL is fetched once (pin it). With a
pin whose file is in the cache, nothing is asked of the store. A Hub model comes from the Hugging Face cache
(``HF_HOME``; offline with ``HF_HUB_OFFLINE=1``). The sha256 of the bytes a teacher loads stays in the target
cache's key. Every failure is one line naming the reference and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from simreg.models.errors import TeacherLoadError, first_line

HUB_PREFIX = "hf-hub:"
STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")
URL_SCHEMES = ("http", "https")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hub repos hold, in the order tried


def is_fetched(ref: str) -> bool:
    """Whether ``ref`` names weights that are not a local path (a bucket, a URL, the Hub)."""
    return ref.startswith(HUB_PREFIX) or urlsplit(ref).scheme.lower() in (*STORE_SCHEMES, *URL_SCHEMES)


def cache_dir() -> Path:
    return Path(os.environ.get("SIMREG_WEIGHTS_CACHE") or Path.home() / ".cache" / "simreg" / "weights").expanduser()


def local_weights(ref: str, sha256: str | None = None, key: str = "teachers[0]") -> str:
    """A local file holding ``ref``'s bytes (``ref`` itself when it is a local path), checked against the pin
    ``sha256`` when one is given."""
    pinned = sha256 is not None and is_fetched(ref) and not ref.startswith(HUB_PREFIX) and next(
        iter(cache_dir().glob(f"{sha256.lower()}.*")), None)
    if pinned:  # the pinned bytes are on this node already: nothing to ask the store
        path = str(pinned)
    elif not is_fetched(ref):
        path = ref
    elif ref.startswith(HUB_PREFIX):
        path = _from_hub(ref, key)
    else:
        path = _fetched(ref, key, sha256)
    if sha256 is not None:
        got = weights_sha256(path) if Path(path).is_file() else None
        if got is None:
            raise TeacherLoadError(f"{key}.weights={ref!r}: no file to check the pin {key}.sha256 against")
        if got != sha256.lower():
            raise TeacherLoadError(f"{key}.weights={ref!r} has sha256 {got}, not the pinned {key}.sha256={sha256}: "
                                   "the file changed; pin the new hash if it is the teacher you mean, or restore the file")
    return path


_SHA_MEMO: dict[tuple[str, int, int, int, int, int], str] = {}
RACY_NS = 2_000_000_000  # a file changed this recently is hashed again next time (coarse filesystem timestamps)


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file as it is now: the key a driver builds before any teacher loads (a loaded teacher
    keys its targets by the bytes it loaded, ``Teacher.weights_sha256``). Remembered within a process per file
    version: path, device, inode, size, mtime and ctime. A file replaced by a rename has another inode; one
    rewritten in place, or whose mtime was set back, has a new ctime (nothing sets it back). Within one tick of
    the filesystem's clock a change can keep every field, so a file changed less than ``RACY_NS`` before it is
    hashed is not remembered, nor one that changed while it was read."""
    p = Path(path)
    with open(p, "rb") as f:  # stat and hash the one file opened, whatever is renamed over the path meanwhile
        st = os.fstat(f.fileno())
        memo = (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if memo in _SHA_MEMO:
            return _SHA_MEMO[memo]
        started = time.time_ns()
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        after = os.fstat(f.fileno())
    digest = h.hexdigest()
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == memo[3:] and started - st.st_ctime_ns >= RACY_NS:
        _SHA_MEMO[memo] = digest
    return digest


def _index(ref: str) -> Path:
    return cache_dir() / "by-ref" / f"{hashlib.sha1(ref.encode()).hexdigest()}.json"


def _fetched(ref: str, key: str, sha256: str | None = None) -> str:
    """A bucket object or a URL, from this node's cache or fetched into it (one process at a time per reference:
    the teacher actors of one node fetch it once). A cached file that is not the pinned one is fetched again."""
    import fcntl

    cache_dir().mkdir(parents=True, exist_ok=True)
    lock = _index(ref).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        return _fetch_locked(ref, key, sha256)


def _fetch_locked(ref: str, key: str, sha256: str | None) -> str:
    scheme = urlsplit(ref).scheme.lower()
    stamp: dict[str, object] = {}
    if scheme in STORE_SCHEMES:
        from simreg.orchestrator.storage import Store

        try:
            store = Store(ref)
            info = store._info()
            import pyarrow.fs as pafs

            if info.type != pafs.FileType.File:
                raise TeacherLoadError(f"{key}.weights={ref!r} does not exist (or is not a file): check the URI")
        except TeacherLoadError:
            raise
        except Exception as e:  # noqa: BLE001  (credentials, endpoint, network: the storage layer's own line)
            raise TeacherLoadError(f"{key}.weights={ref!r}: cannot read it ({first_line(e)}); check the URI and the store's "
                                   "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)") from None
        try:
            etag = store.etag()
        except Exception as e:  # noqa: BLE001
            raise TeacherLoadError(f"{key}.weights={ref!r}: cannot read it ({first_line(e)}); check the URI and the store's "
                                   "credentials") from None
        stamp = {"size": info.size, "mtime_ns": info.mtime_ns, "etag": etag}
    index = _index(ref)
    try:
        known = json.loads(index.read_text())
        path = cache_dir() / known["file"]
        fresh = all(known.get(k) == v for k, v in stamp.items()) and (sha256 is None or path.name.startswith(sha256.lower()))
        if path.is_file() and path.stat().st_size == known["size"] and fresh:
            return str(path)  # fetched before on this node, unchanged since
    except (OSError, ValueError, KeyError):
        pass
    suffix = Path(urlsplit(ref).path).suffix or ".bin"
    fd, tmp_name = tempfile.mkstemp(prefix=".fetch-", dir=cache_dir())
    os.fchmod(fd, 0o666 & ~_umask())  # as any file this user writes: a cache several users share stays readable
    tmp = Path(tmp_name)
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            for chunk in _chunks(ref, scheme, key):
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        path = cache_dir() / f"{h.hexdigest()}{suffix}"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    from simreg.orchestrator.storage import write_atomic

    record = json.dumps({"ref": ref, "file": path.name, "size": size, **stamp})
    write_atomic(index, lambda t: t.write_text(record))
    return str(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chunks(ref: str, scheme: str, key: str, chunk: int = 8 << 20):  # noqa: ANN202
    try:
        if scheme in STORE_SCHEMES:
            from simreg.orchestrator.storage import Store

            store = Store(ref)
            with store.fs.open_input_stream(store.path) as f:
                while data := f.read(chunk):
                    yield bytes(data)
            return
        with urllib.request.urlopen(ref, timeout=60) as r:  # noqa: S310  (the user's own URL)
            while data := r.read(chunk):
                yield data
    except TeacherLoadError:
        raise
    except Exception as e:  # noqa: BLE001  (the command redacts the line it prints)
        raise TeacherLoadError(f"{key}.weights={ref!r}: cannot fetch it ({first_line(e)}); check the URL or URI and that this "
                               "node can reach it") from None


def _from_hub(ref: str, key: str) -> str:
    """``hf-hub:ORG/NAME[@REVISION]``: the repo's weights file from the Hugging Face cache (downloaded into it
    unless ``HF_HUB_OFFLINE=1``)."""
    repo, _, revision = ref[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1:
        raise TeacherLoadError(f"{key}.weights={ref!r}: write hf-hub:ORG/NAME (e.g. hf-hub:timm/resnet18.a1_in1k)")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise TeacherLoadError(f"{key}.weights={ref!r}: huggingface_hub is not installed (pip install huggingface_hub)") from None
    last: Exception | None = None
    for filename in HUB_FILES:
        try:
            return str(hf_hub_download(repo, filename, revision=revision or None))
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            last = e
        except RepositoryNotFoundError:
            raise TeacherLoadError(f"{key}.weights={ref!r}: no such repository on the Hub (or it is private: set HF_TOKEN)") from None
        except Exception as e:  # noqa: BLE001  (network, auth)
            raise TeacherLoadError(f"{key}.weights={ref!r}: cannot fetch it from the Hub ({first_line(e)})") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    raise TeacherLoadError(
        f"{key}.weights={ref!r}: none of {list(HUB_FILES)} "
        + ("is in the local Hugging Face cache and HF_HUB_OFFLINE=1: fetch it once where the Hub is reachable "
           "(huggingface-cli download " + repo + "), or set HF_HOME to a cache that holds it" if offline
           else f"found ({first_line(last) if last else 'not in the repository'})")
    )
