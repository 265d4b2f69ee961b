"""The per-worker training function run by Ray Train (one DDP process per worker).

Rank and world size are read once, here; the epoch loop itself (``loop.train_epoch``) knows no Ray.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode

from simreg.models.errors import SimRegError
from simreg.orchestrator.config import validate_config
from simreg.orchestrator.evaluation.knn import knn_report
from simreg.orchestrator.ray_compat import quiet_train_report_log
from simreg.orchestrator.storage import lease_still_held
from simreg.orchestrator.train.batches import SeenIds, _batches, _checked, popcount
from simreg.orchestrator.train.builders import (
    DDP_OPTIONS,
    build_objective,
    build_optimizer,
    compress_allreduce,
    shard_plan,
    student_layout,
    view_plan,
)
from simreg.orchestrator.train.cached_data import cached_batches
from simreg.orchestrator.train.checkpoint import checkpoint_epoch, load_kept, restore, save_checkpoint
from simreg.orchestrator.train.epoch import NonFiniteLoss, train_epoch
from simreg.orchestrator.train.target_stats import maps_from_payload

PROGRESS_EVERY = 4  # steps between progress pings from rank 0


def _global_id_counts(seen: SeenIds, world: int, device: torch.device) -> tuple[int, int]:
    """(distinct ids, surplus occurrences) over every rank's ids of this epoch: the ranks' bitmaps gathered (padded
    to the longest) and OR-ed, one bit per id of the split. Collectives run on ``device``: nccl takes CUDA tensors only."""
    counts = torch.tensor([len(seen), len(seen.bits)], dtype=torch.int64, device=device)
    sizes = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, counts)
    total = sum(int(s[0]) for s in sizes)
    longest = max(int(s[1]) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: len(seen.bits)] = torch.from_numpy(seen.bits).to(device)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, padded)
    union = np.zeros(longest, dtype=np.uint8)
    for p in parts:
        np.bitwise_or(union, p.cpu().numpy(), out=union)
    distinct = popcount(union)
    return distinct, total - distinct


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (a MAX all-reduce: every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _AllFinite:
    """``train_epoch``'s ``finite`` check over every rank: one SUM all-reduce per step, before the backward pass, of
    (ranks whose loss is NaN, ranks whose loss is infinite): all ranks stop at the same step when any rank's loss is
    not finite, and ``worst`` says what it was (nan before inf) on every rank."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.worst = device, ""

    def __call__(self, loss: torch.Tensor) -> bool:
        t = torch.tensor([float(torch.isnan(loss).any()), float(torch.isinf(loss).any())], device=self.device)
        dist.all_reduce(t)
        nan, inf = t.tolist()
        self.worst = "nan" if nan > 0 else "inf" if inf > 0 else ""
        return not self.worst


def _diverged(e: NonFiniteLoss, worst: str, cfg: Any, epoch: int, steps: int, lr: float) -> str:
    kept = f"epoch {epoch}'s checkpoint is the last one kept" if epoch > 0 else "no checkpoint was written"
    return (
        f"the training loss became {worst or e.value} at epoch {epoch + 1}, step {e.step} of {steps} (learning rate then {lr:.3g}): "
        f"the run stopped before that step's update; {kept}. Lower optim.lr (now {cfg.optim.lr:g}) or add optim.warmup_epochs"
    )


