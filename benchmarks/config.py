"""Benchmark sizes: a small CPU preset (a few minutes on 2 cores) and a GPU preset with realistic teachers.

Every size is a field of `BenchConfig`; `--set FIELD=VALUE` overrides one (YAML scalars, lists as
`a,b` or `[a, b]`), e.g. `--preset gpu --set teachers=tiny,small --set image_size=32` to try the GPU preset
end to end on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

BENCHMARKS = ("cached_vs_online", "extraction", "loader", "reuse", "storage", "scaling", "store_scale",
              "decode_memory", "multinode", "ingest_scale", "learning")
# What a run without --only does: learning trains ~20 students (about half an hour), so it runs when asked.
DEFAULT_BENCHMARKS = tuple(n for n in BENCHMARKS if n != "learning")
# What the GPU preset can run on a machine without Ray, decord or webdataset.
RAY_FREE_BENCHMARKS = ("cached_vs_online", "extraction", "storage")


@dataclass(frozen=True)
class TeacherShape:
    """A random-weight CLIPVisionModelWithProjection of this shape stands in for a real teacher."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    projection: int


TEACHER_SHAPES: dict[str, TeacherShape] = {
    "tiny": TeacherShape(hidden=32, layers=2, heads=4, intermediate=64, patch=8, projection=16),
    "small": TeacherShape(hidden=192, layers=6, heads=6, intermediate=768, patch=8, projection=128),
    "vit-b16": TeacherShape(hidden=768, layers=12, heads=12, intermediate=3072, patch=16, projection=512),
    "vit-l14": TeacherShape(hidden=1024, layers=24, heads=16, intermediate=4096, patch=14, projection=768),
}


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "cpu"
    device: str = "auto"  # "auto": CUDA when available
    # torch intra-op threads of this process (0: torch's default, one per core). The CPU preset uses 1: Ray
    # Train's CPU workers and the pipeline's actors hold one CPU each, and so one torch thread, and a 1-thread
    # process is far steadier than a multi-threaded one when other work competes for the cores. The
    # stages-alone figures use one thread regardless; the plain extraction loop runs on both.
    threads: int = 0
    seed: int = 0
    # teachers for the cached-vs-online and fidelity benchmarks (a cheap and an expensive one)
    teachers: tuple[str, ...] = ("tiny", "small")
    # the teacher of the extraction runs (extraction, reuse, scaling, storage, loader): on a CPU the "small"
    # shape costs per frame about what decoding does, as real teachers do at least
    extract_teacher: str = "small"
    image_size: int = 64  # teacher input = stored frame size = student input
    # sample videos and sampling (extraction, reuse, scaling, loader)
    videos: int = 24  # the 1x set; scaling also runs 2x and 4x
    scales: tuple[int, ...] = (1, 2, 4)
    video_size: int = 64
    video_frames: int = 48
    fps: float = 12.0
    segment_frames: int = 16
    extract_batch: int = 64  # teacher batch in frames
    samples_per_shard: int = 64  # pipeline.extract's default
    # student step (cached vs online)
    student_arch: str = "r2plus1d"
    student_size: str = "tiny"
    student_patch: int = 8  # the ViT student's patch side (r2plus1d ignores it)
    view_frames: int = 8
    batch_size: int = 4
    steps: int = 5  # timed steps per repeat
    warmup_steps: int = 2
    repeats: int = 3  # cached, teacher-alone and online measurements are interleaved this many times
    frames_alone: int = 512  # frames for the per-stage (decode / teacher alone) measurements
    loader_epochs: int = 2
    # decode memory: a long and a 1-minute generated video (small frames, so generating them is quick)
    decode_long_s: float = 1200.0
    decode_short_s: float = 60.0
    decode_video_fps: float = 10.0
    rss_interval_s: float = 0.1
    # store_scale: KEY sizes (samples), the committed batch, commits timed per size, backends, planned videos
    store_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    store_batch: int = 512
    store_commits: int = 15
    store_backends: tuple[str, ...] = ("local", "s3")
    store_plan_videos: int = 10_000
    # ingest_scale: corpus sizes (input videos) and how many of them are new (computed by the real run)
    ingest_sizes: tuple[int, ...] = (10_000, 100_000)
    ingest_new: int = 4
    # learning (benchmarks/learning.py): "quick" (CI-sized) or "full" (demo size, 3 seeds); steps, seeds and
    # learning rates override the preset's when given; torch threads for its training (0: one per core);
    # where its JSON, table and PNGs go ("": WORKDIR/learning/out)
    learning_preset: str = "full"
    learning_steps: int = 0
    learning_eval_every: int = 0  # validation cadence in steps (0: the preset's, or steps / 8 with learning_steps)
    learning_seeds: int = 0
    learning_lrs: tuple[float, ...] = ()  # the learning rates swept on validation (empty: the preset's)
    learning_threads: int = 0
    learning_headline_only: bool = False  # train only the default iBoot rung and BYOL (no ablations): longer runs
    learning_out: str = ""

    def __post_init__(self) -> None:
        unknown = [t for t in (*self.teachers, self.extract_teacher) if t not in TEACHER_SHAPES]
        if unknown:
            raise ValueError(f"unknown teacher shape(s) {unknown}; known: {sorted(TEACHER_SHAPES)}")
        if not self.teachers:
            raise ValueError("give at least one teacher")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        if min(self.videos, self.steps, self.repeats, self.batch_size, self.view_frames) < 1:
            raise ValueError("videos, steps, repeats, batch_size and view_frames must be >= 1")
        if self.view_frames > self.segment_frames:
            raise ValueError("view_frames must be <= segment_frames")
        if 1 not in self.scales:
            raise ValueError("scales must include 1 (the baseline)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"threads": 1},
    # Realistic teachers at 224 px (random weights) and a ViT-S video student; only the Ray-free benchmarks.
    "gpu": {"teachers": ("vit-b16", "vit-l14"), "extract_teacher": "vit-b16", "image_size": 224,
            "student_arch": "vit", "student_size": "small",
            "student_patch": 16,
            "batch_size": 16, "steps": 10, "warmup_steps": 3, "repeats": 3, "frames_alone": 2048,
            "extract_batch": 256},
}


def _coerce(name: str, raw: str, current: Any) -> Any:
    value = yaml.safe_load(raw)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):
            value = [value]
        kind = type(current[0]) if current else str
        return tuple(kind(v) for v in value)
    if isinstance(current, bool) or current is None:
        return value
    if isinstance(current, (int, float, str)):
        try:
            return type(current)(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--set {name}={raw}: expected {type(current).__name__}") from e
    return value


def make_config(preset: str = "cpu", overrides: list[str] | None = None) -> BenchConfig:
    """The preset's config with `FIELD=VALUE` overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    values = {**BenchConfig().to_dict(), **PRESETS[preset], "preset": preset}
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not FIELD=VALUE")
        name, raw = (s.strip() for s in item.split("=", 1))
        if name not in names or name == "preset":
            raise ValueError(f"--set {name}: no such field; fields: {', '.join(sorted(names - {'preset'}))}")
        values[name] = _coerce(name, raw, values[name])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return BenchConfig(**values)
