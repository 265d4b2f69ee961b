"""Export the student backbone: safetensors loadable by ``timm.create_model(arch, num_classes=0)``
with ``strict=True``, plus a JSON card with the input transform it was trained on."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from simreg.orchestrator.config import SimRegConfig


def export_student(backbone_state: dict[str, torch.Tensor], cfg: SimRegConfig, out_dir: Path, extra: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "student.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in backbone_state.items()}, str(path),
              metadata={"arch": cfg.student.arch, "format": "timm-backbone", "producer": "simreg"})
    card = {
        "arch": cfg.student.arch,
        "model_kwargs": dict(cfg.student.model_kwargs),
        "load": f"timm.create_model({cfg.student.arch!r}, num_classes=0{''.join(f', {k}={v!r}' for k, v in cfg.student.model_kwargs.items())})"
        ".load_state_dict(safetensors.torch.load_file(path), strict=True)",
        "input": {
            "size": cfg.student_input_size,
            "mean": list(cfg.student.mean),
            "std": list(cfg.student.std),
            "note": "RGB in [0, 1], resized to size, then (x - mean) / std; grayscale images repeated over 3 channels",
        },
        "teachers": [{"name": t.name, "arch": t.arch, "weights": t.weights} for t in cfg.teachers],
        "augment": cfg.augment.model_dump(),
        **extra,
    }
    (out_dir / "student.json").write_text(json.dumps(card, indent=2))
    return path
