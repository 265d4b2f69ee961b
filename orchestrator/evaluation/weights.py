"""``simreg eval``: k-NN (and the paper's linear probe) of any backbone weights file, no Ray needed.

    simreg eval --weights runs/demo/student/student.safetensors --arch resnet10t --input-size 32
    simreg eval --weights models/weights/fmnist_simclr_resnet10t.safetensors --arch resnet10t --linear --output t.json
    simreg eval --weights random:0 --arch resnet10t          # the architecture randomly initialised (seed 0), no file
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from simreg.models.errors import ModelError, first_line
from simreg.models.random_init import names_random
from simreg.models.teachers import InputTransform, load_teacher
from simreg.orchestrator.config import FMNIST_MEAN, FMNIST_STD, DataConfig
from simreg.orchestrator.data.sources import load_splits, resolve_source
from simreg.orchestrator.evaluation.knn import KNN_KS, check_bank, extract_features, knn_top1, linear_probe
from simreg.orchestrator.storage import local_copy


def evaluate_weights(
    weights: str | Path, arch: str, *, data: str = "fashion-mnist", input_size: int = 64, view_size: int = 64,
    mean: tuple[float, ...] = FMNIST_MEAN, std: tuple[float, ...] = FMNIST_STD, bank_size: int | None = None,
    query_size: int | None = None, linear: bool = False, linear_epochs: int = 40, threads: int = 2, seed: int = 0,
    batch_size: int = 256, layout: str = "auto", linear_steps: tuple[int, ...] = (15, 30), knn_weighting: str = "majority",
    knn_temperature: float = 0.07, model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """k-NN top-1 (k = 1, 20) on l2-normalized pooled features: bank = the train split, queries = the
    held-out split (all images unless sizes are given); with ``linear``, the paper's linear probe."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    is_random = isinstance(weights, str) and names_random(weights)  # random[:SEED]: the arch as initialised, no file
    with nullcontext(weights) if is_random else local_copy(weights) as path:  # a local file, or a download of an object-store URI
        model = load_teacher("eval", arch, path, InputTransform(input_size, tuple(mean), tuple(std)), key="--weights/--arch",
                             layout=layout, model_kwargs=model_kwargs)
    source, root = resolve_source(data)
    train, test = load_splits(DataConfig(source=source, root=root, store_size=96, holdout_fraction=0.1, stream=False), seed)
    bank, query = train.subset(bank_size, seed + 1), test.subset(query_size, seed + 2)
    check_bank(len(bank), KNN_KS, _bank_fix(data, len(train), bank_size))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    try:  # one image first: an input size or model kwargs the architecture cannot run at fail in one line
        extract_features(model, bank.images[:1], view_size, batch_size, device)
    except RuntimeError as e:
        raise ModelError(
            f"--arch {arch} does not run at --input-size {input_size} ({first_line(e, 200)}): use a larger --input-size "
            "or fix --model-kwargs"
        ) from e
    fb = extract_features(model, bank.images, view_size, batch_size, device)
    fq = extract_features(model, query.images, view_size, batch_size, device)
    lb, lq = torch.tensor(bank.labels), torch.tensor(query.labels)
    acc = knn_top1(fb, lb, fq, lq, ks=KNN_KS, weighting=knn_weighting, temperature=knn_temperature)
    out: dict[str, Any] = {
        "weights": str(weights), "arch": arch, "input_size": input_size, "data": data,
        "bank_images": len(bank), "query_images": len(query), "feature_dim": int(fb.shape[1]),
        "top1_1nn": acc[1], "top1_20nn": acc[20], "knn_weighting": knn_weighting,
    }
    if linear:
        out["linear_top1"] = linear_probe(fb, lb, fq, lq, epochs=linear_epochs, steps=linear_steps, seed=seed)
        out["linear_epochs"], out["linear_steps"] = linear_epochs, list(linear_steps)
    out["wall_s"] = time.perf_counter() - t0
    return out


def _bank_fix(data: str, n_train: int, bank_size: int | None) -> str:
    k = max(KNN_KS)
    if n_train >= k:  # --bank-size cut it
        return f"pass --bank-size {k} or more (or leave it out: all {n_train} train images)"
    return f"--data {data} holds only {n_train} train image(s) (after its held-out split): use data with at least {k}"


def write_json(result: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
