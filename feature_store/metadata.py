"""Renamed or relabelled videos: a Delta MERGE that scans the index for their rows and rewrites only the data
files holding them (targets never change). It is its own version; the digest change of the rows it rewrote is
kept beside the log (`_subsume_digests/`), since a merge's commit metadata is written before it is known."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from . import scan
from .names import name_columns
from .records import INDEX_SCHEMA
from .tables import TOKEN, DeltaLocation, find_token

UPDATE_FIELDS = ("source", "source_raw", "video_id", "labels", "video_size", "video_mtime")


def updates_table(updates: list[dict[str, Any]]) -> pa.Table:
    source, raw = name_columns([u.get("source", "") for u in updates])
    return pa.table({
        "video_sha256": pa.array([u["video_sha256"] for u in updates], pa.string()),
        "source": source, "source_raw": raw,
        "video_id": pa.array([u.get("video_id", "") for u in updates], pa.string()),
        "labels": pa.array([sorted((u.get("labels") or {}).items()) for u in updates], pa.map_(pa.string(), pa.string())),
        "video_size": pa.array([u.get("video_size") or 0 for u in updates], pa.int64()),
        "video_mtime": pa.array([u.get("video_mtime") or 0.0 for u in updates], pa.float64()),
    })


def apply_metadata_updates(index: DeltaLocation, updates: list[dict[str, Any]], run_id: str) -> int:
    """Set source, video_id, labels, size and mtime of every row of each updated video. Returns the version."""
    import uuid

    from deltalake import CommitProperties

    from .store import table_digest

    src = updates_table(updates)
    table = index.open()
    base = table.version()
    videos = scan.Match("video_sha256", src.column("video_sha256"))
    before = scan.read(scan.dataset(table, INDEX_SCHEMA), where=videos)
    token = uuid.uuid4().hex
    props = CommitProperties(custom_metadata={TOKEN: token, "run_id": run_id, "subsume_op": "metadata_update"})
    try:
        (table.merge(src, predicate="t.video_sha256 = s.video_sha256", source_alias="s", target_alias="t",
                     commit_properties=props)
         .when_matched_update({f: f"s.{f}" for f in UPDATE_FIELDS}).execute())
    except Exception:
        landed = find_token(index, token, base)
        if landed is None:
            raise
        return landed
    version = find_token(index, token, base)
    after = scan.read(scan.dataset(index.open(version), INDEX_SCHEMA), where=videos)  # string_view files: scan.py
    _record_digest_change(index, version, table_digest(after), table_digest(before))
    return version


def _record_digest_change(index: DeltaLocation, version: int, after: str, before: str) -> None:
    """The digest delta of a merge, kept beside the log (a merge's commit metadata is written before we know it)."""
    from . import fsutil

    delta = (int(after, 16) - int(before, 16)) % 2**128
    path = fsutil.join(index.path, "_subsume_digests", f"{version:020d}")
    fsutil.atomic_write(index.fs, path, f"{delta:032x}".encode())
