"""The driver's bookkeeping while results stream in: what finished, what failed, what was a duplicate, when
to commit.

`Tally` counts per run (one failure per failure_id, a video done once all its segments are stored) and keeps
per-video state for videos in flight only; `Claims` decides, at commit, which source's copy of a content
the index keeps (the first to arrive; a copy already in the index under another name wins over both), so
two files with the same bytes end as one video's rows and the other is counted as a duplicate.
`CommitCadence` holds the batch not yet committed and commits it every few shards or seconds.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Callable

import numpy as np
import pyarrow as pa

from feature_store.ledger import cause_of
from feature_store.records import CommitBatch
from pipeline.records import Failure
from pipeline.results import WriterResult

_HEX = np.full(256, 0, np.uint64)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def sha_prefixes(shas: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The first 64 bits of each 64-hex-digit sha256 as uint64, vectorised (no Python object per value)."""
    import pyarrow.compute as pc

    arr = shas.combine_chunks() if isinstance(shas, pa.ChunkedArray) else shas
    arr = arr.filter(pc.equal(pc.utf8_length(arr), 64)).cast(pa.string())
    if not len(arr):
        return np.zeros(0, np.uint64)
    arr = pa.concat_arrays([arr])  # offset 0
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[:len(arr)]
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    digits = _HEX[data[offsets[:, None] + np.arange(16)]]
    out = np.zeros(len(arr), np.uint64)
    for j in range(16):
        out = (out << np.uint64(4)) | digits[:, j]
    return out


def _prefix(sha: str) -> int:
    return int(sha[:16], 16)


class Claims:
    """Which source's copy of each content this run indexes. Videos in flight: a dict; finished ones: sorted
    uint64 arrays (sha256 prefix, source hash), 16 bytes a video; the KEY's contents at planning: sorted sha256
    prefixes, 8 bytes a video, with `lookup(shas)` (index rows: video_sha256, source) asked only on a hit."""

    def __init__(self, index_prefixes: np.ndarray | None = None,
                 lookup: Callable[[list[str]], pa.Table] | None = None):
        self.index_prefixes = np.sort(index_prefixes) if index_prefixes is not None else np.zeros(0, np.uint64)
        self.lookup = lookup
        self.done_sha, self.done_src = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        self._new: list[tuple[int, int]] = []

    def finish(self, sha: str, source: str) -> None:
        self._new.append((_prefix(sha), _src_hash(source)))
        if len(self._new) >= 4096:
            self._merge()

    def _merge(self) -> None:
        if self._new:
            new = np.array(self._new, np.uint64).reshape(-1, 2)
            sha, src = np.concatenate([self.done_sha, new[:, 0]]), np.concatenate([self.done_src, new[:, 1]])
            order = np.argsort(sha, kind="stable")
            self.done_sha, self.done_src, self._new = sha[order], src[order], []

    def finished_by(self, sha: str) -> set[int]:
        """Source hashes that finished this content in this run (empty: none)."""
        self._merge()
        p = np.uint64(_prefix(sha))
        lo, hi = np.searchsorted(self.done_sha, p, "left"), np.searchsorted(self.done_sha, p, "right")
        return set(self.done_src[lo:hi].tolist())

    def indexed_under(self, shas: list[str]) -> dict[str, set[str]]:
        """For contents the KEY held at planning, the sources it held them under (one lookup for the hits)."""
        if not shas or not len(self.index_prefixes) or self.lookup is None:
            return {}
        p = np.array([_prefix(s) for s in shas], np.uint64)
        pos = np.minimum(np.searchsorted(self.index_prefixes, p), len(self.index_prefixes) - 1)
        hits = [s for s, hit in zip(shas, self.index_prefixes[pos] == p) if hit]
        out: dict[str, set[str]] = defaultdict(set)
        if hits:
            rows = self.lookup(hits)
            for sha, src in zip(rows.column("video_sha256").to_pylist(), rows.column("source").to_pylist()):
                out[sha].add(src)
        return out


