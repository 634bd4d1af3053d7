"""Readers over a KEY: a webdataset pipeline for torch, and a Ray Dataset for Ray Train.

Both read the shards of one version (so a run is reproducible even after the KEY has grown), yield only
the samples that version's index lists, take labels from the index (authoritative: a renamed video's
labels change there, not in the shard), and decode with our own no-pickle decoders. The driver needs only the
version's shard list; each reader reads the index rows of its own shards (an Arrow filter), never the whole
index. `shard_urls` gives the same shard list as URLs for plain `webdataset`.

Each sample is a dict: sample_key, video_sha256, frames (uint8 [T, S, S, 3]), targets (float [T, D]),
patches (optional), labels (dict), meta (dict).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from . import fsutil
from .shards import parse_sample
from .splits import is_heldout
from .records import table_rows
from .store import FeatureStore, Snapshot

ROW_COLUMNS = ["sample_key", "video_sha256", "labels", "shard"]


@dataclass(frozen=True)
class SplitFilter:
    """Which videos a reader yields: all, the training part, or the held-out part (by video content hash)."""

    split: str = "all"  # "all" | "train" | "heldout"
    heldout_fraction: float = 0.2

    def keep(self, video_sha256: str) -> bool:
        if self.split == "all":
            return True
        held = is_heldout(video_sha256, self.heldout_fraction)
        return held if self.split == "heldout" else not held


def rows_by_key(snapshot: Snapshot, shards: list[str]) -> dict[str, dict[str, Any]]:
    """sample_key -> (video_sha256, labels, shard) for the samples of these shards only."""
    return {r["sample_key"]: r for r in table_rows(snapshot.rows_for_shards(shards, ROW_COLUMNS))}


def shard_urls(root: str, key: str, *, version: int | None = None, storage_options: dict | None = None) -> list[str]:
    """The shards of one version as URLs, for plain `webdataset.WebDataset(urls)` (which then reads every
    sample in them, including a rare duplicate copy the index skips; use iter_samples for exact samples)."""
    store = FeatureStore(root, storage_options)
    return store.open(key, version).shard_urls()


def open_shard(store: FeatureStore, key: str, shard: str):
    return store.fs.open(fsutil.join(store.key_path(key), shard), "rb")


def iter_shard(store: FeatureStore, snapshot: Snapshot, shard: str, rows: dict[str, dict[str, Any]],
               split: SplitFilter = SplitFilter(), *, decode: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of one shard that the snapshot lists (and the split keeps), decoded (or, with decode=False,
    still as their raw bytes under "raw": `decode_sample` finishes them)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    encoding = snapshot.spec.storage.frame_encoding
    with open_shard(store, snapshot.key, shard) as stream:
        for raw in group_by_keys(tar_file_expander([{"url": shard, "stream": stream}])):
            row = rows.get(raw["__key__"])
            if row is None or row["shard"] != shard or not split.keep(row["video_sha256"]):
                continue
            sample = parse_sample(raw, encoding) if decode else {"sample_key": raw["__key__"], "raw": raw,
                                                                   "frame_encoding": encoding}
            sample["video_sha256"] = row["video_sha256"]
            sample["labels"] = dict(row["labels"])
            yield sample


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample read with decode=False, decoded: the same dict `iter_samples` yields by default."""
    if "raw" not in sample:
        return sample
    out = parse_sample(sample["raw"], sample["frame_encoding"])
    out["video_sha256"], out["labels"] = sample["video_sha256"], sample["labels"]
    return out


def partition(items: list, rank: int, world_size: int) -> list:
    return items[rank::world_size]


