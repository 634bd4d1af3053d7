"""Typed records of the store: shard records, target statistics, commit batches, and the table schemas."""

from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .names import name_columns

INDEX_SCHEMA = pa.schema([
    ("sample_key", pa.string()),
    ("video_sha256", pa.string()),
    ("video_id", pa.string()),
    ("source", pa.string()),
    ("source_raw", pa.binary()),  # the name's bytes when it is not valid UTF-8 (names.py)
    ("segment", pa.int32()),
    ("segments_total", pa.int32()),
    ("frame_indices", pa.list_(pa.int64())),
    ("timestamps", pa.list_(pa.float64())),
    ("labels", pa.map_(pa.string(), pa.string())),
    ("shard", pa.string()),
    ("num_frames", pa.int32()),
    ("decoder", pa.string()),
    ("video_size", pa.int64()),
    ("video_mtime", pa.float64()),
])

SHARDS_SCHEMA = pa.schema([
    ("name", pa.string()),
    ("count", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("run_id", pa.string()),
    ("stats_n", pa.int64()),
    ("stats_sum", pa.list_(pa.float64())),
    ("stats_sumsq", pa.list_(pa.float64())),
    ("fid_n", pa.int64()),
    ("fid_sum", pa.float64()),
    ("fid_min", pa.float64()),
])


# Files whose bytes the index already holds under another source (extraction's commit-time dedup): planning
# joins a listing against them by (source, size, mtime), so a known copy is not decoded again.
COPIES_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("source_raw", pa.binary()),
    ("video_size", pa.int64()),
    ("video_mtime", pa.float64()),
    ("video_sha256", pa.string()),
    ("run_id", pa.string()),
])


class StoreError(Exception):
    pass


class KeyNotFound(StoreError):
    pass


def utcnow(micro: bool = False) -> str:
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ"
    return _dt.datetime.now(_dt.timezone.utc).strftime(fmt)


def new_run_id() -> str:
    return f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"


def failure_id(video_sha256: str, source: str) -> str:
    """Failures are keyed by content hash where the bytes were readable, by source otherwise (a name that is
    not UTF-8 by its bytes, base64: the id must be a valid string and unique)."""
    import base64

    if video_sha256:
        return f"sha:{video_sha256}"
    try:
        source.encode("utf-8")
        return f"src:{source}"
    except UnicodeEncodeError:
        return "srcb64:" + base64.urlsafe_b64encode(source.encode("utf-8", "surrogateescape")).decode()


@dataclass
class ShardRecord:
    name: str  # relative to the KEY folder, e.g. "shards/20261127-ab12cd34-0f3e.tar"
    count: int
    bytes: int
    sha256: str


@dataclass
class TargetStats:
    """Running per-dimension sums of the stored targets (float64), merged across shards and commits."""

    n: int = 0
    sum: list[float] = field(default_factory=list)
    sumsq: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, targets: np.ndarray) -> "TargetStats":
        t = targets.reshape(-1, targets.shape[-1]).astype(np.float64)
        return cls(n=int(t.shape[0]), sum=t.sum(0).tolist(), sumsq=(t * t).sum(0).tolist())

    def merge(self, other: "TargetStats") -> "TargetStats":
        if not other.n:
            return self
        if not self.n:
            return other
        return TargetStats(self.n + other.n, (np.add(self.sum, other.sum)).tolist(),
                           (np.add(self.sumsq, other.sumsq)).tolist())

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.sum) / max(self.n, 1)
        var = np.asarray(self.sumsq) / max(self.n, 1) - mean * mean
        return mean, np.sqrt(np.maximum(var, 1e-12))


@dataclass
class Fidelity:
    """Cosine similarity of stored targets to the float32 teacher output (raw and centred)."""

    n: int = 0
    sum_cos: float = 0.0
    min_cos: float = 1.0

    def merge(self, other: "Fidelity") -> "Fidelity":
        return Fidelity(self.n + other.n, self.sum_cos + other.sum_cos, min(self.min_cos, other.min_cos))

    def summary(self) -> dict[str, Any]:
        return {"frames": self.n, "mean_cos": (self.sum_cos / self.n) if self.n else None,
                "min_cos": self.min_cos if self.n else None}


@dataclass
class CommitBatch:
    """What a writer adds in one commit."""

    shards: list[ShardRecord] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # index rows, INDEX_SCHEMA
    failures: list[dict[str, Any]] = field(default_factory=list)  # failed attempts of this run
    succeeded: list[str] = field(default_factory=list)  # failure ids to clear (videos now extracted)
    metadata_updates: list[dict[str, Any]] = field(default_factory=list)  # video_sha256, source, video_id, labels, video_size, video_mtime
    stats: TargetStats = field(default_factory=TargetStats)  # sums over the batch's samples
    fidelity: Fidelity = field(default_factory=Fidelity)
    run_id: str = ""
    shard_stats: dict[str, TargetStats] = field(default_factory=dict)  # per shard name, when the writer has them
    shard_fidelity: dict[str, Fidelity] = field(default_factory=dict)
    max_attempts: int | None = None  # the run's --max-attempts, recorded in the version (inspect reads it)
    judged_by: str = ""  # decoder + judging-code version behind this batch's failure verdicts
    copies: list[dict[str, Any]] = field(default_factory=list)  # COPIES_SCHEMA rows: duplicates this batch found

    def empty(self) -> bool:
        return not (self.shards or self.rows or self.failures or self.succeeded or self.metadata_updates
                    or self.copies)


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """A small Arrow table from dict rows (a batch, never a whole index). Names go through names.py."""
    if not rows:
        return schema.empty_table()
    cols: dict[str, Any] = {}
    named = "source_raw" in schema.names
    for f in schema:
        if named and f.name in ("source", "source_raw"):
            continue
        vals = [r.get(f.name) for r in rows]
        if pa.types.is_map(f.type):
            vals = [sorted((v or {}).items()) for v in vals]
        cols[f.name] = pa.array(vals, f.type)
    if "source_raw" in schema.names:
        cols["source"], cols["source_raw"] = name_columns([r.get("source") or "" for r in rows])
    return pa.table(cols, schema=schema)


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Python rows of a SMALL table (a batch, one shard's rows); names decoded back to str."""
    from .names import decode_name

    rows = table.to_pylist()
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    for r in rows:
        for m in maps:
            r[m] = dict(r[m] or [])
        if "source_raw" in r:
            r["source"] = decode_name(r["source"], r.pop("source_raw"))
    return rows
