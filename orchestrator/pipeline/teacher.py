"""The CPU view stage and the teacher-inference stage of the Ray Data pipeline, as plain callables.

``TeacherInference(spec)(batch) -> batch`` is what Ray Data runs in each actor of a teacher's pool; a
unit test calls it on a dict of numpy arrays. The stage passes the ``view`` column through untouched
and adds ``target_<teacher>``: the student later reads the very same ``view`` column, so teacher and
student see the identical view.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from simreg.models.random_init import names_random, random_init_seed
from simreg.models.teachers import InputTransform, Teacher, load_teacher, random_init_identity
from simreg.orchestrator.cache.targets import CacheSpec, TargetCache
from simreg.orchestrator.weights_fetch import local_weights, weights_sha256

log = logging.getLogger("simreg")
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class TeacherSpec:
    """Everything an actor needs to rebuild a teacher (JSON-able, shipped to remote actors)."""

    name: str
    arch: str
    weights: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    key: str = "teachers[0]"
    format: str = "auto"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # the pin of teachers[i].sha256

    def local_weights(self) -> str:
        """The weights as a file on this node: fetched once into its cache (a bucket, a URL, the Hub), the pin
        checked; a random teacher's ``random:SEED`` as it is."""
        if names_random(self.weights):
            return self.weights
        return local_weights(self.weights, self.sha256, self.key)

    def build(self) -> Teacher:
        return load_teacher(
            self.name, self.arch, self.local_weights(), InputTransform(self.input_size, self.mean, self.std), key=self.key,
            layout=self.format, model_kwargs=self.model_kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def teacher_fingerprint(spec: TeacherSpec, bf16: bool, channels_last: bool, loaded_sha256: str | None = None) -> dict[str, Any]:
    """The teacher part of a cache key (``TeacherInference.fingerprint``). A random teacher (``random:SEED``) has its
    seed and the timm and torch versions where a file has its sha256: ``loaded_sha256``, that of the bytes a loaded
    teacher was built from, or (None: a key built before any teacher loads) the file's as it is now."""
    seed = random_init_seed(spec.weights)
    if seed is not None:
        weights = {"weights_init": random_init_identity(seed)}
    else:
        weights = {"weights_sha256": loaded_sha256 or weights_sha256(spec.local_weights())}
    return {
        "arch": spec.arch, **weights, "format": spec.format, "model_kwargs": spec.model_kwargs,
        "input": {"size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std)},
        "precision": "bf16" if bf16 else "fp32",
        "memory_format": "channels_last" if channels_last else "contiguous",  # other kernels, other low bits
    }


class TeacherInference:
    """One teacher in one actor: ``__call__(batch)`` adds ``target_<name>`` as float16 (B, d).

    Weights and inputs are channels_last (``channels_last=True``: the fast layout of oneDNN on CPUs and of
    cuDNN; on 2 CPU threads the demo's ResNet-10t teacher ran 31-43% faster, ``benchmarks/cpu_layout.py``);
    on CUDA it runs in bf16 autocast (``precision="auto"``); optionally compiled. With a ``cache``, rows whose
    (view index, sample id) target is stored are served from the Parquet cache and only the others go through
    the teacher (then are stored)."""

    def __init__(
        self, spec: TeacherSpec, threads: int = 2, device: str = "auto", cache: CacheSpec | None = None,
        precision: str = "auto", channels_last: bool = True, compile: bool = False,
    ) -> None:
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.spec = spec
        self.teacher = spec.build().to(self.device)
        # its targets are keyed by the bytes it runs, not by the file at its path now (it may have been replaced)
        self.weights_sha256 = self.teacher.weights_sha256
        cuda = self.device.type == "cuda"
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"teacher_pool.precision={precision!r} is unknown: use auto, fp32 or bf16")
        self.bf16 = precision == "bf16" or (precision == "auto" and cuda)
        self.channels_last = channels_last
        if self.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self._backbone: Any = torch.compile(self.teacher.backbone) if compile else self.teacher.backbone
        where = torch.cuda.get_device_name(self.device) if cuda else f"CPU ({threads} threads)"
        self.placement = f"teacher {spec.name} ({spec.arch}) runs on {where}, host {socket.gethostname()}"
        log.info("%s, pid %d", self.placement, os.getpid())
        self.cache = None
        if cache is not None:
            self.cache = TargetCache(cache.root, cache.key(self.fingerprint()), spec.name, self.teacher.feature_dim, cache.memory_mib)
        self.forward_rows = 0  # rows that went through the teacher
        self.cached_rows = 0  # rows served from the cache

    def fingerprint(self) -> dict[str, Any]:
        """The teacher part of a cache key: everything that decides its output for a given view."""
        return teacher_fingerprint(self.spec, self.bf16, self.channels_last, self.weights_sha256)

    @torch.no_grad()
    def targets(self, view: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 views in [0, 1] -> (B, d) float16 targets."""
        x = torch.tensor(view).to(self.device, non_blocking=True)  # a copy: object-store arrays are read-only
        x = self.teacher.transform(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feat = self._backbone(x)
        return feat.float().to(torch.float16).cpu().numpy()

    def flush_cache(self) -> None:
        """Wait for the cache shards still uploading (an object store); a no-op without a cache or on local disk."""
        if self.cache is not None:
            self.cache.flush()

    def __call__(self, batch: Batch) -> Batch:
        out = dict(batch)
        if self.cache is None or "view_index" not in batch:
            tg = self.targets(batch["view"])
            self.forward_rows += len(tg)
        else:
            ids, vidx = batch["sample_id"], batch["view_index"]
            tg = np.empty((len(ids), self.teacher.feature_dim), np.float16)
            for v in np.unique(vidx).tolist():
                rows = np.flatnonzero(vidx == v)
                got, found = self.cache.lookup(int(v), ids[rows])
                miss = rows[~found]
                if miss.size:
                    got[~found] = computed = self.targets(np.ascontiguousarray(batch["view"][miss]))
                    self.cache.store(int(v), ids[miss], computed)
                tg[rows] = got
                self.forward_rows += int(miss.size)
                self.cached_rows += int(rows.size - miss.size)
        out[f"target_{self.spec.name}"] = tg
        return out