def _validate(objective: torch.nn.Module, val: Any, cfg: Any, device: torch.device) -> dict[str, float]:
    """k-NN of the student's backbone on the validation sets (train-split bank and queries)."""
    objective.eval()
    r = knn_report(
        objective.features, val.bank.images, val.bank.labels, val.query.images, val.query.labels, cfg.data.view_size,
        cfg.eval.batch_size, device, cfg.eval.knn_weighting, cfg.eval.knn_temperature,
    )
    objective.train()
    return {"val/top1_1nn": r["top1_1nn"], "val/top1_20nn": r["top1_20nn"]}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    quiet_train_report_log()
    cfg = validate_config(config["cfg"], "worker config")
    state = config["state"]
    teacher_dims: dict[str, int] = config["teacher_dims"]
    names = list(teacher_dims)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # First: Ray Data's split coordinator (an actor: a process and its imports, seconds on a small machine) then
    # starts while the model and DDP are built, instead of delaying the first batch. Once; iterated once per epoch.
    cached = config.get("cached")  # every target in the cache: this worker makes its batches (train/cached_data.py)
    shard = ray.train.get_dataset_shard("train") if cached is None else None
    if rank == 0:
        state.mark.remote("workers_ready", time.time())
        if config.get("view_warmup") is not None:  # see pipeline/warmup.py
            state.start_view_warmup.remote(config["view_warmup"])
    torch.set_num_threads(cfg.scaling.threads_per_worker)  # Ray sets OMP_NUM_THREADS=1
    device = ray.train.torch.get_device()
    # An earlier attempt found the run cannot go on (a diverged loss, a teacher that cannot serve): every rank ends
    # now and the driver says why. Decided together: a rank going on alone would wait in a collective forever.
    if _any_rank(ray.get(state.get_failure.remote()) is not None, device):
        return

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    objective = build_objective(cfg, teacher_dims, maps_from_payload(config.get("target_maps")))
    if cfg.loss.teacher_drop > 0:  # each rank its own masks
        objective.seed_dropping(cfg.seed * 1_000_003 + rank, device)
    rows, per_worker_batch, steps = shard_plan(config["n_train"], cfg.train.batch_size, world)
    optimizer, scheduler = build_optimizer(cfg, objective, steps)
    start_epoch = 0
    history: list[dict[str, float]] = []  # every epoch's metrics so far, carried by the checkpoint
    redo_upto = -1  # epochs up to this one are redone after a fallback from a damaged checkpoint
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted worker group, an elastic resize, or a rerun of the same output dir
        saved, used, damaged = load_kept(ckpt)
        if damaged:
            latest = checkpoint_epoch(posixpath.basename(ckpt.path.rstrip("/")))
            redo_upto = -1 if latest is None else latest
            if rank == 0:
                state.note_placement.remote(f"checkpoint {'; '.join(damaged)}; resuming from {used}")
        start_epoch = restore(saved, objective, optimizer, scheduler)
        history = list(saved.get("history", []))
    span = torch.tensor([start_epoch, -start_epoch], dtype=torch.int64, device=device)
    dist.all_reduce(span, op=dist.ReduceOp.MAX)
    if int(span[0]) != -int(span[1]):  # each rank read the checkpoint itself: one read it differently (a storage error)
        raise SimRegError(f"the student workers resumed at different epochs ({-int(span[1])} to {int(span[0])}): "
                          "their checkpoint storage answered differently; the run restarts from its last checkpoint")
    rt = ray.get_runtime_context()
    state.note_placement.remote(f"student worker rank {rank}/{world} on node {rt.get_node_id()[:12]}", {
        "role": "student", "rank": rank, "world_size": world, "node_id": rt.get_node_id(), "pid": os.getpid(), "start_epoch": start_epoch,
        "resources": dict(rt.get_assigned_resources()),
    })
    cuda = device.type == "cuda"
    objective = student_layout(objective, cfg)
    amp = torch.bfloat16 if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cuda) else None
    model: Any = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs=dict(DDP_OPTIONS))  # DDP: gloo on CPU, nccl on GPU
    compress_allreduce(model, cfg.train.ddp_compression)
    if cfg.train.compile:
        model = torch.compile(model)  # checkpoints keep reading ``objective``: its state-dict keys are unchanged
    view_key = view_plan(cfg).student_key  # "view" (shared with the teachers) or "student_view"
    steps_done = [0]

    def on_step(n: int, _: dict[str, float]) -> None:
        steps_done[0] += 1
        if steps_done[0] == 1 and rank == 0:
            state.mark.remote("first_step", time.time())
        if rank == 0 and steps_done[0] % PROGRESS_EVERY == 0:  # fire-and-forget ping for the driver's bar
            state.add_images.remote(n * world * PROGRESS_EVERY)

    if cached is not None:  # the images and targets from the object store (zero-copy, shared by the node's workers)
        train_set, targets = ray.get(cached.images), {name: ray.get(ref) for name, ref in cached.targets.items()}
    finite = _AllFinite(device)
    redo = f"-r{int(time.time())}"  # see checkpoint.CHECKPOINT_NAME
    for epoch in range(start_epoch, cfg.train.epochs):
        # Every rank has drained the previous execution before the epoch moves on; the next execution
        # starts only once all ranks ask for it, i.e. after rank 0 has set the epoch.
        dist.barrier()
        if rank == 0:
            ray.get(state.set_epoch.remote(epoch))
        seen = SeenIds(rows)  # this rank's rows of the epoch
        waits: list[float] = []
        t0 = time.perf_counter()
        if cached is None:
            batches = _batches(shard, per_worker_batch, pin=cuda)
        else:
            batches = cached_batches(train_set, targets, cached.views, view_plan(cfg), cfg.seed, epoch, rank, world, per_worker_batch,
                                     cached.block_rows, pin=cuda, ahead=2 if cuda else 0)
            if rank == 0:  # every row of the epoch read from the cache, as the teacher actors would count it
                for name in names:
                    state.add_teacher_rows.remote(name, {"cached": config["n_train"]})
        try:
            stats = train_epoch(model, _checked(batches, epoch, seen, waits), optimizer, scheduler, names, device, on_step, view_key, amp,
                                finite=finite)
        except NonFiniteLoss as e:  # every rank is here, at the same step: record why, end without a checkpoint
            if rank == 0:
                ray.get(state.fail.remote(_diverged(e, finite.worst, cfg, epoch, steps, float(scheduler.get_last_lr()[0]))))
            return
        wall = time.perf_counter() - t0
        if rank == 0 and shard is not None and os.environ.get("SIMREG_DATA_STATS"):  # Ray Data's per-stage timings, for tuning
            print(f"[simreg] epoch {epoch} Ray Data stats (rank 0):\n{shard.stats()}", flush=True)

        # Sum over ranks: images, skipped, per-key sums; max of wall time.
        keys = sorted(stats.sums)
        vec = torch.tensor([stats.images, stats.skipped_images, stats.steps] + [stats.sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(vec)
        vec = vec.cpu()
        # slowest rank: epoch wall time, wait for the first batch, all waits for batches (a data stall)
        wall_t = torch.tensor([wall, waits[0] if waits else 0.0, sum(waits)], dtype=torch.float64, device=device)
        dist.all_reduce(wall_t, op=dist.ReduceOp.MAX)
        wall_t = wall_t.cpu()
        unique_ids, duplicate_ids = _global_id_counts(seen, world, device)
        images = vec[0].item()
        metrics: dict[str, float] = {f"train/{k}": vec[3 + i].item() / max(images, 1) for i, k in enumerate(keys)}
        metrics.update({
            "epoch": float(epoch),
            "train/images": images,
            "train/images_skipped": vec[1].item(),
            "train/images_dropped_by_split": float(config["n_train"] - world * rows),
            "train/steps_per_worker": vec[2].item() / world,
            "train/images_per_s": images / max(wall_t[0].item(), 1e-9),
            "train/epoch_s": wall_t[0].item(),
            "train/first_batch_wait_s": wall_t[1].item(),
            "train/data_wait_s": wall_t[2].item(),
            "train/lr": float(scheduler.get_last_lr()[0]),
            "train/unique_ids": float(unique_ids),  # distinct sample ids trained on, all ranks together
            "train/duplicate_ids": float(duplicate_ids),  # ids seen more than once this epoch (expected 0)
            "train/world_size": float(world),
            "train/resumed_at_epoch": float(start_epoch),  # first epoch of this worker group's attempt
        })
        # The run folder's lease taken over by another driver (this run's driver was frozen, or cut off, past it):
        # no checkpoint of this run goes there any more; every rank ends, rank 0 records why
        if _any_rank(rank == 0 and not lease_still_held(config.get("lease")), device):
            if rank == 0:
                ray.get(state.fail.remote(f"another driver took the run folder over: epoch {epoch} is not checkpointed, "
                                          "and this run stops (the driver that holds the folder's lease goes on)"))
            return
        val = config.get("val")
        due = cfg.eval.val_every > 0 and ((epoch + 1) % cfg.eval.val_every == 0 or epoch + 1 == cfg.train.epochs)
        if rank == 0 and val is not None and due:
            metrics.update(_validate(objective, val, cfg, device))
        if rank == 0:  # this run's teacher rows so far (blocks ahead of training included): computed, cached, shared
            teacher_rows = ray.get(state.get_teacher_rows.remote())
            metrics.update({f"teacher/{n}/{k}_rows": float(v) for n, r in teacher_rows.items() for k, v in r.items()})
        history.append(metrics)
        if rank == 0:
            state.add_epoch_metrics.remote(metrics)
            # An object store: Ray uploads in the background (the next epoch trains meanwhile) and deletes the
            # folder once uploaded. Otherwise the copy is synchronous and the folder is ours to delete.
            mode = CheckpointUploadMode.ASYNC if config.get("async_checkpoint") else CheckpointUploadMode.SYNC
            tmp = tempfile.mkdtemp(prefix="simreg-ckpt-")
            try:
                save_checkpoint(Path(tmp), objective, optimizer, scheduler, epoch, metrics, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch_{epoch:04d}{redo if epoch <= redo_upto else ''}",
                                 checkpoint_upload_mode=mode)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if mode is CheckpointUploadMode.SYNC:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint=None)
