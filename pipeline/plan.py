"""Decide what an extraction run computes, reuses and skips. Pure: inputs and the KEY's snapshot in, a plan out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from feature_store.store import failure_id


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

        return {"source": self.source, "video_id": self.video_id, "labels": json.dumps(self.labels),
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


def known_hashes(index_rows: list[dict[str, Any]]) -> dict[tuple[str, int, float], str]:
    """(source, size, mtime) → sha256 for videos already in the KEY, so unchanged files are not re-hashed."""
    return {(r["source"], r["video_size"], r["video_mtime"]): r["video_sha256"] for r in index_rows
            if r.get("video_size")}


def make_plan(inputs: list[VideoInput], index_rows: list[dict[str, Any]], failure_rows: list[dict[str, Any]],
              *, max_attempts: int, segment_frames: int) -> Plan:
    plan = Plan()
    segs: dict[str, set[int]] = defaultdict(set)
    total: dict[str, int] = {}
    meta: dict[str, dict[str, Any]] = {}
    for r in index_rows:
        segs[r["video_sha256"]].add(r["segment"])
        total[r["video_sha256"]] = r["segments_total"]
        meta.setdefault(r["video_sha256"], r)
    failures = {f["failure_id"]: f for f in failure_rows}

    seen: set[str] = set()
    for v in inputs:
        if v.error:
            f = failures.get(failure_id("", v.source))
            if f is not None and f["attempts"] >= max_attempts:
                plan.quarantined.append((v, f"failed {f['attempts']} times: {f['error']}"))
            else:
                plan.unreadable.append(v)
            continue
        if v.sha256 in seen:
            plan.duplicates.append(v)
            continue
        seen.add(v.sha256)
        have = segs.get(v.sha256, set())
        if have and len(have) >= total[v.sha256]:
            plan.reused.append(v)
            plan.frames_reused += len(have) * segment_frames
            old = meta[v.sha256]
            if (old["source"], old["video_id"], dict(old["labels"])) != (v.source, v.video_id, v.labels) \
                    or (old["video_size"], old["video_mtime"]) != (v.size, v.mtime):
                plan.metadata_updates.append({"video_sha256": v.sha256, "source": v.source, "video_id": v.video_id,
                                              "labels": v.labels, "video_size": v.size, "video_mtime": v.mtime})
            continue
        f = failures.get(failure_id(v.sha256, v.source))
        if f is not None and (not f["retryable"] or f["attempts"] >= max_attempts):
            why = f["error"] if not f["retryable"] else f"failed {f['attempts']} times: {f['error']}"
            plan.quarantined.append((v, why))
            continue
        plan.frames_reused += len(have) * segment_frames
        plan.compute.append(WorkItem(v.source, v.video_id, v.labels, v.sha256, v.size, v.mtime,
                                     have_segments=sorted(have), attempts=f["attempts"] if f else 0))
    return plan
