"""Teacher weights are tensors only: a file holding a pickled object is refused in one line, and its code never runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from simreg.models.errors import TeacherLoadError
from simreg.models.teachers import InputTransform, load_teacher, read_weights_file

TF = InputTransform(32, (0.5,) * 3, (0.5,) * 3)


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # a plain pickle load would create the marker file
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("obj, named", [
    (lambda m: {"w": _WritesMarker(m)}, "getattr"),  # code (Path.touch, reached through getattr)
    (lambda m: nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),  # a whole module, not its state dict
    (lambda m: {"w": np.zeros(3)}, "numpy"),  # a numpy array
], ids=["code", "module", "numpy"])
def test_pickled_objects_refused_in_one_line(tmp_path: Path, obj, named: str):
    marker, f = tmp_path / "pwned", tmp_path / "teacher.pt"
    torch.save(obj(marker), f)
    with pytest.raises(TeacherLoadError) as e:
        load_teacher("t", "resnet10t", f, TF)
    msg = str(e.value)
    assert msg.startswith(f"cannot read teacher weights {str(f)!r}: it holds a pickled {named}") and "weights_only=True" in msg
    assert "\n" not in msg and "torch.save(model.state_dict(), path)" in msg
    assert not marker.exists()


def test_tensors_only_file_loads(tmp_path: Path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ok.pt")
    assert torch.equal(read_weights_file(tmp_path / "ok.pt")["state_dict"]["w"], torch.ones(2))


@pytest.mark.parametrize("obj", [[1, 2], {"a": "b"}, torch.zeros(3)], ids=["list", "dict-of-str", "tensor"])
def test_no_state_dict_is_one_line(tmp_path: Path, obj):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(TeacherLoadError, match=r"holds no backbone state dict .*save the backbone's state_dict\(\)$"):
        load_teacher("t", "resnet10t", tmp_path / "x.pt", TF)
