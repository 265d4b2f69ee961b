"""One typed config for a SimReg run: YAML file + ``key=value`` overrides -> frozen pydantic model.

The same dotted names (``heads.depth``, ``optim.lr``, ``teachers.0.arch``) are used on the command
line, in search spaces and as MLflow params. Every problem is reported at once, each with the bad value
and the fix.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from simreg.models.errors import ConfigError
from simreg.models.loss import LOSSES
from simreg.models.random_init import names_random, random_init_seed, random_weights_ref
from simreg.orchestrator.data.sources import SOURCES, source_names
from simreg.orchestrator.weights_fetch import is_fetched

BUILTIN_PREFIX = "builtin:"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "models" / "weights"
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)


def _registered(name: str, names: list[str], what: str, where: str = "") -> str:
    """A name from one of the registries (data sources, losses), or the error that lists them."""
    if name not in names:
        raise ValueError(f"unknown {what}; use one of {names}{where}")
    return name


def _no_secret_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A secret has no place in a config: simreg writes the config to the run folder, MLflow and Ray's run state
    (masked there, so a run would get the mask, not the secret). Tokens come from the environment."""
    from simreg.orchestrator.tracking.redact import SECRET_KEY

    # a string under a secret-looking name; a flag such as timm's ``class_token: false`` is no secret
    bad = [k for k, v in kwargs.items() if SECRET_KEY.search(str(k)) and isinstance(v, str) and v]
    if bad:
        raise ValueError(f"{bad} look like secrets: pass them through the environment (e.g. HF_TOKEN), never in a config that simreg "
                         "writes to the run folder and MLflow")
    return kwargs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(_Strict):
    """``data.source=synthetic``: images generated from (seed, index) on demand (data/synthetic.py)."""

    images: int = Field(100000, ge=2, description="images of the train split (data.train_size draws a subset of them)")
    held_out: int = Field(10000, ge=1, description="images of the held-out split (k-NN queries)")
    classes: int = Field(10, ge=2, description="classes, one grating orientation sector each")
    channels: Literal[1, 3] = Field(3, description="1: grayscale (N, H, W) images; 3: RGB")
    seed: int = Field(0, ge=0, description="the generator's seed (not the run's seed: runs of any seed see the same images)")


class DataConfig(_Strict):
    source: str = Field(
        "fashion-mnist", description="a registered data source (data/sources.py): fashion-mnist, image-folder, packed, synthetic"
    )
    root: str | None = Field(None, description="folder of the source; null = Debian package, then download cache")
    download: bool = Field(True, description="download Fashion-MNIST when it is not installed")
    train_size: int | None = Field(10000, ge=2, description="images of the train split distilled on (null = all)")
    knn_bank_size: int | None = Field(10000, ge=1, description="labelled train images forming the k-NN bank")
    knn_query_size: int | None = Field(2000, ge=1, description="held-out images queried in the k-NN eval")
    view_size: int = Field(64, ge=8, description="resolution of the shared view (teacher input size)")
    store_size: int = Field(96, ge=8, description="image-folder and packed images are decoded and stored at this size; synthetic ones generated at it")
    stream: bool = Field(
        True, description="packed sources: the train split streams from the Parquet shards through Ray Data (false: decoded in memory); "
        "synthetic: always streamed"
    )
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="image-folder / packed held-out share when no val/ split")
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        return _registered(v, source_names(), "data source")

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        hint = SOURCES[self.source].needs_root
        if hint and not self.root:
            raise ValueError(hint)
        return self


class AugmentConfig(_Strict):
    """The paper's Table 7 grid: (same | different) image x (weak | strong) for teacher and student."""

    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range (at strength 1)")
    hflip_p: float = Field(0.5, ge=0, le=1)
    mode: Literal["same", "different"] = Field(
        "same", description="same: teacher and student see one view; different: each its own view of the image"
    )
    teacher: Literal["weak", "strong"] = Field("weak", description="weak: crop + flip; strong: MoCo-v2 (adds jitter, grayscale, blur)")
    student: Literal["weak", "strong"] = "weak"
    strength: float = Field(
        1.0, ge=0, le=1.2,
        description="scales crop-scale lower bound, jitter magnitude and probabilities (1 = as published, 0 = none)",
    )
    view_bank: int | None = Field(
        4, ge=1, description="K views per sample, epoch e uses view e mod K (null: a fresh view every epoch)"
    )

    @model_validator(mode="after")
    def _same_view(self) -> AugmentConfig:
        if self.mode == "same" and self.teacher != self.student:
            raise ValueError(
                f"augment.mode=same gives teacher and student one view, but augment.teacher={self.teacher} and "
                f"augment.student={self.student}: set them equal, or use augment.mode=different"
            )
        return self

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError(f"crop_scale={list(v)} must satisfy 0 < low <= high <= 1, e.g. [0.2, 1.0]")
        return v


class TeacherConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="identifier used in metric names")
    arch: str = Field(description="timm architecture of the backbone")
    weights: str = Field(
        description="safetensors / torch state dict: a path, s3:// gs:// abfs:// https:// URI, hf-hub:ORG/NAME[@REV], builtin:<name>, "
                    "or random / random:SEED (the arch randomly initialised: no file)"
    )
    sha256: str | None = Field(None, description="optional pin: the weights file's sha256 (sha256sum FILE), checked before use")
    input_size: int = Field(64, ge=8)
    mean: tuple[float, float, float] = FMNIST_MEAN
    std: tuple[float, float, float] = FMNIST_STD
    weight: float = Field(1.0, gt=0, description="weight of this teacher in the mean over teachers")
    format: Literal["auto", "plain", "moco", "mocov3", "swav", "dino"] = Field(
        "auto", description="checkpoint layout (auto: detected; plain covers timm/torchvision/BYOL/SimCLR)"
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments, e.g. {img_size: 64}")
    normalize: Literal["l2", "standardize", "phi_s"] = Field(
        "l2", description="the target's map before the loss: l2 (SimReg's), standardize (per dimension), phi_s (PHI-S); "
                          "standardize and phi_s use statistics estimated once per teacher and data (loss.stats_images)"
    )

    @field_validator("model_kwargs")
    @classmethod
    def _no_secret(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _no_secret_kwargs(v)

    @field_validator("sha256")
    @classmethod
    def _pin(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError(f"{v!r} is not a sha256: 64 hex digits, as `sha256sum FILE` prints them")
        return v

    @field_validator("weights")
    @classmethod
    def _random_seed(cls, v: str) -> str:
        random_init_seed(v)  # ValueError for random:<not a seed>
        if is_fetched(v):
            from simreg.orchestrator.tracking.redact import redact_text

            if redact_text(v) != v:  # a password, a token, a presigned signature: the config is written everywhere
                raise ValueError("this URI holds credentials, and simreg writes the config to the run folder and MLflow: use s3:// "
                                 "with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or HF_TOKEN for the Hub")
        return v

    def weights_path(self) -> Path:
        """The weights file (not for a random teacher: see ``weights_ref``)."""
        if self.weights.startswith(BUILTIN_PREFIX):
            return WEIGHTS_DIR / f"{self.weights[len(BUILTIN_PREFIX):]}.safetensors"
        return Path(self.weights).expanduser()

    def weights_ref(self) -> str:
        """What a teacher is loaded from: ``random:SEED`` for a random teacher, else the weights file's path (made
        absolute where the path alone would read as random, e.g. ``./random``)."""
        seed = random_init_seed(self.weights)
        if seed is not None:
            return random_weights_ref(seed)
        if is_fetched(self.weights):  # a bucket, a URL, the Hub: fetched where it is loaded (weights_fetch.py)
            return self.weights
        path = self.weights_path()
        return str(path.absolute()) if names_random(path) else str(path)


class StudentConfig(_Strict):
    arch: str = "resnet10t"
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")

    @field_validator("model_kwargs")
    @classmethod
    def _no_secret(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _no_secret_kwargs(v)
    input_size: int | None = Field(32, ge=8, description="student input resolution (null = view_size)")
    mean: tuple[float, float, float] = FMNIST_MEAN
    std: tuple[float, float, float] = FMNIST_STD


class HeadsConfig(_Strict):
    depth: int = Field(4, ge=1, le=16)
    width_mult: float = Field(2.0, gt=0)
    layout: Literal["paper", "official"] = "paper"


class OptimConfig(_Strict):
    lr: float = Field(0.2, gt=0, description="SGD learning rate at train.batch_size")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)


Precision = Literal["auto", "fp32", "bf16"]


class TrainConfig(_Strict):
    epochs: int = Field(16, ge=1)
    batch_size: int = Field(128, ge=2, description="global batch, split over the workers")
    precision: Precision = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool = Field(True, description="channels_last student weights (CPU and CUDA)")
    compile: bool = Field(False, description="torch.compile the student backbone")
    loss: str = Field("simreg", description="regression loss per head (models/loss.py LOSSES): simreg = 2 - 2 cos")
    ddp_compression: Literal["none", "fp16", "bf16"] = Field(
        "none", description="compress the DDP gradient all-reduce (half the bytes; gradients rounded on the wire)"
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        return _registered(v, sorted(LOSSES), "loss", " (models/loss.py)")


class LossConfig(_Strict):
    teacher_drop: float = Field(
        0.0, ge=0, lt=1, description="UNIC's teacher dropping: per image, keep the teacher with the highest loss and drop each other "
                                     "one with this probability (0: off; several teachers only)"
    )
    stats_images: int = Field(
        4096, ge=64, description="images whose view-0 targets estimate a teacher's mean and covariance (teachers[i].normalize="
                                 "standardize | phi_s); stored beside the target cache"
    )


class CacheConfig(_Strict):
    enabled: bool = Field(True, description="serve teacher targets from the Parquet cache, filling it on first use")
    dir: str | None = Field(None, description="null: $SIMREG_CACHE_DIR or ~/.cache/simreg/targets (shared storage on a cluster)")
    memory_mib: float = Field(
        256, ge=0, description="MiB of decoded target shards each process keeps (teacher and fleet actors, the driver); the rest stays in storage"
    )


class ScalingConfig(_Strict):
    num_workers: int | tuple[int, int] = Field(
        2, description="student DDP workers: N, or [min, max] for an elastic run that resizes with the cluster"
    )
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(0.5, gt=0)
    threads_per_worker: int = Field(1, ge=1, description="torch threads in each student worker")
    resources: dict[str, float] = Field(
        default_factory=dict, description="extra (custom) Ray resources each student worker holds, e.g. {student_gpu: 1}"
    )
    label_selector: dict[str, str] = Field(default_factory=dict, description="node labels a student worker must land on")
    max_failures: int = Field(
        3, ge=-1, description="worker-group failures recovered from the last checkpoint (-1: without limit, 0: none)"
    )
    resize_interval_s: float = Field(60.0, ge=0, description="elastic runs: seconds between checks for a new size")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if not 1 <= lo <= hi:
            raise ValueError(f"num_workers={v!r} must be N >= 1 or [min, max] with 1 <= min <= max, e.g. [1, 4]")
        return v

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


class TeacherPoolConfig(_Strict):
    actors_per_teacher: int = Field(1, ge=1, description="run-long actors per teacher (one GPU each on a GPU cluster)")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs each teacher actor reserves")
    view_tasks: int = Field(2, ge=1, description="view-stage tasks in flight (each renders a block, then waits on the teachers)")
    cpus_per_view_task: float = Field(0.25, gt=0)
    gpus_per_actor: Literal["auto"] | float = "auto"
    threads: int = Field(2, ge=1, description="torch threads in each teacher actor")
    batch_size: int = Field(128, ge=1)
    precision: Precision = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool = Field(True, description="channels_last teacher weights and inputs (CPU and CUDA)")
    compile: bool = Field(False, description="torch.compile the teacher backbone")
    resources: dict[str, float] = Field(
        default_factory=dict, description="extra (custom) Ray resources each teacher actor holds, e.g. {teacher_gpu: 1}"
    )
    label_selector: dict[str, str] = Field(default_factory=dict, description="node labels a teacher actor must land on")
    max_restarts: int = Field(
        3, ge=-1, description="times over the run Ray restarts a teacher actor that died (its calls retried; -1: no limit); then the run ends FAILED naming it"
    )
    call_timeout_s: float = Field(
        600.0, gt=0, description="seconds a view task waits for a teacher's targets of one block before the run ends FAILED"
    )
    fleet: bool = Field(
        True, description="sweeps: one teacher fleet serves every trial (false: each trial starts its own teacher actors)"
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, description="ms a teacher actor waits for more requests (other trials, other blocks) to fill a batch of batch_size rows"
    )


class EvalConfig(_Strict):
    batch_size: int = Field(256, ge=1)
    threads: int = Field(2, ge=1)
    val_every: int = Field(1, ge=0, description="validation k-NN every N epochs and at the last (0 = off)")
    val_bank_size: int = Field(1000, ge=1, description="validation bank: labelled train-split images")
    val_query_size: int = Field(500, ge=1, description="validation queries: other train-split images")
    knn_weighting: Literal["majority", "temperature"] = Field("majority", description="k-NN vote (majority: the paper's)")
    knn_temperature: float = Field(0.07, gt=0, description="T of the temperature-weighted vote exp(sim / T)")
    head_layers: tuple[int, ...] = Field(
        (), description="also evaluate the student after the first k layers of each head (the paper's Table 2)"
    )


class ExportConfig(_Strict):
    onnx: bool = Field(
        False, description="also export the student to ONNX at the end of a run (and with a sweep's registered model): checked "
        "to export before training, parity against PyTorch checked before the file is written")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(None, description="null = sqlite:///<output_dir>/mlflow.db")
    experiment: str = "simreg"
    register_best: str | None = Field(
        None, description="sweeps: register the best trial's student in the Model Registry under this name (a new version each sweep)"
    )
    system_metrics_s: float = Field(
        10.0, ge=0, description="seconds between two samples of every node's CPU, memory, disk, network and GPUs, logged to "
        "the run as system/... (MLflow's System metrics tab); 0 = none, else at least 0.5")

    @field_validator("system_metrics_s")
    @classmethod
    def _interval(cls, v: float) -> float:
        if 0 < v < 0.5:
            raise ValueError("sample at most every 0.5 s (or 0: none)")
        return v


class RayConfig(_Strict):
    address: str | None = Field(None, description="null = start a local cluster; 'auto' = join a running one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (null = all)")
    object_store_mib: int | None = Field(
        None, ge=128, description="the local cluster's object store in MiB (null = Ray's default, 30% of RAM); every "
        "process that moves blocks maps the pages of the store it touches, so this also bounds their RSS")


class SimRegConfig(_Strict):
    """A whole SimReg distillation run. The defaults are the offline demo."""

    name: str = "demo"
    seed: int = 0
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    teachers: tuple[TeacherConfig, ...] = (
        TeacherConfig(name="simclr_r10t", arch="resnet10t", weights="builtin:fmnist_simclr_resnet10t"),
    )
    student: StudentConfig = StudentConfig()
    heads: HeadsConfig = HeadsConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    scaling: ScalingConfig = ScalingConfig()
    teacher_pool: TeacherPoolConfig = TeacherPoolConfig()
    eval: EvalConfig = EvalConfig()
    cache: CacheConfig = CacheConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _teachers(self) -> SimRegConfig:
        if not self.teachers:
            raise ValueError("teachers is empty: give at least one teacher (name, arch, weights)")
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teachers have duplicate names {dup}: give each teacher its own name")
        bad = [k for k in self.eval.head_layers if not 1 <= k <= self.heads.depth]
        if bad:
            raise ValueError(
                f"eval.head_layers={list(self.eval.head_layers)} has {bad} outside 1..heads.depth={self.heads.depth}: "
                "list layer counts a head has (the backbone is always evaluated)"
            )
        if self.train.batch_size < 2 * self.scaling.max_workers:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} gives fewer than 2 images per worker "
                f"(scaling.num_workers={self.scaling.num_workers}): raise the batch or lower the workers"
            )
        return self

    @property
    def student_input_size(self) -> int:
        return self.student.input_size or self.data.view_size


# ---------------------------------------------------------------- loading, overrides, flattening


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"][:-1])
            valid = sorted(parent.model_fields) if parent else []
            msg = f"unknown key; valid keys here: {valid}"
        inp = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(inp, dict) else f" (got {inp!r})"
        lines.append(f"  - {loc}: {msg}{shown}")
    n = len(lines)
    return f"Found {n} error{'s' if n > 1 else ''} in the config ({source}):\n" + "\n".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = SimRegConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        cand = [a for a in (inner or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cand:
            return None
        model = cand[0]
    return model


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a nested dict/list tree (list indices are integers)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted}: index {part!r} is out of range (list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is not a section")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for p in pairs:
        if "=" not in p or not re.match(r"^[A-Za-z_][\w.]*=", p):
            raise ConfigError(f"override {p!r} is not key=value: write e.g. heads.depth=2 or teachers.0.arch=resnet50")
        k, v = p.split("=", 1)
        out.append((k, _parse_value(v)))
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimRegConfig:
    """Defaults <- YAML file <- overrides, validated; raises ConfigError listing every problem."""
    tree: dict[str, Any] = json.loads(SimRegConfig().model_dump_json())
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist: pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {str(p)!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}): "
                "save it as UTF-8"
            ) from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (data:, teachers:, ...)")
        tree = _deep_merge(tree, loaded)
        source = str(p)
    for k, v in parse_overrides(overrides or []):
        apply_override(tree, k, v)
    return validate_config(tree, source)


def validate_config(tree: dict[str, Any], source: str = "dict") -> SimRegConfig:
    try:
        return SimRegConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(cfg: SimRegConfig) -> dict[str, Any]:
    """Dotted keys -> scalar values (lists of scalars as JSON), the MLflow param set."""
    out: dict[str, Any] = {}

    def rec(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                rec(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, list) and any(isinstance(x, dict) for x in node):
            for i, v in enumerate(node):
                rec(f"{prefix}.{i}", v)
        else:
            out[prefix] = json.dumps(node) if isinstance(node, list) else node

    rec("", json.loads(cfg.model_dump_json()))
    return out
