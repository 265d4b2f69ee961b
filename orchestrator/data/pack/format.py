"""The pack's on-disk format: manifest name and version, the shard schema, the content fingerprint of a row.
"""
from __future__ import annotations

import struct
from typing import Any

import pyarrow as pa

PACK_FORMAT = "simreg-pack"


PACK_VERSION = 1


MANIFEST = "manifest.json"


ALL_SPLIT = "all"  # a folder without train/ + val/: one split, the held-out share is drawn at load time


SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("label", pa.int64()), ("image", pa.binary()), ("path", pa.string()), ("mode", pa.string()),
])


def _row_digest(h: Any, sample_id: int, label: int, image_sha256: bytes) -> None:
    """The content fingerprint of a split: sha256 over (id, label, sha256 of the encoded image) per row,
    independent of shard size, pyarrow version and file names, so re-packing the same folder keeps it."""
    h.update(struct.pack("<qq", sample_id, label))
    h.update(image_sha256)
