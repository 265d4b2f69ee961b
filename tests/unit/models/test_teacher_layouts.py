"""Checkpoints in the layouts of the common SSL codebases, built from a real teacher's weights: each
loads (detected, or named) and gives exactly the original teacher's features."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simreg.models import InputTransform, TeacherLoadError, load_teacher

TF = InputTransform(64, (0.286,) * 3, (0.353,) * 3)


@pytest.fixture(scope="module")
def real(teachers_dir: Path):
    path = teachers_dir / "fmnist_simclr_resnet10t.safetensors"
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    return sd, x, load_teacher("t", "resnet10t", path, TF)(x)


def _junk(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    p = lambda prefix: {prefix + k: v for k, v in sd.items()}  # noqa: E731
    return {
        "plain": {**sd, "fc.weight": _junk(1000, 512), "fc.bias": _junk(1000)},  # a torchvision-style classifier
        "moco": {"state_dict": {**p("module.encoder_q."), "module.encoder_q.fc.0.weight": _junk(512, 512),
                                "module.encoder_q.fc.2.weight": _junk(128, 512), **p("module.encoder_k."),
                                "module.queue": _junk(128, 16)}, "epoch": 200, "arch": "resnet10t"},
        "mocov3": {"state_dict": {**p("module.base_encoder."), "module.base_encoder.head.0.weight": _junk(64, 512),
                                  **p("module.momentum_encoder."), "module.predictor.0.weight": _junk(64, 64)}},
        "swav": {"state_dict": {**p("module."), "module.projection_head.0.weight": _junk(64, 512),
                                "module.prototypes.weight": _junk(30, 64)}},
        "dino": {"teacher": {**p("backbone."), "head.mlp.0.weight": _junk(64, 512)},
                 "student": {**p("module.backbone."), "module.head.mlp.0.weight": _junk(64, 512)}, "epoch": 100},
    }


@pytest.mark.parametrize("layout", ["plain", "moco", "mocov3", "swav", "dino"])
@pytest.mark.parametrize("named", [False, True])
def test_layout_loads_to_identical_features(real, tmp_path: Path, layout: str, named: bool):
    sd, x, ref = real
    f = tmp_path / f"{layout}.pth"
    torch.save(_layouts(sd)[layout], f)
    t = load_teacher("t", "resnet10t", f, TF, layout=layout if named else "auto")
    assert torch.equal(t(x), ref)


def test_wrong_layout_named_lists_keys(real, tmp_path: Path):
    sd, _, _ = real
    f = tmp_path / "moco.pth"
    torch.save(_layouts(sd)["moco"], f)
    with pytest.raises(TeacherLoadError, match=r"closest layout 'plain' has missing keys .*unexpected keys .*module.encoder_k"):
        load_teacher("t", "resnet10t", f, TF, layout="plain")
    with pytest.raises(TeacherLoadError, match="holds no backbone state dict in layout"):
        load_teacher("t", "resnet10t", f, TF, layout="dino")


def test_auto_failure_names_layouts_tried(real, tmp_path: Path):
    sd, _, _ = real
    f = tmp_path / "moco.pth"
    torch.save(_layouts(sd)["moco"], f)
    with pytest.raises(TeacherLoadError) as e:
        load_teacher("t", "resnet18", f, TF, key="teachers.0")
    msg = str(e.value)
    assert "teachers.0.weights=" in msg and "closest layout" in msg and "also tried" in msg
    assert "missing keys" in msg and "unexpected keys" in msg and "teachers.0.format" in msg
