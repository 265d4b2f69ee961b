"""``teachers[i].weights=random`` (seed 0) or ``random:SEED``: a teacher with no weights file, its timm backbone
randomly initialised under SEED. Light on purpose (no torch, no timm): the config validates with it.

Distilling from a random teacher is a documented baseline: it needs no file, so any timm architecture can be a
teacher in smoke tests and scale runs. A file literally named ``random`` is written ``./random``.
"""
from __future__ import annotations

import os

RANDOM = "random"
MAX_SEED = 2**63 - 1


def names_random(weights: str | os.PathLike[str]) -> bool:
    """Whether ``weights`` is spelt as a random teacher (``random`` or ``random:...``), valid or not."""
    w = str(weights)
    return w == RANDOM or w.startswith(RANDOM + ":")


def random_init_seed(weights: str | os.PathLike[str]) -> int | None:
    """SEED of ``random`` (0) or ``random:SEED``; None for any other value (a weights file). Raises ``ValueError``
    (its message names the fix) for ``random:`` followed by anything but a whole number 0..2^63-1."""
    w = str(weights)
    if not names_random(w):
        return None
    if w == RANDOM:
        return 0
    tail = w[len(RANDOM) + 1 :]
    if not (tail.isascii() and tail.isdigit()) or int(tail) > MAX_SEED:
        raise ValueError(f"{w!r} is not random:SEED with a whole number SEED >= 0: write e.g. random:7 (random alone is seed 0), "
                         "or ./random:x for a file of that name")
    return int(tail)


def random_weights_ref(seed: int) -> str:
    """The one spelling of a random teacher's weights (``random`` and ``random:0`` are the same teacher)."""
    return f"{RANDOM}:{seed}"
