"""The per-worker training function run by Ray Train (one DDP process per worker).

Rank and world size are read once, here; the epoch loop itself (``loop.train_epoch``) knows no Ray.
"""
from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from simreg.models.errors import DataError
from simreg.orchestrator.builders import (
    DDP_OPTIONS,
    build_objective,
    build_optimizer,
    compress_allreduce,
    shard_plan,
    student_layout,
    view_plan,
)
from simreg.orchestrator.checkpoint import load_state, restore, save_checkpoint
from simreg.orchestrator.config import validate_config
from simreg.orchestrator.evaluation import knn_report
from simreg.orchestrator.loop import train_epoch

PROGRESS_EVERY = 4  # steps between progress pings from rank 0


def _checked(
    batches: Iterator[dict[str, torch.Tensor]], epoch: int, seen: list[torch.Tensor], waits: list[float],
) -> Iterator[dict[str, torch.Tensor]]:
    """Refuse a batch rendered for another epoch, record the sample ids this rank trained on and the
    seconds spent waiting for each batch (``waits[0]``: for the first one)."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        b = next(it, None)
        waits.append(time.perf_counter() - t0)
        if b is None:
            return
        ep = b["epoch"]
        if ep.numel() and (int(ep.min()) != epoch or int(ep.max()) != epoch):
            raise DataError(f"pipeline produced views of epoch {sorted(set(ep.tolist()))} during epoch {epoch}")
        seen.append(b["sample_id"].cpu())
        yield b


def _batches(shard: Any, batch_size: int, pin: bool, ahead: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """This epoch's batches of ``batch_size`` rows (the last one shorter), cut from the blocks the split hands
    this worker as they arrive; a thread fetches up to ``ahead`` blocks in advance.

    ``iter_torch_batches(prefetch_batches=1)`` holds a block back until the worker's next block has arrived,
    so an epoch's first batch waited for ~5 teacher batches (1.4 s per epoch on 2 cores); without prefetching
    each fetch blocked the step instead. Here the first batch leaves with the first block."""
    blocks: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:  # False once the training thread has stopped listening
        while not stop.is_set():
            try:
                blocks.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def fetch() -> None:
        try:
            for block in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                if not put(block):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001  # re-raised in the training thread
            put(e)

    thread = threading.Thread(target=fetch, name="simreg-block-fetch", daemon=True)
    thread.start()
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    try:
        while True:
            item = blocks.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            pending.append(item)
            rows += _num_rows(item)
            while rows >= batch_size:
                batch, pending = _cut(pending, batch_size)
                rows -= batch_size
                yield _to_torch(batch, pin)
        if rows:
            yield _to_torch(_cut(pending, rows)[0], pin)
    finally:
        stop.set()


def _num_rows(block: dict[str, np.ndarray]) -> int:
    return len(next(iter(block.values())))


def _cut(pending: list[dict[str, np.ndarray]], n: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The first ``n`` rows of the pending blocks, and the blocks left."""
    take: list[dict[str, np.ndarray]] = []
    need = n
    rest = list(pending)
    while need:
        b = rest.pop(0)
        k = _num_rows(b)
        if k <= need:
            take.append(b)
            need -= k
        else:
            take.append({c: v[:need] for c, v in b.items()})
            rest.insert(0, {c: v[need:] for c, v in b.items()})
            need = 0
    batch = take[0] if len(take) == 1 else {c: np.concatenate([t[c] for t in take]) for c in take[0]}
    return batch, rest


def _to_torch(batch: dict[str, np.ndarray], pin: bool) -> dict[str, torch.Tensor]:
    out = {c: torch.from_numpy(np.array(v)) for c, v in batch.items()}  # a copy: object-store arrays are read-only
    return {c: t.pin_memory() for c, t in out.items()} if pin else out