def iter_samples(store: FeatureStore, snapshot: Snapshot, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 seed: int = 0, shuffle_buffer: int = 0, split: SplitFilter = SplitFilter(),
                 worker_id: int = 0, num_workers: int = 1, decode: bool = True) -> Iterator[dict[str, Any]]:
    """One epoch of samples for one (node rank, loader worker), disjoint across both and deterministic.

    Shards are shuffled per epoch with `seed`, then dealt out by rank and loader worker. When there are
    fewer shards than readers, every reader opens every shard and keeps every n-th sample instead, so the
    parts stay disjoint. A shuffle buffer then mixes samples across the reader's shards. With decode=False
    samples stay raw bytes (`decode_sample` finishes one): a resumed reader skips consumed ones undecoded.
    """
    shards = list(snapshot.shard_names())
    random.Random(seed * 100_003 + epoch).shuffle(shards)
    readers, me = world_size * num_workers, rank * num_workers + worker_id

    def stream() -> Iterator[dict[str, Any]]:
        if len(shards) >= readers:
            mine = partition(shards, me, readers)
            rows = rows_by_key(snapshot, mine)
            for shard in mine:
                yield from iter_shard(store, snapshot, shard, rows, split, decode=decode)
        else:
            i = 0
            rows = rows_by_key(snapshot, shards)
            for shard in shards:
                for sample in iter_shard(store, snapshot, shard, rows, split, decode=decode):
                    if i % readers == me:
                        yield sample
                    i += 1

    if shuffle_buffer <= 1:
        yield from stream()
        return
    rng = random.Random((seed * 100_003 + epoch) * 1_000 + me)
    buf: list[dict[str, Any]] = []
    for sample in stream():
        buf.append(sample)
        if len(buf) >= shuffle_buffer:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def torch_dataset(root: str, key: str, *, version: int | None = None, storage_options: dict | None = None,
                  rank: int | None = None, world_size: int | None = None, epoch: int = 0, seed: int = 0,
                  shuffle_buffer: int = 256, split: SplitFilter = SplitFilter(),
                  transform: Callable[[dict[str, Any]], Any] | None = None):
    """A torch IterableDataset over one snapshot of a KEY, split by node (rank) and DataLoader worker.

    rank/world_size default to torch.distributed's when it is initialised. Use with
    `torch.utils.data.DataLoader(ds, batch_size=..., num_workers=...)`; call `ds.set_epoch(e)` between epochs.
    """
    import torch
    import torch.distributed as dist
    from torch.utils.data import IterableDataset, get_worker_info

    store = FeatureStore(root, storage_options)
    snapshot = store.open(key, version)
    snapshot.shard_names()  # computed once here; loader workers inherit it and read only their shards' rows
    if rank is None or world_size is None:
        on = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)

    class KeyDataset(IterableDataset):
        def __init__(self) -> None:
            self.epoch = epoch
            self.snapshot = snapshot

        def set_epoch(self, e: int) -> None:
            self.epoch = e

        def __iter__(self):
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            for s in iter_samples(store, snapshot, rank=rank, world_size=world_size, epoch=self.epoch, seed=seed,
                                  shuffle_buffer=shuffle_buffer, split=split, worker_id=wid, num_workers=nw):
                s = {**s, "frames": torch.from_numpy(s["frames"]), "targets": torch.from_numpy(s["targets"])}
                yield transform(s) if transform else s

    return KeyDataset()


def ray_dataset(root: str, key: str, *, version: int | None = None, storage_options: dict | None = None,
                split: SplitFilter = SplitFilter()):
    """A Ray Dataset with one row per sample of one snapshot of a KEY (same fields as torch_dataset)."""
    import json

    import ray

    store = FeatureStore(root, storage_options)
    snapshot = store.open(key, version)
    shards = snapshot.shard_names()

    def read(item: dict[str, Any]) -> list[dict[str, Any]]:
        rows = rows_by_key(snapshot, [item["shard"]])  # the snapshot travels small (see Snapshot.__getstate__)
        out = []
        for s in iter_shard(snapshot.store, snapshot, item["shard"], rows, split):
            s["meta"] = json.dumps(s["meta"], sort_keys=True)
            s["labels"] = json.dumps(s["labels"], sort_keys=True)
            out.append(s)
        return out

    return ray.data.from_items([{"shard": s} for s in shards]).flat_map(read)
