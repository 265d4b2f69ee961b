"""`simreg export --format onnx`: a real student (exported as a run exports it) to ONNX with a dynamic batch
axis; onnxruntime's outputs match PyTorch's before the file is written; the card records it; bad targets and a
failing parity are one line, and nothing is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from simreg.models.errors import SimRegError
from simreg.orchestrator.cli.main import main
from simreg.orchestrator.config import load_config
from simreg.orchestrator.evaluation import onnx_export
from simreg.orchestrator.evaluation.export import export_student


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    cfg = load_config(None, ["student.arch=resnet10t", "student.input_size=32"])
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=0)
    export_student(model.state_dict(), cfg, tmp_path / "run" / "student", {})
    return tmp_path / "run"


def test_export_to_onnx_matches_pytorch(run_dir: Path, capsys):
    import onnxruntime as ort
    from safetensors.torch import load_file

    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    onnx_file = run_dir / "student" / "student.onnx"
    assert out.startswith(f"{onnx_file}: ONNX opset 18, input (batch, 3, 32, 32); matches PyTorch within ")
    card = json.loads((run_dir / "student" / "student.json").read_text())
    assert card["onnx"]["onnx"] == "student.onnx" and card["onnx"]["parity_max_abs_diff"] <= 1e-4
    model = timm.create_model("resnet10t", num_classes=0)
    model.load_state_dict(load_file(str(run_dir / "student" / "student.safetensors")))
    model.eval()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 130):  # the batch axis is dynamic
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == (batch, 512) and np.abs(got - ref).max() <= 1e-4


def test_a_failing_parity_writes_nothing(run_dir: Path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_export, "parity", lambda *a, **k: 3e-2)
    assert main(["export", str(run_dir / "student" / "student.safetensors"), "--output", str(run_dir / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert "the ONNX export differs from PyTorch by 3.00e-02 (max abs, over 64 inputs; allowed 0.0001): not written" in err
    assert err.count("\n") == 1 and not (run_dir / "x.onnx").exists()


def test_no_student_there_is_one_line(tmp_path: Path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no student weights (student.safetensors) there: pass a run folder or the student file" in err and err.count("\n") == 1


def test_a_bad_card_or_a_remote_output_is_one_line(run_dir: Path, capsys):
    card = run_dir / "student" / "student.json"
    card.write_text("{not json")
    assert main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{card}: not a student card simreg wrote (JSONDecodeError" in err and err.count("\n") == 1
    assert main(["export", str(run_dir), "--output", "s3://bucket/x.onnx"]) == 2
    assert "--output s3://bucket/x.onnx: write the ONNX file to a local path" in capsys.readouterr().err


class _Histogram(torch.nn.Module):
    """A student whose pooled feature goes through torch.histc, an operator ONNX has no counterpart for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(self.conv(x).mean((2, 3)), bins=4).expand(x.shape[0], -1)


def test_a_student_that_does_not_export_is_refused_before_training_naming_the_operator(monkeypatch, capsys, fmnist_root, tmp_path):
    monkeypatch.setattr(onnx_export, "student_network", lambda *a, **k: _Histogram())
    with pytest.raises(SimRegError, match=r"does not export to ONNX: operator aten\.histc\S* is not supported$"):
        onnx_export._export(_Histogram().eval(), 16, "histogram")
    # export.onnx=true: `simreg distill` says so in one line before Ray starts, naming the operator and the fix
    code = main(["distill", "--output-dir", str(tmp_path / "run"), f"data.root={fmnist_root}", "data.train_size=256",
                 "data.knn_bank_size=256", "data.knn_query_size=64", "eval.val_every=0", "cache.enabled=false", "export.onnx=true"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "export.onnx=true: student resnet10t does not export to ONNX: operator aten.histc" in err
    assert "is not supported; set export.onnx=false or choose another student.arch" in err
    assert err.count("\n") == 1 and "\x1b[" not in err and not (tmp_path / "run" / "mlflow.db").exists()
