"""GPU speed of the SimReg core (torch + timm only: runs on a machine without Ray or MLflow).

    python benchmarks/gpu_step.py                               # batch 256, 224 px, bf16, channels_last, eager + compiled
    python benchmarks/gpu_step.py --modes eager --json gpu_step.json
    python benchmarks/gpu_step.py --device cpu --batch 8 --size 64 --steps 2 --warmup 1   # a smoke run without a GPU

Measures images/s of (1) ResNet-50 teacher inference, (2) a ResNet-18 student SimReg train step with the
paper's 4L-MLP head to the teacher's 2048-d feature, (3) the fused step (teacher forward + student step on
the same batch), in bf16 autocast with channels_last, eagerly and under ``torch.compile``, and prints
them beside the reference figures measured on one H200 (teacher 15.6k, student 13.0k, fused 7.07k eager /
10.0k compiled). Random weights: speed does not depend on them. The models are the product's
(``simreg.models``: the objective, its input transform, its loss).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import simreg.models  # noqa: F401  (installed with pip install -e .)
except ImportError:  # a bare checkout (the GPU machine): map the package onto the repository root
    pkg = types.ModuleType("simreg")
    pkg.__path__ = [str(REPO)]  # type: ignore[attr-defined]
    sys.modules["simreg"] = pkg

from simreg.models import InputTransform, SimRegObjective, build_backbone  # noqa: E402

REFERENCE_H200 = {"teacher": 15600.0, "student": 13000.0, "fused/eager": 7070.0, "fused/compiled": 10000.0}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="untimed iterations (compilation happens here)")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    cl = torch.channels_last
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    view = torch.rand(a.batch, 3, a.size, a.size, device=device)  # a batch of views in [0, 1]
    tf = InputTransform(a.size, *IMAGENET)
    results: dict[str, float] = {}
    for mode in a.modes.split(","):
        teacher = build_backbone("resnet50").to(device).eval().to(memory_format=cl).requires_grad_(False)
        objective = SimRegObjective(build_backbone("resnet18"), tf, {"t": 2048}, depth=4, width_mult=2.0).to(device).to(memory_format=cl)
        opt = torch.optim.SGD(objective.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        t_fwd = torch.compile(teacher) if mode == "compiled" else teacher
        s_fwd = torch.compile(objective) if mode == "compiled" else objective

        def teach() -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return t_fwd(tf(view).contiguous(memory_format=cl)).float()

        target = teach()

        def step(tgt: torch.Tensor = target) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = s_fwd(view, {"t": tgt})["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def fused() -> None:
            step(teach())

        results[f"teacher/{mode}"] = rate(teach, a.batch, a.steps, a.warmup, device)
        results[f"student/{mode}"] = rate(step, a.batch, a.steps, a.warmup, device)
        results[f"fused/{mode}"] = rate(fused, a.batch, a.steps, a.warmup, device)
        for k in ("teacher", "student", "fused"):
            print(f"{k}/{mode}: {results[f'{k}/{mode}']:.0f} images/s", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, batch {a.batch}, {a.size} px, bf16 autocast, channels_last")
    print("| measurement | images/s | H200 reference | ratio |\n|---|---|---|---|")
    for k, v in results.items():
        ref = REFERENCE_H200.get(k) or REFERENCE_H200.get(k.split("/")[0])
        print(f"| {k} | {v:.0f} | {ref:.0f} | {v / ref:.2f} |" if ref else f"| {k} | {v:.0f} | - | - |")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": a.batch, "size": a.size,
                                            "images_per_s": results, "reference_h200": REFERENCE_H200}, indent=2))


if __name__ == "__main__":
    main()
