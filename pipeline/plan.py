"""Decide what an extraction run computes, reuses and skips. Pure: inputs and the KEY version's Arrow index and
failure state in, a plan out. Only the input videos' rows become Python objects, never the whole index."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from feature_store.ledger import decide, judge_version
from feature_store.names import name_columns
from feature_store.records import INDEX_SCHEMA, failure_id, table_rows
from feature_store.snapshot import first_per_key


@dataclass
class VideoInput:
    """One input video after the identity pre-check: its content hash, or why it could not be read."""

    source: str
    video_id: str
    labels: dict[str, str]
    sha256: str = ""
    size: int = 0
    mtime: float = 0.0
    error: str = ""  # "" when readable; else a reason ("missing", "unreadable: ...")


@dataclass
class WorkItem:
    source: str
    video_id: str
    labels: dict[str, str]
    sha256: str
    size: int
    mtime: float
    have_segments: list[int] = field(default_factory=list)  # already stored (a run killed mid-video)
    attempts: int = 0

    def to_row(self) -> dict[str, Any]:
        import json

        from feature_store.names import encode_name

        source, raw = encode_name(self.source)  # Arrow rows hold UTF-8; a non-UTF-8 name travels as its bytes
        return {"source": source, "source_raw": raw or b"", "video_id": self.video_id, "labels": json.dumps(self.labels),
                "sha256": self.sha256, "size": self.size, "mtime": self.mtime,
                "have_segments": json.dumps(self.have_segments)}


@dataclass
class Plan:
    compute: list[WorkItem] = field(default_factory=list)
    reused: list[VideoInput] = field(default_factory=list)
    quarantined: list[tuple[VideoInput, str]] = field(default_factory=list)
    unreadable: list[VideoInput] = field(default_factory=list)
    duplicates: list[VideoInput] = field(default_factory=list)
    metadata_updates: list[dict[str, Any]] = field(default_factory=list)
    frames_reused: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "to_compute": len(self.compute),
            "to_complete": sum(1 for w in self.compute if w.have_segments),
            "reused": len(self.reused),
            "quarantined": len(self.quarantined),
            "unreadable": len(self.unreadable),
            "duplicates": len(self.duplicates),
            "metadata_updates": len(self.metadata_updates),
            "frames_reused": self.frames_reused,
        }


PLAN_COLUMNS = ["video_sha256", "segment", "segments_total", "source", "source_raw", "video_id", "labels",
                "video_size", "video_mtime"]


KNOWN_COLUMNS = ["source", "video_size", "video_mtime", "video_sha256"]


def index_for_listing(snapshot, stats: list[tuple[str, int, float]]) -> pa.Table:
    """The KEY version's (source, size, mtime, sha256) rows for the listed sources only (an Arrow filter)."""
    if snapshot is None or not stats:
        return INDEX_SCHEMA.empty_table().select(KNOWN_COLUMNS)
    sources, _ = name_columns(sorted({s[0] for s in stats}))
    return snapshot.index_columns(KNOWN_COLUMNS, filter=pc.field("source").isin(sources))


def index_for_inputs(snapshot, inputs: list[VideoInput]) -> pa.Table:
    """The KEY version's PLAN_COLUMNS rows of the input videos only (an Arrow filter on video_sha256)."""
    shas = pa.array(sorted({v.sha256 for v in inputs if v.sha256}), pa.string())
    if snapshot is None or not len(shas):
        return INDEX_SCHEMA.empty_table().select(PLAN_COLUMNS)
    return snapshot.index_columns(PLAN_COLUMNS, filter=pc.field("video_sha256").isin(shas))


def known_hashes(stats: list[tuple[str, int, float]], index: pa.Table) -> list[str]:
    """For each (source, size, mtime) of the listing, the sha256 the KEY already holds for that unchanged file
    ("" if none), by an Arrow join against the index (columns source, video_size, video_mtime, video_sha256)."""
    if not stats or index.num_rows == 0:
        return [""] * len(stats)
    source, _ = name_columns([s[0] for s in stats])
    left = pa.table({"i": pa.array(range(len(stats)), pa.int64()), "source": source,
                     "video_size": pa.array([s[1] for s in stats], pa.int64()),
                     "video_mtime": pa.array([s[2] for s in stats], pa.float64())})
    right = index.select(["source", "video_size", "video_mtime", "video_sha256"])
    right = right.filter(pc.greater(right.column("video_size"), 0))
    right = right.group_by(["source", "video_size", "video_mtime"]).aggregate([("video_sha256", "min")])
    joined = left.join(right, ["source", "video_size", "video_mtime"], join_type="left outer")
    out = [""] * len(stats)
    for i, sha in zip(joined.column("i").to_pylist(), joined.column("video_sha256_min").to_pylist()):
        out[i] = sha or ""
    return out


