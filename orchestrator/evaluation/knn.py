"""k-NN evaluation on l2-normalized backbone features (pure torch, no Ray).

k-NN top-1 with majority vote (ties broken by the summed cosine similarity of the tied classes), as the
paper reports for k = 1 and k = 20.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from simreg.models.errors import DataError
from simreg.orchestrator.data.views import eval_views

KNN_KS = (1, 20)  # the paper's k-NN protocol

BANK_FIX = "raise the bank size (simreg eval --bank-size, data.knn_bank_size, eval.val_bank_size), use data with more images, or a smaller k"


def check_bank(n_bank: int, ks: Sequence[int] = KNN_KS, fix: str = BANK_FIX) -> None:
    """A k-NN bank holds at least max(ks) images: fewer would cut k silently and report an accuracy of another k."""
    k = max(ks)
    if n_bank < k:
        raise DataError(f"k-NN with k={k} needs at least {k} images in its bank, which holds {n_bank}: {fix}")


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, view_size: int, batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """encode(view (B, C, s, s) in [0, 1]) -> (B, d) for every image, batched: returns (N, d) float32 on CPU."""
    feats = []
    for i in range(0, len(images), batch_size):
        view = torch.from_numpy(eval_views(np.asarray(images[i : i + batch_size]), view_size)).to(device)  # lazy rows: rendered here
        feats.append(encode(view).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def knn_top1(
    bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
    ks: Sequence[int] = KNN_KS, chunk: int = 1024, weighting: str = "majority", temperature: float = 0.07,
    fix: str = BANK_FIX,
) -> dict[int, float]:
    """Top-1 accuracy (percent) of k-NN for each k, cosine similarity.

    ``majority``: one vote per neighbour (the paper's protocol), ties broken by the summed similarity of
    the tied classes; ``temperature``: each neighbour votes exp(sim / T) (Wu et al. 2018, as in DINO). A bank
    smaller than max(ks) raises ``DataError`` ending in ``fix``."""
    if weighting not in ("majority", "temperature"):
        raise ValueError(f"k-NN weighting {weighting!r} is unknown: use 'majority' or 'temperature'")
    check_bank(bank.shape[0], ks, fix)
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    n_cls = int(max(bank_labels.max(), query_labels.max())) + 1
    kmax = max(ks)
    correct = {k: 0 for k in ks}
    for i in range(0, query.shape[0], chunk):
        sim, idx = (query[i : i + chunk] @ bank.T).topk(kmax, dim=1)  # (q, kmax)
        nb = bank_labels[idx]  # (q, kmax)
        truth = query_labels[i : i + chunk]
        for k in ks:
            if weighting == "temperature":
                score = torch.zeros(nb.shape[0], n_cls).scatter_add_(1, nb[:, :k], (sim[:, :k] / temperature).exp())
            else:
                votes = torch.zeros(nb.shape[0], n_cls).scatter_add_(1, nb[:, :k], torch.ones_like(sim[:, :k]))
                tie = torch.zeros(nb.shape[0], n_cls).scatter_add_(1, nb[:, :k], sim[:, :k])
                score = votes + 1e-3 * tie / (k + 1)
            correct[k] += int((score.argmax(dim=1) == truth).sum())
    return {k: 100.0 * c / query.shape[0] for k, c in correct.items()}


def knn_report(
    encode: Callable[[torch.Tensor], torch.Tensor],
    bank_images: np.ndarray, bank_labels: np.ndarray, query_images: np.ndarray, query_labels: np.ndarray,
    view_size: int, batch_size: int = 256, device: str | torch.device = "cpu", weighting: str = "majority",
    temperature: float = 0.07, fix: str = BANK_FIX,
) -> dict[str, float]:
    """{"top1_1nn", "top1_20nn"} for one encoder."""
    check_bank(len(bank_images), KNN_KS, fix)  # before any feature is computed
    b = extract_features(encode, bank_images, view_size, batch_size, device)
    q = extract_features(encode, query_images, view_size, batch_size, device)
    acc = knn_top1(b, torch.tensor(bank_labels), q, torch.tensor(query_labels), ks=KNN_KS, weighting=weighting, temperature=temperature, fix=fix)  # copies: Ray arrays are read-only
    return {"top1_1nn": acc[1], "top1_20nn": acc[20]}


def linear_probe(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    epochs: int = 40, steps: Sequence[int] = (15, 30), lr: float = 0.01, batch_size: int = 256, seed: int = 0,
) -> float:
    """The paper's linear evaluation on frozen features: l2-normalize, standardize each dimension with the
    training statistics, one linear layer trained by SGD (momentum 0.9) with the LR divided by 10 at each
    step epoch. Returns test top-1 (percent)."""
    g = torch.Generator().manual_seed(seed)
    xtr = F.normalize(train_feats.float(), dim=1)
    xte = F.normalize(test_feats.float(), dim=1)
    mu, sd = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    n_cls = int(max(train_labels.max(), test_labels.max())) + 1
    layer = torch.nn.Linear(xtr.shape[1], n_cls)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(steps), gamma=0.1)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g)
        for i in range(0, xtr.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(layer(xtr[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        pred = layer(xte).argmax(1)
    return 100.0 * int((pred == test_labels).sum()) / int(test_labels.numel())
