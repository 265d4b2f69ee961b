"""``Requester``: who asks a teacher fleet actor for targets. Its own module, importing no torch and no teacher
code: the view stage's processes unpickle it with every block they send."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able value (the form of the cache's key digests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Requester:
    """A run's part of a target's identity, as a fleet actor needs it.

    ``cache_root``: where the run caches targets (None: not cached); ``data_fingerprint`` and ``views`` (the
    teachers' view recipe and the view seed) complete the cache key with the actor's teacher fingerprint. Two
    runs with the same ``views_key`` render identical views for a (view index, sample id), so one forward serves
    both; a run without a data fingerprint never shares."""

    cache_root: str | None = None
    data_fingerprint: str | None = None
    views: dict[str, Any] = field(default_factory=dict)
    memory_mib: float = 256.0  # cache.memory_mib: decoded shards the actor keeps (not part of any identity)

    @property
    def views_key(self) -> str | None:
        return digest({"data": self.data_fingerprint, "views": self.views}) if self.data_fingerprint else None

    @property
    def cache_id(self) -> str | None:
        """The cache's identity without its teacher part (the actor adds its own fingerprint)."""
        if self.cache_root is None or not self.data_fingerprint:
            return None
        return digest({"root": self.cache_root, "data": self.data_fingerprint, "views": self.views})
