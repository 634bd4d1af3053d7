"""Decide what an extraction run computes, reuses and skips, in Arrow. Pure: the listing (pipeline.sources.
LISTING_SCHEMA plus a `sha256` column, "" where the content is not known yet) and the KEY version's index and
failure state in; a plan out whose work list is an Arrow table (WORK_SCHEMA), written as Parquet for Ray Data.

Known files (same source, size and mtime/ETag as the index holds) get their content hash from the index by a
join; complete ones are reused, partial ones completed. New files are hashed by the decode stage as it reads
them, and two copies of one content are told apart at commit (pipeline.tally.Claims). Python objects are made
only for the few videos that need a ledger decision (`ledger.decide`, the one retry policy), for reused
videos whose labels may have changed (a bounded batch at a time), and never for the whole index.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_store.ledger import decide, judge_version
from feature_store.names import decode_name, name_columns
from feature_store.records import INDEX_SCHEMA, failure_id
from feature_store.snapshot import first_per_key
from pipeline.sources import LISTING_SCHEMA

# The work list: one row per video to decode. `sha256` is "" for a new file (the decode stage hashes it).
WORK_SCHEMA = pa.schema([
    ("source", pa.string()), ("source_raw", pa.binary()), ("video_id", pa.string()),
    ("labels", pa.map_(pa.string(), pa.string())), ("size", pa.int64()), ("mtime", pa.float64()),
    ("sha256", pa.string()),
    ("have_segments", pa.list_(pa.int32())),  # already stored (a run killed mid-video)
    ("attempts", pa.int32()),  # failed attempts so far (ledger)
])
# The listing after `join_known`: the content hash where known ("" otherwise), and whether the file is a
# recorded copy (its bytes are indexed under another source: it is not reused under its own name).
PLANNED_SCHEMA = LISTING_SCHEMA.append(pa.field("sha256", pa.string())).append(pa.field("known_copy", pa.bool_()))
PLAN_COLUMNS = ["video_sha256", "segment", "segments_total", "source", "source_raw", "video_id", "labels",
                "video_size", "video_mtime"]
KNOWN_COLUMNS = ["source", "video_size", "video_mtime", "video_sha256"]
BATCH = 4096  # rows turned into Python objects at a time (metadata comparison)
PLAN_CHUNK = 8192  # videos planned at a time (make_plan): the planner's scratch does not grow with the corpus


def release_memory(rows: int) -> None:
    """Hand a planning step's scratch back to the OS (Python garbage, Arrow's pool, glibc's free lists), so
    the driver's peak is the largest step, not the sum of the steps' leftovers. Skipped for a listing of
    fewer than PLAN_CHUNK `rows`: its scratch is small, and a full garbage collection in a process that holds
    torch and a teacher costs 0.1-0.5 s a call (a third of a small job's planning, profiled)."""
    import gc
    import sys

    if rows < PLAN_CHUNK:
        return

    gc.collect()
    pa.default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


@dataclass
class VideoInput:
    """One input video with its content hash (if known), for callers that plan a handful of videos."""

    source: str
    video_id: str
    labels: dict[str, str]
    sha256: str = ""
    size: int = 0
    mtime: float = 0.0
    error: str = ""  # "" when readable; else a reason ("missing", "unreadable: ...")


@dataclass
class Plan:
    """The work list (Arrow, WORK_SCHEMA) and what the run does not compute, as counts and short lists."""

    work: pa.Table = field(default_factory=WORK_SCHEMA.empty_table)
    reused: int = 0
    duplicates: int = 0  # same content twice in the listing (known hashes); new files are deduplicated at commit
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (source, why)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (source, error)
    metadata_updates: list[dict[str, Any]] = field(default_factory=list)
    frames_reused: int = 0
    retrying: set[str] = field(default_factory=set)  # sha256 of videos retried after a failure (few)
    partial: dict[str, int] = field(default_factory=dict)  # sha256 -> segments stored, videos being completed

    @property
    def compute(self) -> pa.Table:
        return self.work

    def summary(self) -> dict[str, Any]:
        return {"to_compute": self.work.num_rows, "to_complete": len(self.partial), "reused": self.reused,
                "quarantined": len(self.quarantined), "unreadable": len(self.unreadable),
                "duplicates": self.duplicates, "metadata_updates": len(self.metadata_updates),
                "frames_reused": self.frames_reused}


def inputs_table(inputs: list[VideoInput]) -> pa.Table:
    """A few VideoInputs as a planned listing (PLANNED_SCHEMA)."""
    source, raw = name_columns([v.source for v in inputs])
    return pa.table({"source": source, "source_raw": raw, "video_id": [v.video_id for v in inputs],
                     "labels": [list(v.labels.items()) for v in inputs], "size": [v.size for v in inputs],
                     "mtime": [float(v.mtime) for v in inputs], "error": [v.error for v in inputs],
                     "sha256": [v.sha256 for v in inputs], "known_copy": [False] * len(inputs)},
                    schema=PLANNED_SCHEMA)


def index_for_sources(snapshot, sources: pa.Array) -> pa.Table:
    """The KEY version's (source, size, mtime, sha256) rows for the listed sources only (an Arrow filter)."""
    if snapshot is None or not len(sources):
        return INDEX_SCHEMA.empty_table().select(KNOWN_COLUMNS)
    return snapshot.index_matching(KNOWN_COLUMNS, "source", pc.unique(sources))


def index_for_listing(snapshot, stats: list[tuple[str, int, float]]) -> pa.Table:
    return index_for_sources(snapshot, name_columns(sorted({s[0] for s in stats}))[0])


def index_for_shas(snapshot, shas: pa.Array) -> pa.Table:
    """The KEY version's PLAN_COLUMNS rows of these contents only (an Arrow filter on video_sha256)."""
    shas = pc.unique(pc.drop_null(shas)).filter(pc.not_equal(pc.unique(pc.drop_null(shas)), ""))
    if snapshot is None or not len(shas):
        return INDEX_SCHEMA.empty_table().select(PLAN_COLUMNS)
    return snapshot.index_matching(PLAN_COLUMNS, "video_sha256", shas)


def index_for_inputs(snapshot, inputs: list[VideoInput]) -> pa.Table:
    return index_for_shas(snapshot, pa.array([v.sha256 for v in inputs], pa.string()))


def _lookup(left: pa.Table, right: pa.Table, keys: list[str], right_keys: list[str] | None = None) -> np.ndarray:
    """For each row of `left`, the row of `right` with the same keys (-1 if none; `right` unique on them).
    A join of the key columns and row numbers only (Arrow joins refuse map and list payload columns)."""
    lk = left.select(keys).append_column("_l", pa.array(np.arange(left.num_rows), pa.int64()))
    rk = right.select(right_keys or keys).rename_columns(keys)
    rk = rk.append_column("_r", pa.array(np.arange(right.num_rows), pa.int64()))
    joined = lk.join(rk, keys, join_type="left outer")
    out = np.full(left.num_rows, -1, np.int64)
    found = joined.filter(pc.is_valid(joined.column("_r")))
    out[found.column("_l").to_numpy()] = found.column("_r").to_numpy()
    return out


def _take(table: pa.Table, rows: np.ndarray, column: str, default: Any, type_: pa.DataType) -> pa.Array:
    """table[column] at `rows` (-1: `default`)."""
    col = table.column(column).combine_chunks().cast(type_) if table.num_rows else pa.array([], type_)
    taken = col.take(pa.array(np.where(rows < 0, 0, rows) if len(col) else np.zeros(0, np.int64), pa.int64())) \
        if len(col) else pa.nulls(len(rows), type_)
    return pc.if_else(pa.array(rows < 0), pa.scalar(default, type_), taken)


def join_known(listing: pa.Table, index: pa.Table, copies: pa.Table | None = None, *,
               chunk: int = PLAN_CHUNK) -> pa.Table:
    """The listing with `sha256`: the hash the index (or the KEY's record of copies) holds for an unchanged
    file (same source, size and mtime), "" otherwise; and `known_copy`. Arrow joins, `chunk` listed files at a
    time against their range of names in the index (sorted once); the listing's order kept."""
    base = listing.drop_columns([c for c in ("sha256", "known_copy") if c in listing.column_names])
    base = base.append_column("_i", pa.array(np.arange(base.num_rows), pa.int64()))
    base = base.sort_by([("source", "ascending"), ("_i", "ascending")])
    index = index.select(KNOWN_COLUMNS).filter(pc.greater(index.column("video_size"), 0)).sort_by("source")
    copies = copies.select(KNOWN_COLUMNS).sort_by("source") if copies is not None and copies.num_rows else None
    parts = []
    for start, end in _chunk_bounds(base.column("source"), chunk):
        part = base.slice(start, end - start)
        known = _key_range(copies, "source", part.column("source")) if copies is not None else None
        parts.append(_join_chunk(part, _key_range(index, "source", part.column("source")), known))
    if not parts:
        return PLANNED_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by("_i").select(PLANNED_SCHEMA.names)


def _join_chunk(part: pa.Table, index: pa.Table, copies: pa.Table | None) -> pa.Table:
    """`join_known` for one chunk of the listing and the index (and copies) rows of its names."""
    right = index.group_by(["source", "video_size", "video_mtime"]).aggregate([("video_sha256", "min")])
    rows = _lookup(part, right, ["source", "size", "mtime"], ["source", "video_size", "video_mtime"])
    sha = _take(right, rows, "video_sha256_min", "", pa.string())
    copy = pa.array(np.zeros(part.num_rows, bool))
    if copies is not None and copies.num_rows:
        known = copies.group_by(["source", "video_size", "video_mtime"]).aggregate([("video_sha256", "min")])
        at = _lookup(part, known, ["source", "size", "mtime"], ["source", "video_size", "video_mtime"])
        copy = pa.array((at >= 0) & (rows < 0))
        sha = pc.if_else(copy, _take(known, at, "video_sha256_min", "", pa.string()), sha)
    return part.append_column("sha256", sha).append_column("known_copy", copy)


def known_hashes(stats: list[tuple[str, int, float]], index: pa.Table) -> list[str]:
    """`join_known` for a few (source, size, mtime) triples."""
    table = inputs_table([VideoInput(s, "", {}, size=z, mtime=m) for s, z, m in stats])
    return join_known(table, index).column("sha256").to_pylist()


class _Ledger:
    """`ledger.decide` over the few failure-state rows that match the listing."""

    def __init__(self, failures: pa.Table, ids: pa.Array | pa.ChunkedArray, max_attempts: int, retry_failed: bool,
                 judge_now: str):
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        rows = failures.filter(pc.is_in(failures.column("failure_id"), value_set=ids)) if failures.num_rows \
            else failures
        self.rows = {r["failure_id"]: r for r in rows.to_pylist()}
        self.kw = dict(judge_now=judge_now, max_attempts=max_attempts, retry_failed=retry_failed)

    def verdict(self, fid: str):
        f = self.rows.get(fid)
        if f is None:
            return None
        cause = f.get("cause") or ("transient" if f.get("retryable") else "deterministic")
        return f, decide(error=f["error"], cause=cause, attempts=f["attempts"], judged_by=f.get("judged_by") or "",
                         **self.kw)


def make_plan(listing: pa.Table | list[VideoInput], index: pa.Table, failures: pa.Table, *, max_attempts: int,
              segment_frames: int, retry_failed: bool = False, judge_now: str | None = None,
              chunk: int = PLAN_CHUNK) -> Plan:
    """`listing`: PLANNED_SCHEMA (or a few VideoInputs); `index`: the KEY version's rows of the listed
    contents (at least PLAN_COLUMNS); `failures`: its failure state (FAILURES_SCHEMA).

    Planned `chunk` videos at a time, so the planner's scratch (joins, group-bys, filtered copies) is one
    chunk's, whatever the corpus: known files in content-hash order (copies of one content fall in one chunk;
    each chunk reads only its hash range of the index, itself sorted once), new files in listing order."""
    if isinstance(listing, list):
        listing = inputs_table(listing)
    plan, kw = Plan(), dict(max_attempts=max_attempts, retry_failed=retry_failed,
                            judge_now=judge_now or judge_version())
    listing = listing.append_column("_i", pa.array(np.arange(listing.num_rows), pa.int64()))
    unreadable = listing.filter(pc.not_equal(listing.column("error"), ""))
    _plan_unreadable(plan, unreadable, _Ledger(failures, _ids(unreadable, by_sha=False), **kw))
    ok = pc.equal(listing.column("error"), "")
    new = listing.filter(pc.and_(ok, pc.equal(listing.column("sha256"), "")))
    known = listing.filter(pc.and_(ok, pc.not_equal(listing.column("sha256"), "")))
    known = known.sort_by([("sha256", "ascending"), ("_i", "ascending")])
    index = index.sort_by("video_sha256") if index.num_rows else index
    works = []
    for start in range(0, new.num_rows, chunk):
        part = new.slice(start, chunk)
        works.append(_work(part, plan, _Ledger(failures, _ids(part, by_sha=False), **kw), by_sha=False))
    for start, end in _chunk_bounds(known.column("sha256"), chunk):
        part = known.slice(start, end - start)
        # each chunk matches its own ids against the failure state (few rows): a listing-wide id array
        # would cost the driver ~0.4 KiB a video (measured), a per-chunk scan of the failures costs time only
        ledger = _Ledger(failures, _ids(part, by_sha=True), **kw)
        rows = _key_range(index, "video_sha256", part.column("sha256"))
        works.append(_plan_known(plan, part, rows, ledger, segment_frames, listing.num_rows))
    release_memory(listing.num_rows)
    work = pa.concat_tables(works) if works else None
    plan.work = work.sort_by("_i").drop_columns(["_i"]) if work is not None and work.num_rows \
        else WORK_SCHEMA.empty_table()
    return plan


def _plan_known(plan: Plan, part: pa.Table, index: pa.Table, ledger: _Ledger, segment_frames: int,
                n_listed: int) -> pa.Table:
    """One chunk of known files: one file per content (the indexed name first; a recorded copy only when its
    original is not listed), complete ones reused (their metadata refreshed), the rest to work rows."""
    rank = pc.add(part.column("_i"), pc.multiply(pc.cast(part.column("known_copy"), pa.int64()), n_listed))
    kept, dropped = first_per_key(part.append_column("_rank", rank), "sha256", "_rank")
    plan.duplicates += dropped.num_rows
    kept = _with_segments(kept.drop_columns(["_rank"]), index)
    complete = pc.and_(pc.greater(kept.column("n_have"), 0),
                       pc.greater_equal(kept.column("n_have"), kept.column("total")))
    reused = kept.filter(complete)
    plan.reused += reused.num_rows
    plan.frames_reused += int(pc.sum(kept.column("n_have")).as_py() or 0) * segment_frames
    _metadata_updates(plan, reused, index)
    return _work(kept.filter(pc.invert(complete)), plan, ledger, by_sha=True)


def _chunk_bounds(shas: pa.ChunkedArray, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) row ranges of about `size` rows over sorted hashes, never splitting one hash's rows."""
    n, start = len(shas), 0
    while start < n:
        end = min(n, start + size)
        while end < n and shas[end] == shas[end - 1]:
            end += 1
        yield start, end
        start = end


class _SortedColumn(Sequence):
    """A sorted Arrow string column as a sequence for `bisect`: values read one at a time, no Python copy."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i):  # type: ignore[override]
        return self.column[i].as_py()


def _key_range(table: pa.Table, column: str, values: pa.ChunkedArray) -> pa.Table:
    """The rows of `table` (sorted by `column`) whose `column` lies between the first and last of `values`
    (sorted): found by bisection, a slice, no copy."""
    if not table.num_rows or not len(values):
        return table.slice(0, 0)
    keys = _SortedColumn(table.column(column))
    lo = bisect.bisect_left(keys, values[0].as_py())
    hi = bisect.bisect_right(keys, values[-1].as_py())
    return table.slice(lo, hi - lo)


def _ids(table: pa.Table, *, by_sha: bool) -> pa.ChunkedArray:
    """failure_id per row (feature_store.records.failure_id), by content hash or by source."""
    if by_sha:
        return pc.binary_join_element_wise("sha:", table.column("sha256"), "")
    names = [decode_name(s, r) for s, r in zip(table.column("source").to_pylist(),
                                                  table.column("source_raw").to_pylist())] \
        if pc.any(pc.is_valid(table.column("source_raw"))).as_py() else None
    if names is not None:  # rare: names that are not UTF-8 take failure_id's own path
        return pa.chunked_array([pa.array([failure_id("", n) for n in names], pa.string())])
    return pc.binary_join_element_wise("src:", table.column("source"), "")


def _plan_unreadable(plan: Plan, rows: pa.Table, ledger: _Ledger) -> None:
    for fid, r in zip(_ids(rows, by_sha=False).to_pylist(), rows.select(["source", "error"]).to_pylist()):
        found = ledger.verdict(fid)
        if found is not None and not found[1].retry:
            plan.quarantined.append((r["source"], found[1].why))
        else:
            plan.unreadable.append((r["source"], r["error"]))


def _with_segments(known: pa.Table, index: pa.Table) -> pa.Table:
    """`known` with n_have (segments stored), total (segments_total) and have_segments per content."""
    rows = index.filter(pc.is_in(index.column("video_sha256"), value_set=known.column("sha256"))) \
        if index.num_rows and known.num_rows else index.slice(0, 0)
    per = rows.group_by("video_sha256").aggregate([("segment", "count_distinct"), ("segments_total", "max"),
                                                   ("segment", "distinct")])
    at = _lookup(known, per, ["sha256"], ["video_sha256"]) if per.num_rows else np.full(known.num_rows, -1)
    return (known.append_column("n_have", _take(per, at, "segment_count_distinct", 0, pa.int64()))
            .append_column("total", _take(per, at, "segments_total_max", 0, pa.int64()))
            .append_column("have_segments", _take(per, at, "segment_distinct", [], pa.list_(pa.int32()))))


def _metadata_updates(plan: Plan, reused: pa.Table, index: pa.Table) -> None:
    """A reused video whose name, id, labels, size or mtime changed gets its index rows updated (compared one
    bounded batch at a time; only the changed ones stay as Python objects)."""
    if not reused.num_rows:
        return
    rows = index.filter(pc.is_in(index.column("video_sha256"), value_set=reused.column("sha256")))
    firsts = first_per_key(rows.select(["video_sha256", "source", "source_raw", "video_id", "labels", "video_size",
                                        "video_mtime"]), "video_sha256", "source")[0]
    at = _lookup(reused, firsts, ["sha256"], ["video_sha256"])
    joined = reused.select(["sha256", "source", "source_raw", "video_id", "labels", "size", "mtime"])
    for c in firsts.column_names[1:]:
        joined = joined.append_column(f"old_{c}", firsts.column(c).combine_chunks().take(pa.array(at)))
    changed = pc.or_(pc.or_(pc.not_equal(joined.column("source"), joined.column("old_source")),
                            pc.not_equal(joined.column("video_id"), joined.column("old_video_id"))),
                     pc.or_(pc.not_equal(joined.column("size"), joined.column("old_video_size")),
                            pc.not_equal(joined.column("mtime"), joined.column("old_video_mtime"))))
    labelled = pc.or_(_has_entries(joined.column("labels")), _has_entries(joined.column("old_labels")))
    maybe = pc.or_(pc.or_(pc.fill_null(changed, True), labelled),
                   pc.or_(pc.is_valid(joined.column("source_raw")), pc.is_valid(joined.column("old_source_raw"))))
    for batch in joined.filter(maybe).to_batches(BATCH):  # Python objects only where something may differ
        for r in batch.to_pylist():
            new = (decode_name(r["source"], r["source_raw"]), r["video_id"], dict(r["labels"]), r["size"], r["mtime"])
            old = (decode_name(r["old_source"], r["old_source_raw"]), r["old_video_id"], dict(r["old_labels"] or []),
                   r["old_video_size"], r["old_video_mtime"])
            if new != old:
                plan.metadata_updates.append({"video_sha256": r["sha256"], "source": new[0], "video_id": new[1],
                                              "labels": new[2], "video_size": new[3], "video_mtime": new[4]})


def _has_entries(maps: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a map<string, string> value has at least one entry."""
    as_lists = maps.cast(pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())])))
    return pc.greater(pc.fill_null(pc.list_value_length(as_lists), 0), 0)


