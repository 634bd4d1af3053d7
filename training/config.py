"""Typed run configuration: dataclasses validated by pydantic, loadable from YAML (configs/*.yaml),
overridable field by field.

`--set student.arch=vit --set optim.lr=3e-4` overrides one nested field. Values are read as YAML scalars and
then validated against the field's type, so `3e-4` (a string to YAML 1.1) becomes the float 0.0003, and an
unknown field or a wrong type fails on load with the field's dotted path (`ConfigError`), before any
worker starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from training.models import StudentConfig
from training.objective import LossWeights

FROM_KEY = 0  # student.frames / student.image_size: take it from the KEY (see training.train.resolve_student)
SINKS = ("tensorboard", "wandb", "mlflow")
_FORBID = {"extra": "forbid"}  # a pydantic ConfigDict: unknown fields are errors, not silently dropped


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the field."""


@dataclass
class DataConfig:
    __pydantic_config__ = _FORBID
    batch_size: int = 16  # per worker, per optimiser micro-step
    shuffle_buffer: int = 256
    heldout_fraction: float = 0.2  # videos (by content hash) kept out of training for eval
    min_view_gap: int = 0  # minimum frame offset between the two views' starts


@dataclass
class LoaderConfig:
    """The torch DataLoader that decodes shards off the training step (see training/data.py)."""

    __pydantic_config__ = _FORBID
    num_workers: int = 2  # loader processes per training worker (0: decode in the training process)
    prefetch_factor: int = 4  # batches each loader process keeps ready
    pin_memory: bool = True  # only acts on CUDA


@dataclass
class AugmentConfig:
    """Only augmentations that leave the cached targets (nearly) unchanged and labels intact; see docs/method.md."""

    __pydantic_config__ = _FORBID
    temporal_jitter: bool = True  # random window positions (targets are exactly the cached frames)
    brightness: float = 0.0  # max relative brightness change (0: off); changes colour labels if large
    random_crop_scale: float = 1.0  # < 1 enables random resized crops (needs patch grids for exact targets)


@dataclass
class OptimConfig:
    __pydantic_config__ = _FORBID
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1


def _student_from_key() -> StudentConfig:
    return StudentConfig(frames=FROM_KEY, image_size=FROM_KEY)


@dataclass
class TrainConfig:
    __pydantic_config__ = _FORBID
    steps: int = 200
    workers: int = 1
    use_gpu: bool = False
    precision: str = "fp32"  # training autocast: "fp32" | "bf16" | "fp16" (with a grad scaler)
    seed: int = 0
    objective: str = "iboot"  # "iboot" | "byol" (video-only baseline, no teacher)
    targets: str = "cached"  # "cached" | "online" (teacher in the loop on the same stored frames)
    teacher: str | None = None  # for targets=online: override the KEY's teacher
    checkpoint_every: int = 50
    log_every: int = 10
    eval_every: int = 0  # > 0: rank 0 logs held-out kNN accuracy per label every N steps (knn_<label>)
    max_failures: int = 2  # Ray Train FailureConfig: worker restarts from the last checkpoint
    # BYOL's base EMA momentum; the loop raises it to 1 along BYOL's cosine schedule (objective.cosine_momentum)
    byol_momentum: float = 0.996
    # iboot: condition the clip predictor on the offset between the two windows (IBootHead.offset_conditioning)
    offset_conditioning: bool = False
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # beside metrics.jsonl; see SINKS
    # Import paths ("package.module:factory") of training callbacks each worker builds (training/callbacks.py).
    callbacks: list[str] = field(default_factory=list)
    student: StudentConfig = field(default_factory=_student_from_key)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        choices = {"precision": ("fp32", "bf16", "fp16"), "objective": ("iboot", "byol"),
                   "targets": ("cached", "online")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        unknown = set(self.report_to) - set(SINKS)
        if unknown:
            raise ValueError(f"report_to: unknown sink(s) {sorted(unknown)}; choose from {SINKS}")
        if min(self.steps, self.workers, self.checkpoint_every, self.log_every, self.data.batch_size,
               self.optim.grad_accum) < 1:
            raise ValueError("steps, workers, checkpoint_every, log_every, data.batch_size and optim.grad_accum "
                             "must be >= 1")
        if not 0.0 <= self.data.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in [0, 1), got {self.data.heldout_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["student"] = self.student.to_dict()
        return d


def _validator():
    from pydantic import TypeAdapter  # installed with Ray; imported here so the models stay pydantic-free

    StudentConfig.__pydantic_config__ = _FORBID  # type: ignore[attr-defined]
    LossWeights.__pydantic_config__ = _FORBID  # type: ignore[attr-defined]
    return TypeAdapter(TrainConfig)


def _describe(err: Any) -> str:
    """pydantic's errors as 'field.path: message' (a section's own checks are reported at the section)."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            msg = "unknown field"
        elif not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    from pydantic import ValidationError

    data = dict(data)
    student = data.get("student")
    if student is None or isinstance(student, dict):  # a student section without frames/size: from the KEY
        data["student"] = {"frames": FROM_KEY, "image_size": FROM_KEY, **(student or {})}
    try:
        return _validator().validate_python(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply FIELD=VALUE overrides (dotted paths) to a nested dict; values are YAML scalars (typed later)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not FIELD=VALUE")
        path, raw = item.split("=", 1)
        node = out
        parts = path.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file holds a mapping of fields")
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
