"""Train a self-supervised teacher without labels on the Fashion-MNIST train split (CPU or GPU).

BYOL (Grill et al. 2020): an online network (backbone, projector, predictor) regresses the projection of an
exponential-moving-average target network on another view of the same image; no negatives, no labels. The
backbone is any timm model; the saved file is its backbone state dict in fp16 safetensors, loadable with
``timm.create_model(arch, num_classes=0)`` and usable as a simreg teacher with ``teachers[i].input_size``.

    .venv/bin/python scripts/train_teacher.py --arch convnext_atto --size 32 --epochs 30 --out runs/byol_teacher

A checkpoint is written after every epoch; the same command resumes from it. At the end the 1-NN / 20-NN
top-1 of the test split against the 60,000 training images (simreg's evaluation transform: the whole image
resized to 64 px, then the teacher's own resize and normalisation) is printed and written to ``result.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from simreg.models.teachers import InputTransform
from simreg.orchestrator.data.fashion_mnist import fmnist_root, load_fashion_mnist
from simreg.orchestrator.evaluation.knn import knn_report

MEAN = (0.286, 0.286, 0.286)
STD = (0.353, 0.353, 0.353)


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))


def augment(x: torch.Tensor, size: int, gen: torch.Generator, *, jitter: float, solarize_p: float) -> torch.Tensor:
    """Batched views of (B, 1, H, W) images in [0, 1]: RandomResizedCrop (area 0.2-1, ratio 3/4-4/3) to ``size``,
    horizontal flip, brightness/contrast jitter (p 0.8, SimCLR strength ``jitter``), solarization (p ``solarize_p``)."""
    b = x.shape[0]
    u = torch.rand(b, 7, generator=gen)
    area = 0.2 + 0.8 * u[:, 0]
    logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    w = torch.sqrt(area * logr.exp()).clamp(max=1.0)
    h = torch.sqrt(area / logr.exp()).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)
    cy = (1 - h) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    s = 0.8 * jitter
    on = (u[:, 5] < 0.8).float().view(b, 1, 1, 1)
    bright = 1 + s * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    contrast = 1 + s * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    j = (v * bright).clamp(0, 1)
    m = j.mean(dim=(2, 3), keepdim=True)
    j = ((j - m) * contrast + m).clamp(0, 1)
    v = on * j + (1 - on) * v
    sol = (u[:, 6] < solarize_p).view(b, 1, 1, 1)
    v = torch.where(sol & (v > 0.5), 1 - v, v)
    v = (v - MEAN[0]) / STD[0]
    return v.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate(backbone: nn.Module, size: int, train, test, bank: int | None = None, queries: int | None = None) -> dict[str, float]:
    backbone.eval()
    tf = InputTransform(size, MEAN, STD)
    encode = lambda view: backbone(tf(view).contiguous(memory_format=torch.channels_last))  # noqa: E731
    n_b = bank or len(train.labels)
    n_q = queries or len(test.labels)
    out = knn_report(encode, train.images[:n_b], train.labels[:n_b], test.images[:n_q], test.labels[:n_q], view_size=64, batch_size=512)
    backbone.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="convnext_atto")
    ap.add_argument("--size", type=int, default=32, help="the backbone's input size (teachers[i].input_size)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate at --batch-size")
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=2.0, help="epochs of linear warm-up")
    ap.add_argument("--tau", type=float, default=0.99, help="EMA rate at the start (cosine to 1)")
    ap.add_argument("--jitter", type=float, default=0.6)
    ap.add_argument("--images", type=int, default=None, help="train on the first N images (default all 60,000)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", choices=("online", "target"), default="online", help="which backbone is saved")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import timm
    from safetensors.torch import save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = fmnist_root(None, download=True)
    train, test = load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")
    images = torch.from_numpy(np.array(train.images[: args.images]))  # (N, 28, 28) uint8
    n = images.shape[0]
    steps_per_epoch = n // args.batch_size
    total = steps_per_epoch * args.epochs

    backbone = timm.create_model(args.arch, num_classes=0).to(memory_format=torch.channels_last)
    dim = backbone.num_features
    online = nn.ModuleDict({"backbone": backbone, "projector": mlp(dim, 1024, 256), "predictor": mlp(256, 1024, 256)})
    target = nn.ModuleDict({"backbone": timm.create_model(args.arch, num_classes=0).to(memory_format=torch.channels_last),
                            "projector": mlp(dim, 1024, 256)})
    target.load_state_dict({k: v for k, v in online.state_dict().items() if not k.startswith("predictor.")})
    for p in target.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(online, args.wd), lr=args.lr, betas=(0.9, 0.95))

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.pt"
    start_epoch, log = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        online.load_state_dict(state["online"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"])
        start_epoch, log = int(state["epoch"]), json.loads(state["log"])
        print(f"resumed after epoch {start_epoch}", flush=True)
    else:
        log.append({"epoch": 0, **evaluate(backbone, args.size, train, test, 10000, 2000)})
        print(f"random init: {log[-1]}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        gen.manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)
        t0, losses = time.perf_counter(), []
        online.train()
        target.train()
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            warm = args.warmup * steps_per_epoch
            lr = args.lr * (step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for g in opt.param_groups:
                g["lr"] = lr
            x = images[order[i * args.batch_size : (i + 1) * args.batch_size]].unsqueeze(1).float().div_(255)
            v1 = augment(x, args.size, gen, jitter=args.jitter, solarize_p=0.0)
            v2 = augment(x, args.size, gen, jitter=args.jitter, solarize_p=0.2)
            both = torch.cat([v1, v2])
            p = online["predictor"](online["projector"](online["backbone"](both)))
            with torch.no_grad():
                z = target["projector"](target["backbone"](both))
            b = x.shape[0]
            loss = byol_loss(p[:b], z[b:]) + byol_loss(p[b:], z[:b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tau = 1 - (1 - args.tau) * 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                src_sd = online.state_dict()
                for k, t in target.state_dict().items():
                    src = src_sd[k]
                    if t.dtype.is_floating_point:
                        t.mul_(tau).add_(src, alpha=1 - tau)
                    else:
                        t.copy_(src)
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 1)}
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            entry.update(evaluate(backbone, args.size, train, test, 10000, 2000))
        log.append(entry)
        print(json.dumps(entry), flush=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"online": online.state_dict(), "target": target.state_dict(), "opt": opt.state_dict(),
                    "epoch": epoch + 1, "log": json.dumps(log)}, tmp)
        tmp.replace(ckpt)

    result = {"arch": args.arch, "input_size": args.size, "epochs": args.epochs, "images": n,
              "train_seconds": round(sum(e.get("seconds", 0.0) for e in log), 1), "log": log,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for which, net in (("online", online["backbone"]), ("target", target["backbone"])):
        result[f"knn_{which}"] = evaluate(net, args.size, train, test)
        print(f"{which} backbone, 60,000-image bank, 10,000 queries: {result[f'knn_{which}']}", flush=True)
    keep = (online if args.keep == "online" else target)["backbone"]
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in keep.state_dict().items()}
    save_file(sd, str(args.out / f"fmnist_byol_{args.arch}.safetensors"))
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / f'fmnist_byol_{args.arch}.safetensors'} in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
