"""The training data path: a torch DataLoader whose worker processes read, decode, resize and collate
samples off the training step, with a position that resumes exactly.

Each training worker (rank) runs `loader.num_workers` loader processes (or reads in-process when 0). Every
loader process owns one endless stream of batches: epoch after epoch of its part of the rank's shards
(`feature_store.reader.iter_samples`, which deals shards to (rank, loader worker) and shuffles
deterministically per epoch). A batch is tagged with where its stream stands after it, so the training
process knows, per logical stream, the epoch and the samples consumed in it. The DataLoader hands out
batches from its workers in strict rotation; the position also records whose turn is next, and a resumed
loader rotates its workers' roles so the same sequence continues. Because the stream is endless, one
DataLoader iterator lives for the whole run (its workers persist; no per-epoch restart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from feature_store.reader import SplitFilter, decode_sample, iter_samples
from feature_store.store import FeatureStore


@dataclass
class StreamPosition:
    epoch: int = 0
    consumed: int = 0  # samples of this stream's current epoch already handed to training


@dataclass
class DataPosition:
    """Where one rank's data stands: one entry per loader stream, and whose batch comes next."""

    streams: list[StreamPosition] = field(default_factory=lambda: [StreamPosition()])
    next_stream: int = 0

    @classmethod
    def start(cls, streams: int) -> DataPosition:
        return cls([StreamPosition() for _ in range(streams)], 0)

    def advance(self, stream: int, epoch: int, consumed: int) -> None:
        self.streams[stream] = StreamPosition(epoch, consumed)
        self.next_stream = (stream + 1) % len(self.streams)

    @property
    def epoch(self) -> int:
        return min(s.epoch for s in self.streams)

    def to_dict(self) -> dict[str, Any]:
        return {"streams": [[s.epoch, s.consumed] for s in self.streams], "next_stream": self.next_stream}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls([StreamPosition(int(e), int(c)) for e, c in d["streams"]], int(d["next_stream"]))


@dataclass(frozen=True)
class StreamSpec:
    """What a rank's loader reads: one snapshot, its training split, and the student's frame size."""

    root: str
    key: str
    version: int
    storage_options: dict[str, Any]
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    heldout_fraction: float
    batch_size: int
    image_size: int  # frames are resized to this (the student's input size) in the loader process
    with_patches: bool = False


@dataclass
class Batch:
    frames: torch.Tensor  # uint8 [B, T, S, S, 3] at the student's size
    targets: torch.Tensor  # float32 [B, T, D]
    patches: torch.Tensor | None  # [B, T, G, G, Dp] when the run crops
    stream: int
    epoch: int
    consumed: int

    def pin_memory(self) -> Batch:  # called by the DataLoader's pinning thread (CUDA only)
        return Batch(self.frames.pin_memory(), self.targets.pin_memory(),
                     None if self.patches is None else self.patches.pin_memory(), self.stream, self.epoch,
                     self.consumed)


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> uint8 [..., size, size, 3] (antialiased bilinear); unchanged when already so."""
    if frames.shape[-3] == size and frames.shape[-2] == size:
        return frames
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return x.reshape(*lead, size, size, 3)


def collate(samples: list[dict[str, Any]], image_size: int, with_patches: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Samples -> (frames at the student's size, float32 targets, patch grids if asked)."""
    frames = resize_frames(torch.from_numpy(np.stack([s["frames"] for s in samples])), image_size)
    targets = torch.from_numpy(np.stack([s["targets"] for s in samples]).astype(np.float32))
    patches = torch.from_numpy(np.stack([sample_patches(s) for s in samples])) if with_patches else None
    return frames, targets, patches


def sample_patches(sample: dict[str, Any]) -> np.ndarray:
    if sample.get("patches") is None:
        raise ValueError(f"sample {sample.get('sample_key', '?')} has no stored patch grid: random crops need a KEY "
                         "extracted with TeacherSpec.patch_grid > 0 (subsume extract --patch-grid G)")
    return sample["patches"]


def epoch_stream(spec: StreamSpec, stream: int, streams: int, start: StreamPosition
                 ) -> Iterator[tuple[dict[str, Any], int, int]]:
    """One loader stream's samples forever from `start`: (sample, epoch, consumed in that epoch after it)."""
    store = FeatureStore(spec.root, spec.storage_options)
    snapshot = store.open(spec.key, spec.version)
    split = SplitFilter("train", spec.heldout_fraction)
    epoch, skip = start.epoch, start.consumed
    while True:
        n = 0
        for n, sample in enumerate(iter_samples(store, snapshot, rank=spec.rank, world_size=spec.world_size,
                                                epoch=epoch, seed=spec.seed, shuffle_buffer=spec.shuffle_buffer,
                                                split=split, worker_id=stream, num_workers=streams,
                                                decode=False), start=1):
            if n > skip:  # the reader has no seek: consumed samples are read again, but never decoded
                yield decode_sample(sample), epoch, n
        if n == 0:
            raise RuntimeError(f"rank {spec.rank} loader stream {stream} of {streams} got no training samples "
                               f"from {spec.key}: fewer training samples than readers? (lower loader.num_workers)")
        epoch, skip = epoch + 1, 0


class TrainStream(torch.utils.data.IterableDataset):
    """Endless batches for one rank; each DataLoader worker plays one logical stream (rotated on resume)."""

    def __init__(self, spec: StreamSpec, position: DataPosition):
        super().__init__()
        self.spec, self.position = spec, position

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        streams = len(self.position.streams)
        stream = ((info.id if info else 0) + self.position.next_stream) % streams
        samples = epoch_stream(self.spec, stream, streams, self.position.streams[stream])
        while True:
            batch = [next(samples) for _ in range(self.spec.batch_size)]
            frames, targets, patches = collate([s for s, _, _ in batch], self.spec.image_size, self.spec.with_patches)
            yield Batch(frames, targets, patches, stream, batch[-1][1], batch[-1][2])


def make_loader(spec: StreamSpec, position: DataPosition, *, num_workers: int, prefetch_factor: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over the rank's streams; `position` must have one entry per stream (max(1, num_workers))."""
    if len(position.streams) != max(1, num_workers):
        raise ValueError(f"the checkpoint's data position has {len(position.streams)} loader streams, the run "
                         f"{max(1, num_workers)}: resume with --set loader.num_workers={len(position.streams)}")
    # Loader workers start from a fresh forkserver, not a fork of this process: the store's Delta Lake client
    # (delta-rs) owns a tokio runtime that panics in a forked child.
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True,
             "multiprocessing_context": "forkserver"} if num_workers else {}
    return torch.utils.data.DataLoader(TrainStream(spec, position), batch_size=None, num_workers=num_workers,
                                       collate_fn=None, pin_memory=pin_memory, **extra)
