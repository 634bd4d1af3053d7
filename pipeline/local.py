"""The extraction stages in this process, for work lists too small to pay for starting a Ray cluster.

The same three stages as the Ray Data pipeline (pipeline.stages), driven by threads: a decode thread feeds
segments (decoded in the stage's killable child process) through a bounded queue, the teacher embeds them
on the calling thread, and a writer thread publishes shards, so decoding and writing overlap the teacher.
Results come back as the same typed `WriterResult`s, and the driver commits them as it does Ray's.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.records import SegmentRow, WorkRow
from pipeline.results import WriterResult
from pipeline.stages import DecodeStage, TeacherStage, write_shard_rows

_END = object()  # the decode thread's last item


@dataclass(frozen=True)
class LocalStages:
    """The stages' settings: constructor arguments of DecodeStage and TeacherStage, `write_shard_rows`'s
    keyword arguments, and the batch sizes the Ray pipeline uses (segments per teacher call, per shard)."""

    decode: dict[str, Any]
    teacher: dict[str, Any]
    write: dict[str, Any]
    teacher_batch: int
    shard_size: int
    queued: int = 64  # decoded segments waiting for the teacher at most (bounded memory)
    decoder: Any = None  # a DecoderProcess started before planning (pipeline.stages.decoder_process), or None


class _DecodeThread:
    """Decodes the work list's videos one after another into a bounded queue; an error ends the queue too."""

    def __init__(self, work: pa.Table, stage: DecodeStage, size: int):
        self.stage = stage
        self.q: queue.Queue = queue.Queue(maxsize=size)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work, stage), name="subsume-decode", daemon=True)
        self.thread.start()

    def _run(self, work: pa.Table, stage: DecodeStage) -> None:
        try:
            for batch in work.to_batches(max_chunksize=64):  # a few rows as Python objects at a time
                for row in batch.to_pylist():
                    for rows in stage.video_rows(WorkRow.from_row(row)):
                        for r in rows:
                            if not self._put(r):
                                return
        except BaseException as e:  # the driver re-raises it: a bug here must not look like a short run
            self.error = e
        finally:
            self._put(_END)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def batches(self, n: int) -> Iterator[list[SegmentRow]]:
        """Lists of at most `n` segments, as the teacher takes them."""
        batch: list[SegmentRow] = []
        while (item := self.q.get()) is not _END:
            batch.append(item)
            if len(batch) >= n:
                yield batch
                batch = []
        if self.error is not None:
            raise self.error
        if batch:
            yield batch

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.stage.proc.close()  # the decoder's child process ends with the run, not at garbage collection


# Teacher calls at once: while one thread is in Python between torch ops, the other keeps the cores busy
# (measured on 2 cores: 1.2x the frames/s of one thread with the same torch threads; docs/benchmarks.md).
TEACHER_THREADS = 2


def teacher_cpu_threads(device: str) -> int:
    """torch threads for a CPU teacher here: the process's cores shared among the concurrent teacher calls.
    More would oversubscribe the cores (each call's OpenMP team spins while the other's works, and the
    decoder child waits): on 2 cores, over the extraction benchmark's 96 videos in interleaved warm runs (a
    throwaway script), 1 thread each gave 194-203 frames/s, torch's default (2 each) 152-198. 0 on a GPU."""
    if device != "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // TEACHER_THREADS)


def run_local(work: pa.Table, stages: LocalStages) -> Iterator[WriterResult]:
    """Decode -> teacher -> write over `work` (pipeline.plan.WORK_SCHEMA rows) in this process; yields each
    published shard and each failed video as the writer returns them."""
    with _torch_threads_restored():  # the teacher sets its own (teacher_cpu_threads) for the run
        decoder = DecodeStage(**stages.decode, proc=stages.decoder)  # its child imports while the teacher loads
        try:
            teacher = TeacherStage(**stages.teacher)  # loaded (and checked against the KEY) before any decoding
        except BaseException:
            decoder.proc.close()
            raise
        yield from _run(_DecodeThread(work, decoder, stages.queued), teacher, stages)


def _run(decode: _DecodeThread, teacher: TeacherStage, stages: LocalStages) -> Iterator[WriterResult]:
    embedding = ThreadPoolExecutor(max_workers=TEACHER_THREADS, thread_name_prefix="subsume-teacher")
    shards = _Shards(stages)
    in_flight: deque[Future] = deque()
    try:
        for batch in decode.batches(stages.teacher_batch):
            in_flight.append(embedding.submit(teacher.embed_rows, batch))
            if len(in_flight) >= TEACHER_THREADS:  # the oldest call done before the next is queued: bounded
                yield from shards.add(in_flight.popleft().result())
        while in_flight:
            yield from shards.add(in_flight.popleft().result())
        yield from shards.finish()
    finally:
        decode.close()
        embedding.shutdown(wait=True, cancel_futures=True)
        shards.close()


@contextmanager
def _torch_threads_restored() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Shards:
    """Cuts the teacher's rows into shards of `shard_size` rows, written one at a time by a writer thread."""

    def __init__(self, stages: LocalStages):
        self.size, self.args = stages.shard_size, stages.write
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="subsume-write")
        self.pending: deque[Future] = deque()
        self.rows: list[SegmentRow] = []

    def add(self, rows: list[SegmentRow]) -> Iterator[WriterResult]:
        """Take rows; yield the results of the writes finished so far, in order."""
        self.rows += rows
        while len(self.rows) >= self.size:
            self.pending.append(self.writer.submit(write_shard_rows, self.rows[:self.size], **self.args))
            self.rows = self.rows[self.size:]
        while self.pending and self.pending[0].done():
            yield from self.pending.popleft().result()

    def finish(self) -> Iterator[WriterResult]:
        """The last, smaller shard; then every result still to come."""
        if self.rows:
            self.pending.append(self.writer.submit(write_shard_rows, self.rows, **self.args))
            self.rows = []
        while self.pending:
            yield from self.pending.popleft().result()

    def close(self) -> None:
        self.writer.shutdown(wait=True, cancel_futures=True)
