"""The student backbone as ONNX, checked against PyTorch before the file is written.

    simreg export runs/demo --format onnx                       # -> runs/demo/student/student.onnx
    simreg export runs/demo/student/student.safetensors --format onnx --output /tmp/student.onnx

The exported model takes (batch, 3, size, size) float32 input, normalised as the student's card says
(``student.json``), with a dynamic batch axis, and returns the pooled feature (batch, dim). Before the file
is written, onnxruntime runs it on 64 random inputs and its outputs must match PyTorch's within 1e-4 (max
absolute difference, fp32); the card beside it records the opset and the difference measured.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simreg.models.errors import ConfigError, SimRegError, first_line
from simreg.orchestrator.storage import write_atomic

OPSET = 18
PARITY_INPUTS = 64
PARITY_TOL = 1e-4


def student_files(target: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the student's safetensors file, its card) from a run folder, its ``student/`` folder or the file."""
    p = Path(target).expanduser()
    weights = p / "student" / "student.safetensors" if (p / "student").is_dir() else p / "student.safetensors" if p.is_dir() else p
    card = weights.with_suffix(".json")
    if not weights.is_file():
        raise ConfigError(f"{target}: no student weights (student.safetensors) there: pass a run folder or the student file")
    if not card.is_file():
        raise ConfigError(f"{weights}: its card {card.name} is missing (it holds the architecture and input size): export it with simreg")
    try:
        info = json.loads(card.read_text())
        info["arch"], int(info["input"]["size"])  # noqa: B018  (what an export needs)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{card}: not a student card simreg wrote ({type(e).__name__}: {first_line(e)}): export the student again") from None
    return weights, info


def export_onnx(target: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Export the student of ``target`` (``student_files``) to ONNX at ``output`` (default: beside it, ``.onnx``)
    after the parity check; returns what the card records of it."""
    from safetensors.torch import load_file

    from simreg.models.students import build_backbone

    if output is not None and "://" in str(output):
        raise ConfigError(f"--output {output}: write the ONNX file to a local path (then copy it where it goes)")
    weights, card = student_files(target)
    out = Path(output).expanduser() if output is not None else weights.with_suffix(".onnx")
    model = build_backbone(card["arch"], key=f"{weights.with_suffix('.json')} arch", model_kwargs=card.get("model_kwargs", {}))
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as e:  # noqa: BLE001  (a damaged file, another architecture's weights)
        raise ConfigError(f"{weights}: cannot load it into {card['arch']} ({type(e).__name__}: {first_line(e, 200)}): "
                          "check the file and its card") from None
    model.eval()
    size = int(card["input"]["size"])
    onnx_bytes = _export(model, size, card["arch"])
    diff = parity(model, onnx_bytes, size)
    if not diff <= PARITY_TOL:
        raise SimRegError(f"{weights}: the ONNX export differs from PyTorch by {diff:.2e} (max abs, over {PARITY_INPUTS} inputs; "
                          f"allowed {PARITY_TOL:g}): not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda t: t.write_bytes(onnx_bytes))
    record = {"onnx": str(out), "opset": OPSET, "input": [None, 3, size, size], "parity_max_abs_diff": diff,
              "parity_inputs": PARITY_INPUTS}
    card["onnx"] = {**record, "onnx": out.name}
    text = json.dumps(card, indent=2)
    write_atomic(weights.with_suffix(".json"), lambda t: t.write_text(text))
    return record


def _export(model: torch.nn.Module, size: int, arch: str) -> bytes:
    x = torch.randn(2, 3, size, size)
    with tempfile.TemporaryDirectory(prefix="simreg-onnx-") as d:
        path = Path(d) / "student.onnx"
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=OPSET, verbose=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}}, external_data=False)
        except Exception as e:  # noqa: BLE001  (the exporter's own error: name the operator when it says one)
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the exporter colours its messages
            op = re.search(r"(aten::[\w.]+|aten\.[\w.]+)", text)
            raise SimRegError(f"student {arch} does not export to ONNX: "
                              + (f"operator {op.group(1)} is not supported" if op else first_line(text, 300))) from None
        return path.read_bytes()


def student_network(arch: str, model_kwargs: dict[str, Any]) -> torch.nn.Module:
    """The student's backbone, randomly initialised (what ``check_exports`` tries)."""
    from simreg.models.students import build_backbone

    return build_backbone(arch, key="student.arch", model_kwargs=model_kwargs)


def check_exports(arch: str, size: int, model_kwargs: dict[str, Any] | None = None) -> None:
    """``export.onnx=true``: the student exports, tried on its randomly initialised network before any training (the
    operators are the trained network's); SimRegError naming the operator and the fix otherwise."""
    model = student_network(arch, model_kwargs or {}).eval()
    try:
        _export(model, size, arch)
    except SimRegError as e:
        raise ConfigError(f"export.onnx=true: {e}; set export.onnx=false or choose another student.arch") from None


def parity(model: torch.nn.Module, onnx_bytes: bytes, size: int, n: int = PARITY_INPUTS) -> float:
    """The largest absolute difference between PyTorch's and onnxruntime's outputs on ``n`` random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max())