def _work(rows: pa.Table, plan: Plan, ledger: _Ledger, *, by_sha: bool) -> pa.Table:
    """Work rows (WORK_SCHEMA + `_i`) for these videos, less the ones the ledger quarantines."""
    n = rows.num_rows
    attempts = np.zeros(n, np.int32)
    keep = np.ones(n, bool)
    fids = _ids(rows, by_sha=by_sha)
    hit = pc.is_in(fids, value_set=pa.array(list(ledger.rows), pa.string())).to_numpy(zero_copy_only=False) \
        if ledger.rows and n else np.zeros(n, bool)
    for i in np.flatnonzero(hit):  # the few videos with a failure on record
        f, verdict = ledger.verdict(fids[int(i)].as_py())
        if verdict.retry:
            attempts[i] = f["attempts"]
            if by_sha:
                plan.retrying.add(rows.column("sha256")[int(i)].as_py())
        else:
            keep[i] = False
            plan.quarantined.append((rows.column("source")[int(i)].as_py(), verdict.why))
    have = rows.column("have_segments") if "have_segments" in rows.column_names else pa.nulls(n, pa.list_(pa.int32()))
    have = pc.fill_null(have.cast(pa.list_(pa.int32())), pa.scalar([], pa.list_(pa.int32())))
    if by_sha:  # the videos being completed: few (a killed run leaves its videos in flight partial)
        part = rows.filter(pc.greater(rows.column("n_have"), 0))
        plan.partial.update(zip(part.column("sha256").to_pylist(), part.column("n_have").to_pylist()))
    cols = {c: rows.column(c) for c in ("source", "source_raw", "video_id", "labels", "size", "mtime", "sha256")}
    out = pa.table({**cols, "have_segments": have, "attempts": pa.array(attempts, pa.int32()),
                    "_i": rows.column("_i")})
    return out.filter(pa.array(keep)).cast(WORK_SCHEMA.append(pa.field("_i", pa.int64())))
