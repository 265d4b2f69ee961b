from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from simreg.models import ModelError, build_head, build_heads, head_widths, simreg_loss
from simreg.models.step import SimRegObjective
from simreg.models.teachers import InputTransform


def _layout(head: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in head]


def test_paper_4l_widths_and_layout():
    assert head_widths(512, 2048, 4, 2.0) == [512, 1024, 512, 1024, 2048]
    head = build_head(512, 2048, depth=4, width_mult=2.0)
    assert _layout(head) == ["Linear", "BatchNorm1d", "ReLU"] * 3 + ["Linear"]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 1024), (1024, 512), (512, 1024), (1024, 2048)]
    assert head.eval()(torch.randn(3, 512)).shape == (3, 2048)


def test_linear_head_and_width_mult():
    assert _layout(build_head(64, 10, depth=1)) == ["Linear"]
    assert head_widths(64, 10, 3, 4.0) == [64, 256, 64, 10]


def test_official_layout_matches_released_code():
    h4 = build_head(8, 16, depth=4, width_mult=2.0, layout="official")
    assert _layout(h4) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert _layout(build_head(8, 16, depth=2, layout="official")) == ["Linear", "Linear"]  # the code's linear "2L"
    with pytest.raises(ModelError, match="depth 2 and 4"):
        build_head(8, 16, depth=3, layout="official")


def test_bad_head_design_named():
    with pytest.raises(ModelError, match=r"heads.depth=0"):
        build_head(8, 16, depth=0)
    with pytest.raises(ModelError, match=r"heads.layout='mlp'.*valid layouts"):
        build_head(8, 16, layout="mlp")


def test_independent_head_per_teacher():
    heads = build_heads(32, {"a": 16, "b": 8}, depth=2)
    assert set(heads) == {"a", "b"}
    assert heads["a"].eval()(torch.randn(2, 32)).shape == (2, 16)
    assert heads["b"].eval()(torch.randn(2, 32)).shape == (2, 8)
    assert not set(map(id, heads["a"].parameters())) & set(map(id, heads["b"].parameters()))


def test_loss_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    # row 0: orthogonal -> 2 - 0 = 2; row 1: identical direction -> 0; mean = 1
    assert simreg_loss(pred, target).item() == pytest.approx(1.0)
    pred2 = torch.tensor([[1.0, 1.0]])
    target2 = torch.tensor([[1.0, 0.0]])
    assert simreg_loss(pred2, target2).item() == pytest.approx(2 - 2 / math.sqrt(2), abs=1e-6)


def test_loss_scale_invariant_and_fp16_target():
    torch.manual_seed(0)
    p, t = torch.randn(5, 7), torch.randn(5, 7)
    ref = simreg_loss(p, t)
    assert simreg_loss(3 * p, 0.5 * t.half()).item() == pytest.approx(ref.item(), abs=1e-3)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_objective_averages_teachers_with_weights():
    torch.manual_seed(0)
    tf = InputTransform(8, (0.5,) * 3, (0.5,) * 3)
    obj = SimRegObjective(_Tiny(), tf, {"a": 6, "b": 3}, depth=2, teacher_weights={"a": 3.0, "b": 1.0})
    view = torch.rand(4, 1, 8, 8)
    out = obj(view, {"a": torch.randn(4, 6), "b": torch.randn(4, 3)})
    assert set(out) == {"loss", "loss/a", "loss/b", "cos/a", "cos/b"}
    assert out["loss"].item() == pytest.approx(0.75 * out["loss/a"].item() + 0.25 * out["loss/b"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in obj.parameters())
