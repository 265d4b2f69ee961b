"""Config -> constructor arguments: the only place that maps config keys onto the models' arguments."""
from __future__ import annotations

import math
from typing import Any

import torch

from simreg.models import InputTransform, SimRegObjective, build_backbone
from simreg.models.errors import ConfigError
from simreg.models.target_norm import NormMap
from simreg.orchestrator.cache.targets import CacheSpec, default_cache_dir, spec_dict
from simreg.orchestrator.config import SimRegConfig
from simreg.orchestrator.data.imageset import ImageSet
from simreg.orchestrator.data.views import Preset, ViewPlan, ViewSpec, preset_spec
from simreg.orchestrator.pipeline.requester import Requester
from simreg.orchestrator.pipeline.teacher import TeacherSpec
from simreg.orchestrator.storage import open_store


def teacher_specs(cfg: SimRegConfig) -> list[TeacherSpec]:
    return [
        TeacherSpec(
            t.name, t.arch, t.weights_ref(), t.input_size, t.mean, t.std, key=f"teachers.{i}", format=t.format,
            model_kwargs=dict(t.model_kwargs), sha256=t.sha256,
        )
        for i, t in enumerate(cfg.teachers)
    ]


def teacher_options(cfg: SimRegConfig, cache: CacheSpec | None = None) -> dict[str, Any]:
    """``TeacherInference``'s options from ``teacher_pool`` (precision, memory layout) and a target cache: the
    teacher as the product's actors run it (they add ``compile``). Benchmarks and ``cache warm`` use it too."""
    tp = cfg.teacher_pool
    return {"cache": cache, "precision": tp.precision, "channels_last": tp.channels_last}


def view_plan(cfg: SimRegConfig) -> ViewPlan:
    """The teachers' view, and the student's own view when ``augment.mode=different``."""
    a = cfg.augment

    def spec(kind: Preset) -> ViewSpec:
        return preset_spec(kind, cfg.data.view_size, a.crop_scale, a.hflip_p, a.strength)

    return ViewPlan(spec(a.teacher), None if a.mode == "same" else spec(a.student), a.view_bank)


def cache_spec(cfg: SimRegConfig, train: ImageSet) -> CacheSpec | None:
    """Where teacher targets of this run are cached, and the data and view parts of their key."""
    if not cfg.cache.enabled:
        return None
    if not train.source_fingerprint:
        raise ConfigError("cache.enabled=true needs images loaded by simreg's data loaders (no source fingerprint)")
    root = open_store(cfg.cache.dir or default_cache_dir()).uri  # a local folder (made absolute) or an object-store URI
    return CacheSpec(root, train.source_fingerprint, target_views(cfg), cfg.cache.memory_mib)


def target_views(cfg: SimRegConfig) -> dict[str, Any]:
    """The views part of a target's identity: the teachers' view recipe and the view seed."""
    return {"seed": cfg.seed, "teacher_view": spec_dict(view_plan(cfg).teacher)}


def requester(cfg: SimRegConfig, train: ImageSet) -> Requester:
    """What the run's view stage tells a teacher actor with each block: its target cache and the identity of its
    views (runs of a sweep with equal data, teachers' view recipe and seed share forwards)."""
    spec = cache_spec(cfg, train)
    return Requester(spec.root if spec is not None else None, train.source_fingerprint or None, target_views(cfg),
                     cfg.cache.memory_mib)


def student_transform(cfg: SimRegConfig) -> InputTransform:
    return InputTransform(cfg.student_input_size, cfg.student.mean, cfg.student.std)


def build_objective(cfg: SimRegConfig, teacher_dims: dict[str, int], target_maps: dict[str, NormMap] | None = None) -> SimRegObjective:
    """The student, its heads and the loss. ``target_maps``: the target maps of the teachers whose ``normalize``
    needs statistics (``Prepared.target_maps``); without them such an objective can be evaluated but not trained."""
    return SimRegObjective(
        build_backbone(cfg.student.arch, model_kwargs=cfg.student.model_kwargs),
        student_transform(cfg),
        teacher_dims,
        depth=cfg.heads.depth,
        width_mult=cfg.heads.width_mult,
        layout=cfg.heads.layout,
        teacher_weights={t.name: t.weight for t in cfg.teachers},
        loss=cfg.train.loss,
        normalize={t.name: t.normalize for t in cfg.teachers},
        target_maps=target_maps,
        teacher_drop=cfg.loss.teacher_drop,
    )


def student_layout(objective: SimRegObjective, cfg: SimRegConfig) -> SimRegObjective:
    """The objective in the memory layout training uses: channels_last when ``train.channels_last`` (oneDNN's
    and cuDNN's fast layout; a 64-image step of the demo's student on one CPU thread: 4-9% faster, `benchmarks/cpu_layout.py`)."""
    return objective.to(memory_format=torch.channels_last) if cfg.train.channels_last else objective


# DDP's options for the student workers: gradients live in the all-reduce buckets (no copy in and out per
# step; `benchmarks/ddp_step.py`: 3-10 ms less CPU per 64-image step of the demo's objective on one thread)
DDP_OPTIONS = {"gradient_as_bucket_view": True}


def compress_allreduce(model: torch.nn.Module, compression: str) -> None:
    """``train.ddp_compression``: send the gradients as fp16 or bf16 (a DDP comm hook); ``none`` and a model
    not wrapped in DDP (one worker) are left as they are."""
    if compression == "none" or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model.register_comm_hook(None, default_hooks.bf16_compress_hook if compression == "bf16" else default_hooks.fp16_compress_hook)


def build_optimizer(
    cfg: SimRegConfig, model: torch.nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with momentum (the paper's optimizer), linear warm-up, then cosine decay to 0 per step.

    The fused kernel (CPU and CUDA) where torch has it: one pass over all parameters instead of a loop over
    tensors (the step of the demo's 7M-parameter objective: 10.7 -> 3.4 ms on one CPU thread)."""
    params = list(model.parameters())
    kw = {"lr": cfg.optim.lr, "momentum": cfg.optim.momentum, "weight_decay": cfg.optim.weight_decay}
    try:
        opt = torch.optim.SGD(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype without the fused kernel
        opt = torch.optim.SGD(params, **kw)
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warm = int(cfg.optim.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shard_plan(n_images: int, batch_size: int, num_workers: int) -> tuple[int, int, int]:
    """(rows per worker, per-worker batch, steps per epoch) under Ray Train's equal split.

    Ray Train splits with ``equal=True``: each worker gets floor(N / W) rows and the N mod W rows left
    over are dropped that epoch; a last batch of one row is skipped by every worker (BatchNorm).
    """
    rows = n_images // num_workers
    per_worker = max(2, batch_size // num_workers)
    steps = rows // per_worker + (1 if rows % per_worker >= 2 else 0)
    return rows, per_worker, steps
