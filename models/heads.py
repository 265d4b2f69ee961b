"""Prediction heads g_k that map the student's pooled feature to teacher k's feature space.

Used only while distilling and discarded afterwards. Layouts:
- ``paper``: the paper's MLP, every non-final layer Linear -> BatchNorm1d -> ReLU, final layer Linear.
  Depth 4 with width_mult 2 gives the paper's "4L-MLP" widths (m, 2m, m, 2m, d); depth 1 is the linear
  baseline.
- ``official``: the released code's layout, kept as a named variant for comparison: depth 4 is a
  BYOL-style 2-layer projection (Linear-BN-ReLU-Linear) followed by a 2-layer prediction of the same
  form; its depth 2 has no non-linearity at all (Linear-Linear), as in the released code.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.nn as nn

from simreg.models.errors import ModelError

HeadBuilder = Callable[[list[int]], nn.Sequential]
HEAD_LAYOUTS: dict[str, HeadBuilder] = {}


def register_layout(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    def deco(fn: HeadBuilder) -> HeadBuilder:
        HEAD_LAYOUTS[name] = fn
        return fn

    return deco


def head_widths(student_dim: int, teacher_dim: int, depth: int, width_mult: float) -> list[int]:
    """Layer widths from input to output: hidden layers alternate ``width_mult * m`` and ``m``.

    depth 1 -> [m, d]; depth 2 -> [m, 2m, d]; depth 4 -> [m, 2m, m, 2m, d] (for width_mult 2).
    """
    if depth < 1:
        raise ModelError(f"heads.depth={depth} is invalid: use 1 (linear head) or more layers")
    if width_mult <= 0:
        raise ModelError(f"heads.width_mult={width_mult} is invalid: use a positive multiple, e.g. 2")
    wide = max(1, int(round(student_dim * width_mult)))
    hidden = [wide if i % 2 == 0 else student_dim for i in range(depth - 1)]
    return [student_dim, *hidden, teacher_dim]


@register_layout("paper")
def _paper(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        last = i == len(widths) - 2
        layers.append(nn.Linear(a, b, bias=last))  # BN follows the hidden layers: their bias is redundant
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@register_layout("official")
def _official(widths: list[int]) -> nn.Sequential:
    depth = len(widths) - 1
    if depth == 2:
        # The released code's "2L" head: two Linear layers and no non-linearity.
        return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Linear(widths[1], widths[2]))
    if depth == 4:
        m, h1, m2, h2, d = widths
        return nn.Sequential(
            nn.Linear(m, h1), nn.BatchNorm1d(h1), nn.ReLU(inplace=True), nn.Linear(h1, m2),
            nn.Linear(m2, h2), nn.BatchNorm1d(h2), nn.ReLU(inplace=True), nn.Linear(h2, d),
        )
    raise ModelError(
        f"heads.layout='official' exists only for depth 2 and 4 (got depth {depth}): "
        "use heads.layout=paper for other depths"
    )


def build_head(
    student_dim: int, teacher_dim: int, depth: int = 4, width_mult: float = 2.0, layout: str = "paper"
) -> nn.Sequential:
    """One head g_k: (B, student_dim) -> (B, teacher_dim)."""
    if layout not in HEAD_LAYOUTS:
        raise ModelError(f"heads.layout={layout!r} is unknown: valid layouts are {sorted(HEAD_LAYOUTS)}")
    return HEAD_LAYOUTS[layout](head_widths(student_dim, teacher_dim, depth, width_mult))


def head_prefix(head: nn.Sequential, layers: int) -> nn.Sequential:
    """The first ``layers`` layers of a head, each with the BatchNorm/ReLU that follows it (the paper's
    Table 2 evaluates the student's feature after k head layers). ``layers`` = depth is the whole head."""
    starts = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    if not 0 <= layers <= len(starts):
        raise ModelError(f"a head of depth {len(starts)} has no prefix of {layers} layers: use 0..{len(starts)}")
    end = starts[layers] if layers < len(starts) else len(head)
    return nn.Sequential(*list(head)[:end])


def build_heads(
    student_dim: int,
    teacher_dims: Mapping[str, int],
    depth: int = 4,
    width_mult: float = 2.0,
    layout: str = "paper",
) -> nn.ModuleDict:
    """An independent head per teacher, keyed by teacher name."""
    return nn.ModuleDict(
        {name: build_head(student_dim, d, depth, width_mult, layout) for name, d in teacher_dims.items()}
    )
