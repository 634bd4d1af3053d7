"""What makes a feature KEY: the teacher, its preprocessing, the sampling and the storage format.

Everything that changes the stored bytes goes into the KEY; the list of videos does not, so the same KEY
collects more videos later and every experiment that asks for the same settings finds it.
These are plain, typed dataclasses with JSON round-trips; nothing here touches disk, torch or Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TeacherSpec:
    """Which image model makes the targets, and which of its outputs is the embedding.

    model: a Hugging Face hub id ("openai/clip-vit-base-patch16") or a local folder.
    precision is part of the KEY: bf16 targets are not fp32 targets.
    output: "auto" picks the family's image embedding (see feature_store.teacher); or one of
        "image_embeds", "pooler", "cls", "cls+mean_patch".
    patch_grid: when > 0, also keep the patch tokens pooled to a patch_grid x patch_grid grid per frame.
    """

    model: str
    revision: str | None = None
    output: str = "auto"
    patch_grid: int = 0
    trust_remote_code: bool = False
    precision: str = "fp32"  # compute precision of the teacher: "fp32" | "bf16" | "fp16" (changes targets)


@dataclass(frozen=True)
class PreprocessSpec:
    """Geometric and photometric preprocessing, resolved from the checkpoint's preprocessor config.

    Frames are resized so the shorter side is `resize` (resample filter `resample`), centre-cropped to
    `crop` x `crop`, stored as uint8 RGB; the teacher then sees (x / 255 - mean) / std.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"  # "bilinear" | "bicubic" | "nearest"
    # "shortest_edge": shorter side to `resize`, aspect kept (CLIP, DINOv2); "square": both sides to `resize`,
    # aspect not kept (SigLIP, ViT), then the same centre crop (a no-op when crop == resize).
    resize_mode: str = "shortest_edge"


@dataclass(frozen=True)
class SamplingSpec:
    """How frames are taken from a video and cut into samples (segments).

    Exactly one of fps / stride: fps samples at that rate by presentation timestamps (right on
    variable-frame-rate files); stride takes every stride-th decoded frame.
    A segment is `segment_frames` consecutive sampled frames; consecutive segments share `overlap` frames.
    max_frames caps the sampled frames per video (0: no cap). A video shorter than one segment is
    padded by repeating its last frame (short="pad") or dropped (short="drop").
    """

    fps: float | None = 4.0
    stride: int | None = None
    segment_frames: int = 16
    overlap: int = 0
    max_frames: int = 0
    short: Literal["pad", "drop"] = "pad"

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.stride is None):
            raise ValueError("give exactly one of fps or stride")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.segment_frames < 1:
            raise ValueError("segment_frames must be >= 1")
        if not 0 <= self.overlap < self.segment_frames:
            raise ValueError("overlap must be in [0, segment_frames)")
        if self.short not in ("pad", "drop"):
            raise ValueError("short must be 'pad' or 'drop'")


@dataclass(frozen=True)
class StorageSpec:
    """How samples are encoded in the shards."""

    frame_encoding: Literal["jpeg", "png", "npy"] = "jpeg"
    jpeg_quality: int = 90
    target_dtype: Literal["float16", "float32"] = "float16"


@dataclass(frozen=True)
class FeatureSpec:
    """The full definition of a KEY. `teacher_fingerprint` is the sha256 of the teacher's weights."""

    teacher: TeacherSpec
    teacher_fingerprint: str
    teacher_class: str
    embed_dim: int
    output_used: str
    preprocess: PreprocessSpec
    sampling: SamplingSpec
    storage: StorageSpec = field(default_factory=StorageSpec)
    format_version: int = FORMAT_VERSION

    def key_material(self) -> dict[str, Any]:
        """The fields the KEY hashes: what changes stored bytes, not where the model was loaded from."""
        d = to_dict(self)
        teacher = dict(d["teacher"])
        # The weights fingerprint identifies the model; its path/id and revision are provenance only.
        for k in ("model", "revision", "trust_remote_code"):
            teacher.pop(k, None)
        d["teacher"] = teacher
        return d

    @property
    def key(self) -> str:
        return feature_key(self)


def to_dict(obj: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def feature_key(spec: FeatureSpec) -> str:
    """A short, stable, filesystem- and URL-safe name for a FeatureSpec."""
    digest = hashlib.sha256(canonical_json(spec.key_material()).encode()).hexdigest()
    return f"fk-{digest[:16]}"


def feature_spec_from_dict(d: dict[str, Any]) -> FeatureSpec:
    return FeatureSpec(
        teacher=TeacherSpec(**d["teacher"]),
        teacher_fingerprint=d["teacher_fingerprint"],
        teacher_class=d["teacher_class"],
        embed_dim=int(d["embed_dim"]),
        output_used=d["output_used"],
        preprocess=PreprocessSpec(**{**d["preprocess"], "mean": tuple(d["preprocess"]["mean"]),
                                     "std": tuple(d["preprocess"]["std"])}),
        sampling=SamplingSpec(**d["sampling"]),
        storage=StorageSpec(**d.get("storage", {})),
        format_version=int(d.get("format_version", FORMAT_VERSION)),
    )
