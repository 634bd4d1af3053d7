"""Typed run configuration: dataclasses, loadable from YAML (configs/*.yaml), overridable field by field.

`--set student.arch=vit --set optim.lr=3e-4` overrides one nested field; values are parsed as YAML
scalars, so numbers, booleans and lists work as expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from training.models import StudentConfig
from training.objective import LossWeights


@dataclass
class DataConfig:
    view_frames: int = 8  # frames per temporal view (a window over a sample's stored frames)
    batch_size: int = 16  # per worker, per optimiser micro-step
    shuffle_buffer: int = 256
    heldout_fraction: float = 0.2  # videos (by content hash) kept out of training for eval
    min_view_gap: int = 0  # minimum frame offset between the two views' starts


@dataclass
class AugmentConfig:
    """Only augmentations that leave the cached targets (nearly) unchanged and labels intact; see docs/method.md."""

    temporal_jitter: bool = True  # random window positions (targets are exactly the cached frames)
    brightness: float = 0.0  # max relative brightness change (0: off); changes colour labels if large
    random_crop_scale: float = 1.0  # < 1 enables random resized crops (needs patch grids for exact targets)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    steps: int = 200
    workers: int = 1
    use_gpu: bool = False
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast; fp16 with a grad scaler)
    seed: int = 0
    objective: str = "iboot"  # "iboot" | "byol" (video-only baseline, no teacher)
    targets: str = "cached"  # "cached" | "online" (teacher in the loop on the same stored frames)
    teacher: str | None = None  # for targets=online: override the KEY's teacher
    checkpoint_every: int = 50
    log_every: int = 10
    eval_every: int = 0  # > 0: rank 0 logs held-out kNN accuracy per label every N steps (knn_<label>)
    max_failures: int = 2  # Ray Train FailureConfig: worker restarts from the last checkpoint
    byol_momentum: float = 0.99
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["student"] = self.student.to_dict()
        return d


def _build(cls: type, data: dict[str, Any]) -> Any:
    if cls is StudentConfig:
        return StudentConfig.from_dict(data)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        sub = _SECTIONS.get((cls, name))
        kwargs[name] = _build(sub, value or {}) if sub else value
    return cls(**kwargs)


_SECTIONS = {(TrainConfig, "student"): StudentConfig, (TrainConfig, "data"): DataConfig,
             (TrainConfig, "augment"): AugmentConfig, (TrainConfig, "optim"): OptimConfig,
             (TrainConfig, "loss"): LossWeights}


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply FIELD=VALUE overrides (dotted paths) to a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not FIELD=VALUE")
        path, raw = item.split("=", 1)
        node = out
        parts = path.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file holds a mapping of fields")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
