"""The driver's bookkeeping while results stream in: what finished, what failed, when to commit.

`Tally` counts per run (one failure per failure_id, a video done once all its segments are stored) and
`CommitCadence` holds the batch not yet committed and commits it every few shards or seconds.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Callable

from feature_store.ledger import cause_of
from feature_store.records import CommitBatch
from pipeline.plan import WorkItem
from pipeline.records import Failure
from pipeline.results import WriterResult


class Tally:
    """Counts of one run. Bounded by the work list (per video: segments seen), never by the KEY."""

    def __init__(self, compute: list[WorkItem], segment_frames: int):
        self.segment_frames = segment_frames
        self.counters: Counter = Counter()
        self.failures_by_reason: Counter = Counter()
        self.timing: Counter = Counter()
        self.teacher_windows: list[tuple[float, float]] = []
        self.pending = {w.sha256 for w in compute}  # videos not yet complete nor failed
        self.have = {w.sha256: len(w.have_segments) for w in compute}
        self.got: dict[str, int] = defaultdict(int)
        self.failed_before = {w.sha256 for w in compute if w.attempts}  # their ledger entries clear on success
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
        if f.video_sha256 in self.pending:
            self.pending.discard(f.video_sha256)
            self.counters["videos_failed"] += 1
        return True

    def shard(self, r: WriterResult, batch: CommitBatch) -> int:
        """Book one published shard into the batch; returns how many videos it completed."""
        assert r.shard is not None
        batch.shards.append(r.shard)
        batch.rows.extend(r.store_rows())
        batch.shard_stats[r.shard.name], batch.shard_fidelity[r.shard.name] = r.stats, r.fidelity
        batch.stats, batch.fidelity = batch.stats.merge(r.stats), batch.fidelity.merge(r.fidelity)
        self.timing.update(r.timing)
        for stage, nodes in r.nodes.items():
            self.stage_nodes[stage].update(nodes)
        if r.teacher_window:
            self.teacher_windows.append(r.teacher_window)
        self.counters.update(samples_written=r.shard.count, bytes_written=r.shard.bytes, shards_written=1,
                             frames_computed=r.shard.count * self.segment_frames)
        return self._complete(r, batch)

    def _complete(self, r: WriterResult, batch: CommitBatch) -> int:
        finished = 0
        for row in r.index_rows:
            sha = row["video_sha256"]
            self.got[sha] += 1
            if sha in self.pending and self.got[sha] + self.have[sha] >= row["segments_total"]:
                self.pending.discard(sha)  # a video clears its failure only once complete
                if sha in self.failed_before:
                    batch.succeeded.append(f"sha:{sha}")
                finished += 1
        self.counters["videos_new_ok"] += finished
        return finished


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
