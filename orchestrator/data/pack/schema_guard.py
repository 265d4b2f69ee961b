"""Parquet files from user storage (pack shards, target-cache shards) checked against their exact schema
before any column is read.

A Parquet file written by pyarrow carries its Arrow schema in the footer (``ARROW:schema``), and a column
there may be declared with an Arrow extension type registered in this process. Ray registers
``ray.data.arrow_pickled_object`` (``import ray.data``, ``import ray.train``), whose values are
``pickle.loads`` of the stored bytes as soon as a column is turned into Python objects or numpy; other
registered types run their own deserialiser on the footer's bytes when the schema is merely read
(``pq.read_schema``, ``pq.read_metadata`` and ``pq.ParquetFile`` all do). So the schema is read here from
the raw footer, with every extension key renamed before Arrow parses it: no extension type is built, and
a file declaring any (at any depth) is refused, as is any column name or type simreg does not write.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow._parquet import _reconstruct_filemetadata  # thrift footer -> FileMetaData; builds no Arrow schema

from simreg.models.errors import DataError, first_line
from simreg.orchestrator.storage import Store, open_store

_MAGIC = b"PAR1"
_MAX_FOOTER = 64 << 20  # a simreg shard's footer is a few KiB; a larger claim is a damaged or hostile file
_EXT_KEY = b"ARROW:extension:name"
_INERT_KEY = b"simreg:extension:nam"  # same length: the flatbuffer stays valid, Arrow sees plain metadata


class UnreadableParquet(DataError):
    """The file is no readable Parquet file (truncated, empty, not Parquet): its footer cannot be parsed."""


def _open(src: str | Store | bytes) -> Any:
    if isinstance(src, bytes):
        return pa.BufferReader(src)
    src = open_store(src)
    return src.fs.open_input_file(src.path)


def _name(src: str | Store | bytes) -> str:
    return "the bytes read" if isinstance(src, bytes) else str(open_store(src))


def _footer(src: str | Store | bytes) -> bytes:
    with _open(src) as f:
        size = f.size()
        if size < 12:
            raise UnreadableParquet(f"it is {size} bytes long, no Parquet file")
        f.seek(size - 8)
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != _MAGIC or not 0 < n <= min(size - 12, _MAX_FOOTER):
            raise UnreadableParquet("it does not end in a plain Parquet footer (truncated, encrypted or not Parquet)")
        f.seek(size - 8 - n)
        return bytes(f.read(n))


def _extension_names(t: pa.DataType, meta: Any) -> list[str]:
    """Extension names declared on a field (renamed key in ``meta``) or on any field nested in ``t``."""
    own = [meta[_INERT_KEY].decode(errors="replace")] if meta and _INERT_KEY in meta else []
    return own + [n for i in range(t.num_fields) for n in _extension_names(t.field(i).type, t.field(i).metadata)]


def footer_metadata(src: str | Store | bytes) -> Any:
    """A Parquet file's footer (``pq.FileMetaData``: row counts, key-value metadata, the Parquet schema),
    parsed from its raw bytes without building an Arrow schema. ``UnreadableParquet`` when it cannot be."""
    if not isinstance(src, bytes):
        src = open_store(src)
    try:
        return _reconstruct_filemetadata(pa.py_buffer(_footer(src)))
    except UnreadableParquet:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        raise UnreadableParquet(f"its footer cannot be parsed ({first_line(e)})") from e


def declared_columns(src: str | Store | bytes) -> tuple[dict[str, pa.DataType], dict[str, list[str]], int]:
    """({column: Arrow type}, {column: extension names declared in it}, extension declarations in all)
    of a Parquet file, read from its raw footer without building any Arrow extension type. Raises
    ``UnreadableParquet`` for a file whose footer or Arrow schema cannot be parsed."""
    md = footer_metadata(src)
    try:
        kv = md.metadata or {}
        if b"ARROW:schema" not in kv:
            raise UnreadableParquet("it carries no Arrow schema, so simreg (pyarrow) did not write it")
        raw = base64.b64decode(kv[b"ARROW:schema"], validate=True)
        schema = pa.ipc.read_schema(pa.py_buffer(raw.replace(_EXT_KEY, _INERT_KEY)))
    except UnreadableParquet:
        raise
    except (OSError, ValueError, binascii.Error, pa.ArrowException) as e:
        raise UnreadableParquet(f"its Arrow schema cannot be parsed ({first_line(e)})") from e
    names = [f.name for f in schema]
    if len(set(names)) != len(names):
        raise UnreadableParquet(f"it declares duplicate columns {names}")
    types = {f.name: f.type for f in schema}
    exts = {f.name: found for f in schema if (found := _extension_names(f.type, f.metadata))}
    return types, exts, raw.count(_EXT_KEY)


def schema_problems(types: dict[str, pa.DataType], exts: dict[str, list[str]], n_ext: int, expected: pa.Schema) -> list[str]:
    """How declared columns differ from ``expected`` (names and exact types; no extension type anywhere)."""
    want = {f.name: f.type for f in expected}
    out = [f"column {n!r} ({types[n]}) is not one simreg writes" for n in types if n not in want]
    out += [f"column {n!r} ({t}) is missing" for n, t in want.items() if n not in types]
    for n, t in want.items():
        if n in exts:
            out.append(f"column {n!r} is the Arrow extension type {' / '.join(exts[n])} (expected {t})")
        elif n in types and not types[n].equals(t):
            out.append(f"column {n!r} is {types[n]} (expected {t})")
    if n_ext and not exts:
        out.append(f"its schema declares {n_ext} Arrow extension type(s)")
    return out


def check_parquet(src: str | Store | bytes, expected: pa.Schema, what: str, fix: str, name: str | None = None) -> None:
    """Refuse (DataError naming the file, what differs and ``fix``) a file whose schema is not ``expected``.
    ``name``: the file's name in messages when ``src`` is its bytes."""
    shown = name or _name(src)
    try:
        problems = schema_problems(*declared_columns(src), expected)
    except UnreadableParquet as e:
        raise UnreadableParquet(f"{what} {shown!r} is unreadable: {e}. {fix}") from None
    if problems:
        raise DataError(f"{what} {shown!r} is not what simreg writes, so nothing in it is read: {'; '.join(problems)}. {fix}")


def read_checked(src: str | Store | bytes, expected: pa.Schema, what: str, fix: str,
                 columns: Sequence[str] | None = None, name: str | None = None, **kw: Any) -> pa.Table:
    """``columns`` of a Parquet file (or its bytes) whose schema ``check_parquet`` accepted; the table read is
    checked again (a file replaced in between), before any of its values reach Python."""
    if not isinstance(src, bytes):
        src = open_store(src)
    shown = name or _name(src)
    check_parquet(src, expected, what, fix, shown)
    cols = list(columns) if columns is not None else None
    if isinstance(src, bytes):
        t = pq.read_table(pa.BufferReader(src), columns=cols, **kw)
    else:
        t = pq.read_table(src.path, filesystem=src.fs, columns=cols, **kw)
    bad = [f"{f.name}: {f.type}" for f in t.schema if f.name not in expected.names or not f.type.equals(expected.field(f.name).type)]
    if bad:
        raise DataError(f"{what} {shown!r} changed while it was read ({', '.join(bad)}): nothing in it is used. {fix}")
    return t
