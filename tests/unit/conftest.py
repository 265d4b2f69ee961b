from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Unit tests never start Ray: a bad-input test that got as far as ray.init would fail here, fast."""
    import ray

    def refuse(*_a, **_k):
        raise AssertionError("a unit test tried to start Ray: the input should have been rejected before")

    monkeypatch.setattr(ray, "init", refuse)