def _global_id_counts(ids: torch.Tensor, world: int, device: torch.device) -> tuple[int, int]:
    """(distinct ids, surplus occurrences) over every rank's ids of this epoch (all_gather, padded).
    Collectives run on ``device``: nccl takes CUDA tensors only."""
    n = torch.tensor([ids.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(x) for x in sizes))
    padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded[: ids.numel()] = ids.to(device)
    parts = [torch.empty(longest, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(parts, padded)
    everything = torch.cat([p[: int(k)].cpu() for p, k in zip(parts, sizes, strict=True)])
    distinct = int(everything.unique().numel())
    return distinct, int(everything.numel()) - distinct


def _validate(objective: torch.nn.Module, val: Any, cfg: Any, device: torch.device) -> dict[str, float]:
    """k-NN of the student's backbone on the validation sets (train-split bank and queries)."""
    objective.eval()
    r = knn_report(
        objective.features, val.bank.images, val.bank.labels, val.query.images, val.query.labels, cfg.data.view_size,
        cfg.eval.batch_size, device, cfg.eval.knn_weighting, cfg.eval.knn_temperature,
    )
    objective.train()
    return {"val/top1_1nn": r["top1_1nn"], "val/top1_20nn": r["top1_20nn"]}


def _quiet_report_log() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO, on every rank, under a logger named
    by its file path (so ``LoggingConfig`` does not reach it); the driver already logs one line per epoch."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logging as it is
        pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    _quiet_report_log()
    cfg = validate_config(config["cfg"], "worker config")
    state = config["state"]
    teacher_dims: dict[str, int] = config["teacher_dims"]
    names = list(teacher_dims)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.threads_per_worker)  # Ray sets OMP_NUM_THREADS=1
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    objective = build_objective(cfg, teacher_dims)
    rows, per_worker_batch, steps = shard_plan(config["n_train"], cfg.train.batch_size, world)
    optimizer, scheduler = build_optimizer(cfg, objective, steps)
    start_epoch = 0
    history: list[dict[str, float]] = []  # every epoch's metrics so far, carried by the checkpoint
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted worker group, an elastic resize, or a rerun of the same output dir
        with ckpt.as_directory() as d:
            saved = load_state(Path(d))
        start_epoch = restore(saved, objective, optimizer, scheduler)
        history = list(saved.get("history", []))
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
    shard = ray.train.get_dataset_shard("train")  # once; iterated once per epoch (_batches)
    steps_done = [0]

    def on_step(n: int, _: dict[str, float]) -> None:
        steps_done[0] += 1
        if rank == 0 and steps_done[0] % PROGRESS_EVERY == 0:  # fire-and-forget ping for the driver's bar
            state.add_images.remote(n * world * PROGRESS_EVERY)

    for epoch in range(start_epoch, cfg.train.epochs):
        # Every rank has drained the previous execution before the epoch moves on; the next execution
        # starts only once all ranks ask for it, i.e. after rank 0 has set the epoch.
        dist.barrier()
        if rank == 0:
            ray.get(state.set_epoch.remote(epoch))
        seen: list[torch.Tensor] = []
        waits: list[float] = []
        t0 = time.perf_counter()
        batches = _batches(shard, per_worker_batch, pin=cuda)
        stats = train_epoch(model, _checked(batches, epoch, seen, waits), optimizer, scheduler, names, device, on_step, view_key, amp)
        wall = time.perf_counter() - t0
        if rank == 0 and os.environ.get("SIMREG_DATA_STATS"):  # Ray Data's per-stage timings, for tuning
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
        ids = torch.cat(seen).cpu() if seen else torch.zeros(0, dtype=torch.int64)
        unique_ids, duplicate_ids = _global_id_counts(ids, world, device)
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
        val = config.get("val")
        due = cfg.eval.val_every > 0 and ((epoch + 1) % cfg.eval.val_every == 0 or epoch + 1 == cfg.train.epochs)
        if rank == 0 and val is not None and due:
            metrics.update(_validate(objective, val, cfg, device))
        history.append(metrics)
        if rank == 0:
            state.add_epoch_metrics.remote(metrics)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), objective, optimizer, scheduler, epoch, metrics, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(metrics, checkpoint=None)
