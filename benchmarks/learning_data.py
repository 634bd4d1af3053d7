"""The learning benchmark's data: the demo's videos, its teacher and a KEY extracted through the product
pipeline (`pipeline.extract.run_extract`), built once in the work folder, then the KEY's samples loaded once
into memory with their split (train / val / test by video hash, `feature_store.splits.split_of`).

Holding the KEY in memory (a few tens of MB at demo size) lets ~20 training runs share one read of the
shards; the training step, windows, augmentation and evaluation stay the product's (benchmarks/learning_runs.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from feature_store.splits import split_of

APPEARANCE = ("shape", "colour")  # labels one frame shows; every other label is motion (direction, speed, ...)


@dataclass(frozen=True)
class DataSpec:
    videos: int
    video_frames: int = 48
    video_fps: float = 12.0
    size: int = 64
    fps: float = 4.0  # the demo's sampling: one 16-frame segment spans the whole motion
    segment_frames: int = 16
    teacher_steps: int | None = None  # None: the demo teacher's own (DemoTeacherConfig.steps), as `make demo` builds it
    teacher_overrides: tuple[tuple[str, Any], ...] = ()  # DemoTeacherConfig fields (the quick preset shrinks it)
    heldout_fraction: float = 0.2  # the test split (feature_store.splits.is_heldout)
    val_fraction: float = 0.2


@dataclass
class LearningData:
    """A KEY in memory: frames uint8 [N, S, H, W, 3], raw targets float32 [N, S, D], labels and splits."""

    key: str
    root: str
    version: int
    frames: np.ndarray
    targets: np.ndarray
    labels: dict[str, list[str]]
    split: np.ndarray  # "train" | "val" | "test" per sample
    videos: list[str]
    target_mean: np.ndarray
    target_std: np.ndarray
    teacher_dir: str
    teacher_flops_per_frame: float
    extract: dict[str, Any]

    def index(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples and videos per split (shown beside every table)."""
        out = {}
        for name in ("train", "val", "test"):
            idx = self.index(name)
            out[name] = {"samples": int(len(idx)), "videos": len({self.videos[i] for i in idx})}
        return out

    @property
    def motion_labels(self) -> list[str]:
        return [n for n in sorted(self.labels) if n not in APPEARANCE]

    @property
    def appearance_labels(self) -> list[str]:
        return [n for n in sorted(self.labels) if n in APPEARANCE]


def build_key(workdir: str, spec: DataSpec, connect: Callable[[], None], log: Callable[[str], None]) -> dict[str, Any]:
    """Videos, demo teacher and extraction into `workdir` (each step skipped or reused when already there)."""
    from feature_store.spec import SamplingSpec, StorageSpec, TeacherSpec
    from pipeline.extract import ExtractConfig, run_extract
    from subsume.demo_teacher import build_demo_teacher
    from subsume.sample_data import generate_videos

    videos_dir, teacher_dir = os.path.join(workdir, "videos"), os.path.join(workdir, "teacher")
    manifest = os.path.join(videos_dir, "manifest.csv")
    if not os.path.exists(manifest):
        log(f"learning: generating {spec.videos} demo videos in {videos_dir}")
        generate_videos(videos_dir, spec.videos, seed=0, size=spec.size, frames=spec.video_frames, fps=spec.video_fps)
    steps = {"steps": spec.teacher_steps} if spec.teacher_steps else {}
    build_demo_teacher(teacher_dir, seed=0, image_size=spec.size, log=log, **steps, **dict(spec.teacher_overrides))
    log("learning: extracting (reuses the store when it holds the KEY already)")
    result = run_extract(ExtractConfig(
        videos=manifest, store=os.path.join(workdir, "store"), teacher=TeacherSpec(model=os.path.abspath(teacher_dir)),
        sampling=SamplingSpec(fps=spec.fps, segment_frames=spec.segment_frames), storage=StorageSpec(),
        samples_per_shard=48, batch_size=128, progress=False), connect=connect)
    if result.get("videos_failed"):
        raise RuntimeError(f"extraction failed for some videos: {result.get('failures_by_reason')}")
    return {**result, "teacher_dir": os.path.abspath(teacher_dir), "store": os.path.join(workdir, "store")}


def teacher_flops_per_frame(teacher_dir: str, size: int, frames: np.ndarray) -> float:
    """Forward FLOPs of the teacher on one frame (torch.utils.flop_counter over a batch of 8)."""
    from torch.utils.flop_counter import FlopCounterMode

    from feature_store.spec import TeacherSpec
    from feature_store.teacher import load_teacher

    teacher = load_teacher(TeacherSpec(model=teacher_dir), size=size, device="cpu")
    batch = frames[:8]
    with FlopCounterMode(display=False) as counter:
        teacher.embed(batch)
    return counter.get_total_flops() / len(batch)


def load_key(built: dict[str, Any], spec: DataSpec) -> LearningData:
    """Every sample of the KEY into memory (its labels, split and the KEY's target statistics)."""
    from feature_store.reader import iter_samples
    from feature_store.store import FeatureStore

    store = FeatureStore(built["store"])
    snap = store.open(built["key"])
    frames, targets, labels, videos = [], [], [], []
    for s in iter_samples(store, snap):
        if not s["labels"]:
            continue
        frames.append(s["frames"])
        targets.append(s["targets"].astype(np.float32))
        labels.append(dict(s["labels"]))
        videos.append(s["video_sha256"])
    order = np.argsort(np.array(videos), kind="stable")  # independent of shard order
    names = sorted(set().union(*labels))
    mean, std = snap.target_mean_std()
    frames_arr = np.stack(frames)[order]
    return LearningData(
        key=snap.key, root=built["store"], version=snap.version, frames=frames_arr,
        targets=np.stack(targets)[order], labels={n: [labels[i].get(n, "") for i in order] for n in names},
        split=np.array([split_of(videos[i], spec.heldout_fraction, spec.val_fraction) for i in order]),
        videos=[videos[i] for i in order], target_mean=np.asarray(mean, np.float32),
        target_std=np.asarray(std, np.float32), teacher_dir=built["teacher_dir"],
        teacher_flops_per_frame=teacher_flops_per_frame(built["teacher_dir"], spec.size, frames_arr[0]),
        extract={k: built.get(k) for k in ("key", "samples", "frames_computed", "frames_reused", "wall_s")})


def prepare(workdir: str, spec: DataSpec, connect: Callable[[], None], log: Callable[[str], None]) -> LearningData:
    os.makedirs(workdir, exist_ok=True)
    torch.manual_seed(0)
    data = load_key(build_key(workdir, spec, connect, log), spec)
    log(f"learning: KEY {data.key}: {len(data.videos)} samples, labels {sorted(data.labels)}, splits {data.counts()}")
    return data