def _src_hash(source: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(source.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


class Tally:
    """Counts of one run. Per-video state only for videos in flight (seen, not complete nor failed), for
    the few being completed (`partial`: segments already stored) and the few retried after a failure."""

    def __init__(self, segment_frames: int, *, partial: dict[str, int] | None = None,
                 retrying: set[str] | None = None, claims: Claims | None = None):
        self.segment_frames = segment_frames
        self.counters: Counter = Counter()
        self.failures_by_reason: Counter = Counter()
        self.timing: Counter = Counter()
        self.teacher_windows: list[tuple[float, float]] = []  # one span: the first start, the last end
        self.inflight: dict[str, list] = {}  # sha -> [source, segments received]
        self.have = dict(partial or {})
        self.failed_before = set(retrying or ())  # their ledger entries clear on success
        self.claims = claims or Claims()
        self.failed_ids: set[str] = set()
        self.stage_nodes: dict[str, set[str]] = defaultdict(set)  # where each stage ran

    def failure(self, f: Failure, batch: CommitBatch) -> bool:
        """Book one failed video (once per failure_id and run); False when it was already booked."""
        rec = f.to_record()
        if rec["failure_id"] in self.failed_ids:
            return False
        self.failed_ids.add(rec["failure_id"])
        batch.failures.append({**rec, "cause": cause_of(f.error, f.retryable)})
        self.failures_by_reason[f.error] += 1
        self.inflight.pop(f.video_sha256, None)
        if f.stage != "read":  # unreadable at listing: counted by the plan
            self.counters["videos_failed"] += 1
        return True

    def shard(self, r: WriterResult, batch: CommitBatch) -> int:
        """Book one published shard into the batch (less duplicate copies); returns how many videos it
        completed."""
        assert r.shard is not None
        batch.shards.append(r.shard)
        batch.shard_stats[r.shard.name], batch.shard_fidelity[r.shard.name] = r.stats, r.fidelity
        batch.stats, batch.fidelity = batch.stats.merge(r.stats), batch.fidelity.merge(r.fidelity)
        self.timing.update(r.timing)
        for stage, nodes in r.nodes.items():
            self.stage_nodes[stage].update(nodes)
        if r.teacher_window:
            spans = self.teacher_windows + [r.teacher_window]  # merged, so it stays one entry
            self.teacher_windows = [(min(a for a, _ in spans), max(b for _, b in spans))]
        self.counters.update(samples_written=r.shard.count, bytes_written=r.shard.bytes, shards_written=1,
                             frames_computed=r.shard.count * self.segment_frames)
        return self._complete(r.store_rows(), batch)

    def _complete(self, rows: list[dict], batch: CommitBatch) -> int:
        finished = 0
        indexed = self.claims.indexed_under(sorted({r["video_sha256"] for r in rows} - set(self.inflight)))
        for row in rows:
            sha, src = row["video_sha256"], row["source"]
            verdict = self._claim(sha, src, indexed.get(sha))
            if verdict != "keep":
                self.counters["duplicate_rows"] += 1
                if verdict == "copy" and row["segment"] == 0:  # once per duplicate file
                    self.counters["videos_duplicate"] += 1
                    batch.copies.append(_copy_row(row))
                continue
            batch.rows.append(row)
            entry = self.inflight[sha]
            entry[1] += 1
            if entry[1] + self.have.get(sha, 0) >= row["segments_total"]:
                del self.inflight[sha]
                self.claims.finish(sha, src)
                if sha in self.failed_before:  # a video clears its failure only once complete
                    batch.succeeded.append(f"sha:{sha}")
                finished += 1
        self.counters["videos_new_ok"] += finished
        return finished

    def _claim(self, sha: str, src: str, indexed: set[str] | None) -> str:
        """"keep": this source's copy of `sha` is the one indexed (its row is booked); "copy": another file's
        bytes are indexed; "again": a row of a video this run already finished (a retried block's output)."""
        if sha in self.inflight:
            return "keep" if self.inflight[sha][0] == src else "copy"
        finished = self.claims.finished_by(sha)
        if finished:
            return "again" if _src_hash(src) in finished else "copy"
        if indexed and src not in indexed:  # the KEY held this content under another name at planning
            return "copy"
        self.inflight[sha] = [src, 0]
        return "keep"


def _copy_row(row: dict) -> dict:
    """A duplicate file as the KEY records it (feature_store.records.COPIES_SCHEMA, less the run id)."""
    from feature_store.names import encode_name

    shown, raw = encode_name(row["source"])
    return {"source": shown, "source_raw": raw, "video_size": row["video_size"], "video_mtime": row["video_mtime"],
            "video_sha256": row["video_sha256"]}


class CommitCadence:
    """The batch not yet committed; committed every `every_shards` shards or `every_s` seconds."""

    def __init__(self, commit: Callable[[CommitBatch], None], new_batch: Callable[[], CommitBatch],
                 every_shards: int, every_s: float):
        self._commit, self._new = commit, new_batch
        self.every_shards, self.every_s = every_shards, every_s
        self.batch = new_batch()
        self.last = time.perf_counter()
        self.versions = 0

    def maybe(self) -> None:
        if len(self.batch.shards) >= self.every_shards or time.perf_counter() - self.last > self.every_s:
            self.flush()

    def flush(self) -> None:
        if not self.batch.empty():
            self._commit(self.batch)
            self.versions += 1
        self.batch = self._new()
        self.last = time.perf_counter()