@dataclass
class _Known:
    """What the KEY holds about the input videos only (Arrow-selected; Python objects per input, not per row)."""

    segs: dict[str, tuple[int, int]]  # sha -> (segments stored, segments_total)
    have: dict[str, list[int]]  # sha -> stored segment numbers, for videos not complete
    meta: dict[str, dict[str, Any]]  # sha -> one stored row's metadata
    failures: dict[str, dict[str, Any]]  # failure_id -> failure state row


def _known(inputs: list[VideoInput], index: pa.Table, failures: pa.Table) -> _Known:
    shas = pa.array(sorted({v.sha256 for v in inputs if v.sha256}), pa.string())
    rows = index.filter(pc.is_in(index.column("video_sha256"), value_set=shas)) if index.num_rows else index
    per = rows.group_by("video_sha256").aggregate([("segment", "count_distinct"), ("segments_total", "max")])
    segs = {r["video_sha256"]: (r["segment_count_distinct"], r["segments_total_max"]) for r in per.to_pylist()}
    partial = [s for s, (n, total) in segs.items() if n < total]
    have: dict[str, list[int]] = defaultdict(list)
    if partial:
        part = rows.filter(pc.is_in(rows.column("video_sha256"), value_set=pa.array(partial, pa.string())))
        for sha, seg in zip(part.column("video_sha256").to_pylist(), part.column("segment").to_pylist()):
            have[sha].append(seg)
    firsts = first_per_key(rows, "video_sha256", "source")[0] if rows.num_rows else rows
    meta = {r["video_sha256"]: r for r in table_rows(firsts.drop_columns(
        [c for c in ("frame_indices", "timestamps") if c in firsts.column_names]))}
    ids = pa.array(sorted({failure_id(v.sha256, v.source) for v in inputs} | {failure_id("", v.source) for v in inputs}),
                   pa.string())
    fails = failures.filter(pc.is_in(failures.column("failure_id"), value_set=ids)) if failures.num_rows else failures
    return _Known(segs, {k: sorted(set(v)) for k, v in have.items()}, meta,
                  {f["failure_id"]: f for f in table_rows(fails)})


def make_plan(inputs: list[VideoInput], index: pa.Table, failures: pa.Table, *, max_attempts: int,
              segment_frames: int, retry_failed: bool = False, judge_now: str | None = None) -> Plan:
    """`index`: the KEY version's index (at least PLAN_COLUMNS; only the input videos' rows matter),
    `failures`: its failure state (FAILURES_SCHEMA). Whether a failed video is retried is `ledger.decide`'s call."""
    plan = Plan()
    known = _known(inputs, index, failures)
    judge_now = judge_now or judge_version()

    def verdict(f: dict[str, Any]):
        return decide(error=f["error"], cause=f.get("cause") or ("transient" if f.get("retryable") else "deterministic"),
                      attempts=f["attempts"], judged_by=f.get("judged_by") or "", judge_now=judge_now,
                      max_attempts=max_attempts, retry_failed=retry_failed)

    seen: set[str] = set()
    for v in inputs:
        if v.error:
            f = known.failures.get(failure_id("", v.source))
            if f is not None and not verdict(f).retry:
                plan.quarantined.append((v, verdict(f).why))
            else:
                plan.unreadable.append(v)
            continue
        if v.sha256 in seen:
            plan.duplicates.append(v)
            continue
        seen.add(v.sha256)
        n_have, total = known.segs.get(v.sha256, (0, 0))
        if n_have and n_have >= total:
            _reuse(plan, v, known.meta[v.sha256], n_have, segment_frames)
            continue
        f = known.failures.get(failure_id(v.sha256, v.source))
        if f is not None and not verdict(f).retry:
            plan.quarantined.append((v, verdict(f).why))
            continue
        have = known.have.get(v.sha256, [])
        plan.frames_reused += len(have) * segment_frames
        plan.compute.append(WorkItem(v.source, v.video_id, v.labels, v.sha256, v.size, v.mtime,
                                     have_segments=have, attempts=f["attempts"] if f else 0))
    return plan


def _reuse(plan: Plan, v: VideoInput, old: dict[str, Any], n_have: int, segment_frames: int) -> None:
    plan.reused.append(v)
    plan.frames_reused += n_have * segment_frames
    if (old["source"], old["video_id"], dict(old["labels"])) != (v.source, v.video_id, v.labels) \
            or (old["video_size"], old["video_mtime"]) != (v.size, v.mtime):
        plan.metadata_updates.append({"video_sha256": v.sha256, "source": v.source, "video_id": v.video_id,
                                      "labels": v.labels, "video_size": v.size, "video_mtime": v.mtime})
