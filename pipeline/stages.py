"""The three Ray Data stages of extraction, as plain callables (no Ray import): decode, teacher, write.

Rows between stages are typed columns (`pipeline.records.SegmentRow`); a failure travels as a row of
the same schema whose `error` names its class.
- decode (actor pool, CPU): reads a work-list row (`WorkRow`, Arrow batches), hashes the bytes it hands the
  decoder (pipeline.fetch: one read per video), streams the frames out of a killable child process, cuts segments as
  they fill, encodes each as stored (JPEG...) and decodes it back, so the teacher gets ready uint8 frames,
  exactly the stored ones. A segment leaves as soon as its video's segment count is known (decord knows
  it before decoding; PyAV's segments wait for the end of their video, as encoded bytes).
- teacher (actor pool, GPU if any): checks at start that its weights are the KEY's; embeds the frames of
  all the segments of a batch (across videos) together; an out-of-memory batch is retried once at half
  size; a teacher error fails the batch's videos (one failure row per video), never the dataset.
- write (actor pool): a batch of samples -> one shard, published atomically, with retries and backoff on
  storage errors; returns the shard's record, or one failure per video when the storage stays down.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from feature_store.shards import build_sample, decode_frames, encode_frames, sample_key
from feature_store.spec import PreprocessSpec, SamplingSpec, StorageSpec, TeacherSpec
from feature_store.store import FeatureStore, Fidelity, TargetStats
from pipeline.records import Failure, SegmentRow, WorkRow, failure_rows, from_batch, to_batch
from pipeline.results import WriterResult, results_table

log = logging.getLogger(__name__)


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): the run summary says where each stage ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _preprocess(d: dict) -> PreprocessSpec:
    return PreprocessSpec(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class DecodeStage:
    """Decode one video per input row in a killable child process; yield its new segments as they fill."""

    def __init__(self, sampling: dict, preprocess: dict, storage: dict, *, timeout_s: float,
                 storage_options: dict | None = None, decoder: str = "auto", limits: dict | None = None,
                 decode_fn: Any = None, proc: Any = None):
        """`proc`: a DecoderProcess made by `decoder_process` with the same settings and started earlier
        (the in-process executor starts one before planning); by default the stage starts its own."""
        self.sampling = SamplingSpec(**sampling)
        self.preprocess = _preprocess(preprocess)
        self.storage = StorageSpec(**storage)
        self.storage_options = storage_options
        self.node = node_id()
        self.proc = proc or decoder_process(timeout_s=timeout_s, decoder=decoder, limits=limits, decode_fn=decode_fn)
        self.limits = self.proc.limits
        t, s = self.sampling.segment_frames, self.preprocess.crop
        self.shapes = {"frame_indices": ((t,), np.int64), "timestamps": ((t,), np.float64),
                       "frames": ((t, s, s, 3), np.uint8)}

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        for row in batch.to_pylist():  # a batch is one video (batch_size=1)
            for rows in self.video_rows(WorkRow.from_row(row)):
                yield to_batch(rows, self.shapes)

    def video_rows(self, work: WorkRow) -> Iterator[list[SegmentRow]]:
        """Lists of rows for one video: its segments as they become complete, and at most one failure. The
        bytes are hashed as they are read for the decoder (a new file's content hash is known only now)."""
        from pipeline.decode import DecodeError
        from pipeline.fetch import hashed_local

        try:
            with hashed_local(work.path, self.storage_options, self.limits) as (path, sha):
                work.identify(sha)
                yield from _VideoSegments(self, work).run(path)
        except DecodeError as e:
            yield [SegmentRow.failure(Failure(work.sha256, work.source, "decode", e.reason, e.message))]
        except Exception as e:  # a decoder bug must cost one video, not the job
            log.exception("decode stage failed on %s", work.source)
            yield [SegmentRow.failure(Failure(work.sha256, work.source, "decode", "decoder_error",
                                              f"{type(e).__name__}: {e}"))]

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.close()


def decoder_process(*, timeout_s: float, decoder: str = "auto", limits: dict | None = None,
                    decode_fn: Any = None) -> Any:
    """The killable child process a DecodeStage decodes in, launched now: its imports (torch: seconds)
    overlap whatever the caller does next (a teacher's load, planning) instead of delaying the first video."""
    from pipeline.decode import DecodeLimits
    from pipeline.decoder_process import DecoderProcess

    extra = {"decode_fn": decode_fn} if decode_fn is not None else {}
    proc = DecoderProcess(timeout_s=timeout_s, decoder=decoder, limits=DecodeLimits(**(limits or {})), **extra)
    proc.start()
    return proc


def _WorkRow(batch: pa.Table | dict[str, np.ndarray], i: int) -> WorkRow:  # noqa: N802
    """Row `i` of a work-list batch (an Arrow table, or Ray's dict of numpy columns)."""
    if isinstance(batch, pa.Table):
        return WorkRow.from_row(batch.slice(i, 1).to_pylist()[0])
    row = {k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}
    for k in ("labels", "have_segments"):  # older callers pass these as JSON text
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return WorkRow.from_row(row)


class _VideoSegments:
    """Turns one video's decode stream into SegmentRows, as soon as each one is complete."""

    def __init__(self, stage: DecodeStage, work: WorkRow):
        from pipeline.sampling import SegmentCutter

        self.stage, self.work = stage, work
        self.cutter = SegmentCutter(stage.sampling)
        self.plan: Any = None  # StreamPlan: segments leave at once; None: they wait for StreamEnd
        self.held: list[SegmentRow] = []
        self.labels_json = json.dumps(work.labels)  # the user's labels, read once more by the writer
        self.busy_s = 0.0

    def run(self, path: str) -> Iterator[list[SegmentRow]]:
        from pipeline.decode import DecodeError, FrameChunk, StreamEnd, StreamPlan
        from pipeline.sampling import count_segments

        events = self.stage.proc.stream(path, self.stage.sampling, resize_crop=self.stage.preprocess,
                                        storage_options=self.stage.storage_options)
        t0 = time.perf_counter()
        for ev in events:
            if isinstance(ev, StreamPlan):
                self.plan = ev
            elif isinstance(ev, FrameChunk):
                rows = self._rows(self.cutter.push(ev.frames, ev.indices, ev.timestamps))
                if rows:
                    yield self._timed(rows, t0)
                    t0 = time.perf_counter()
            elif isinstance(ev, StreamEnd):
                if self.plan is not None and count_segments(ev.sampled, self.stage.sampling) != self._planned():
                    raise DecodeError("decoder_error", f"{self.work.source}: {ev.sampled} frames decoded, "
                                                       f"{self.plan.sampled_total} announced")
                yield from self._finish(ev, t0)

    def _planned(self) -> int:
        from pipeline.sampling import count_segments

        return count_segments(self.plan.sampled_total, self.stage.sampling)

    def _finish(self, end: Any, t0: float) -> Iterator[list[SegmentRow]]:
        from pipeline.sampling import count_segments

        total = count_segments(end.sampled, self.stage.sampling)
        rows = self._rows(self.cutter.finish(), facts=end, total=total)
        for r in self.held:  # PyAV: the count and the stream's facts are known only now
            r.segments_total, r.decoder, r.fps, r.num_frames, r.rotation = (
                total, end.decoder, float(end.fps), int(end.num_frames), int(end.rotation or 0))
        rows = [r for r in self.held + rows if r.segment not in self.work.have_segments]
        if total == 0:
            seg = self.stage.sampling.segment_frames
            yield [SegmentRow.failure(Failure(self.work.sha256, self.work.source, "sampling", "too_short",
                                              f"{end.sampled} sampled frames < one segment of {seg}, "
                                              f"and short videos are dropped", retryable=False))]
        elif rows:
            for r in rows:
                if r.frames is None:
                    r.frames = self._stored(r.frames_blob)
            yield self._timed(rows, t0)

    def _rows(self, segments: list, facts: Any = None, total: int = 0) -> list[SegmentRow]:
        """New segments as rows: sent on now when the count is known, else held as encoded bytes."""
        facts = facts or self.plan
        out = []
        for seg_no, pos, (frames, indices, times) in segments:
            if seg_no in self.work.have_segments:
                continue
            blob = encode_frames(np.ascontiguousarray(frames), self.stage.storage.frame_encoding,
                                 self.stage.storage.jpeg_quality)
            row = self._row(seg_no, pos, indices, times, blob, facts)
            if facts is None:
                self.held.append(row)
                continue
            row.segments_total = total or self._planned()
            row.frames = self._stored(blob)
            out.append(row)
        return out

    def _row(self, seg_no: int, pos: np.ndarray, indices: np.ndarray, times: np.ndarray, blob: bytes,
             facts: Any) -> SegmentRow:
        w = self.work
        return SegmentRow(
            video_sha256=w.sha256, source=w.source, source_raw=w.source_raw, sample_key=sample_key(w.sha256, seg_no),
            video_id=w.video_id, labels_json=self.labels_json, segment=seg_no, padded=bool(len(set(pos.tolist())) < len(pos)),
            decoder=facts.decoder if facts else "", fps=float(facts.fps) if facts else 0.0,
            num_frames=int(facts.num_frames) if facts else 0, rotation=int(facts.rotation or 0) if facts else 0,
            video_size=w.size, video_mtime=w.mtime, decode_node=self.stage.node, frames_blob=blob,
            frame_indices=np.asarray(indices, np.int64),
            timestamps=np.asarray(times, np.float64))

    def _stored(self, blob: bytes) -> np.ndarray:
        """The frames as stored: what a reader of the shard gets back, and so what the teacher must see."""
        return decode_frames(blob, self.stage.storage.frame_encoding, self.stage.sampling.segment_frames)

    @staticmethod
    def _timed(rows: list[SegmentRow], t0: float) -> list[SegmentRow]:
        share = (time.perf_counter() - t0) / len(rows)
        for r in rows:
            r.decode_s = share
        return rows


class TeacherMismatch(RuntimeError):
    """The weights an actor loaded are not the ones the KEY was defined with."""


class TeacherStage:
    """Embed the stored frames of a batch of segments (from any videos). The model loads once per actor."""

    def __init__(self, teacher: dict, *, size: int | None, device: str, precision: str, batch_size: int,
                 storage: dict, segment_frames: int, cpu_threads: int = 0, expect: dict | None = None):
        import torch

        from feature_store.teacher import load_teacher

        if cpu_threads > 0:  # a CPU teacher: Ray pins actors to one thread unless told otherwise
            torch.set_num_threads(cpu_threads)
        self.teacher = load_teacher(TeacherSpec(**teacher), size=size, device=device, precision=precision)
        check_teacher(self.teacher, expect or {})
        self.batch_size = batch_size
        self.storage = StorageSpec(**storage)
        self.t = segment_frames
        self.node = node_id()
        self.failed: set[str] = set()  # videos this actor already reported as failed (one row per video)
        dtype = np.dtype(self.storage.target_dtype)
        self.shapes: dict[str, tuple[tuple[int, ...], Any]] = {
            "frame_indices": ((self.t,), np.int64), "timestamps": ((self.t,), np.float64),
            "targets": ((self.t, self.teacher.embed_dim), dtype)}
        g = self.teacher.spec.patch_grid
        if g > 0:
            self.shapes["patches"] = ((self.t, g, g, self.teacher.patch_dim), dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_batch(self.embed_rows(from_batch(batch)), self.shapes)

    def embed_rows(self, rows: list[SegmentRow]) -> list[SegmentRow]:
        """Targets for the batch's samples; its failures (and a failed batch's videos) as one row per video."""
        ok = [r for r in rows if not r.failed]
        if ok:
            try:
                self._embed(ok)
            except Exception as e:  # a teacher failure fails the batch's videos, recorded, not the job
                log.warning("teacher failed on a batch of %d segments: %s", len(ok), e)
                for r in ok:
                    r.error, r.stage, r.message = _teacher_error(e), "teacher", f"{type(e).__name__}: {e}"
                rows = [r for r in rows if not (r.failed and r.stage == "teacher" and r.video_sha256 in self.failed)]
                self.failed.update(r.video_sha256 for r in ok)
        for r in rows:
            r.frames = None  # the writer stores the encoded frames; the pixels stop here
        return one_failure_per_video(rows)

    def _embed(self, rows: list[SegmentRow]) -> None:
        t0, wall0 = time.perf_counter(), time.time()
        frames = np.concatenate([r.frames for r in rows])
        embeds, grid = self._embed_frames(frames)
        stored = embeds.astype(self.storage.target_dtype)
        mean = embeds.mean(0, keepdims=True)
        cos = _cos(stored.astype(np.float32) - mean, embeds - mean)
        share, wall1 = (time.perf_counter() - t0) / len(rows), time.time()
        for j, r in enumerate(rows):
            sl = slice(j * self.t, (j + 1) * self.t)
            r.targets = stored[sl]
            r.patches = grid[sl].astype(self.storage.target_dtype) if grid is not None else None
            r.teacher_s, r.teacher_t0, r.teacher_t1, r.teacher_node = share, wall0, wall1, self.node
            r.fid_n, r.fid_sum, r.fid_min = self.t, float(cos[sl].sum()), float(cos[sl].min())

    def _embed_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 embeddings (and patch grid) of all frames; an out-of-memory batch is retried at half size."""
        import torch

        try:
            out = self.teacher.embed_batched(frames, self.batch_size)
        except torch.OutOfMemoryError:
            if self.teacher.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("teacher out of memory at batch %d; retrying at %d", self.batch_size, self.batch_size // 2)
            out = self.teacher.embed_batched(frames, max(1, self.batch_size // 2))
        grid = out.patch_grid.numpy() if out.patch_grid is not None else None
        return out.embeds.numpy().astype(np.float32), grid


def check_teacher(teacher: Any, expect: dict) -> None:
    """Refuse weights, embedding size or output other than the KEY's (keys: fingerprint, embed_dim,
    output_used; a key left out is not checked)."""
    found = {"fingerprint": teacher.fingerprint, "embed_dim": teacher.embed_dim, "output_used": teacher.output_used}
    wrong = {k: (v, found[k]) for k, v in expect.items() if v is not None and found[k] != v}
    if wrong:
        detail = "; ".join(f"{k}: the KEY has {want!r}, this actor loaded {got!r}" for k, (want, got) in wrong.items())
        raise TeacherMismatch(f"teacher {teacher.spec.model} is not the KEY's teacher ({detail})")


def _teacher_error(e: Exception) -> str:
    import torch

    return "oom" if isinstance(e, torch.OutOfMemoryError) else "teacher_error"


def one_failure_per_video(rows: list[SegmentRow]) -> list[SegmentRow]:
    """The batch's rows with the failed ones of a video folded into one row, and its other segments dropped
    (they would be stored for a video recorded as failed)."""
    failed = {f.video_sha256 or f.source: f for f in failure_rows(rows)}
    out = [r for r in rows if not r.failed and (r.video_sha256 or r.source) not in failed]
    return out + [SegmentRow.failure(f) for f in failed.values()]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)


# The index row fields a sample's metadata gives (pipeline.results.INDEX_ROW adds shard, labels_json, source_raw).
INDEX_FIELDS = ("sample_key", "video_sha256", "video_id", "source", "segment", "segments_total", "frame_indices",
                "timestamps", "num_frames", "decoder", "video_size", "video_mtime")
WRITE_RETRIES = 4  # attempts of one shard write
WRITE_BACKOFF_S = 0.5  # first wait; doubles after each failed attempt


def write_shard_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> pa.Table:
    """Write the samples of a batch as one shard; return one typed result row (pipeline.results) for the shard
    and one per failed video (the arguments of `write_shard_rows`)."""
    return results_table(write_shard_rows(from_batch(batch), **kwargs))


def write_shard_rows(rows: list[SegmentRow], *, root: str, storage_options: dict, key: str, run_id: str,
                     storage: dict, backoff_s: float = WRITE_BACKOFF_S) -> list[WriterResult]:
    """The samples among `rows` as one shard, and the failed videos among them: one result each."""
    samples = [r for r in rows if not r.failed]
    failures = failure_rows(rows)
    results: list[WriterResult] = []
    if samples:
        try:
            results.append(_write_samples(samples, FeatureStore(root, storage_options), key, run_id,
                                          StorageSpec(**storage), backoff_s))
        except Exception as e:  # storage still down after the retries: these videos failed, not the job
            log.warning("shard write failed for %d samples: %s", len(samples), e)
            failures += failure_rows([SegmentRow.failure(Failure(r.video_sha256, r.source, "write", "write_error",
                                                                 f"{type(e).__name__}: {e}")) for r in samples])
    results += [WriterResult(failure=f) for f in {f.video_sha256 or f.source: f for f in failures}.values()]
    return results


def _index_row(r: SegmentRow, meta: dict[str, Any]) -> dict[str, Any]:
    return {**{k: meta[k] for k in INDEX_FIELDS}, "labels_json": r.labels_json, "source_raw": r.source_raw or None}


def _write_samples(samples: list[SegmentRow], store: FeatureStore, key: str, run_id: str, spec: StorageSpec,
                   backoff_s: float) -> WriterResult:
    stats, fidelity = TargetStats(), Fidelity()
    built, index_rows = [], []
    for r in samples:
        meta = r.sample_meta()
        stats = stats.merge(TargetStats.of(r.targets))
        fidelity = fidelity.merge(Fidelity(r.fid_n, r.fid_sum, r.fid_min))
        built.append(build_sample(r.sample_key, r.frames_blob, spec.frame_encoding, r.targets, meta, r.patches))
        index_rows.append(_index_row(r, meta))
    t0 = time.perf_counter()
    record = _with_backoff(lambda: store.write_shard(key, run_id, built), backoff_s)
    timing = {"decode_s": sum(r.decode_s for r in samples), "teacher_s": sum(r.teacher_s for r in samples),
              "write_s": time.perf_counter() - t0}
    for row in index_rows:
        row["shard"] = record.name
    spans = [(r.teacher_t0, r.teacher_t1) for r in samples if r.teacher_t1]
    window = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None
    nodes = {"decode": sorted({r.decode_node for r in samples} - {""}),
             "teacher": sorted({r.teacher_node for r in samples} - {""}), "write": [n for n in [node_id()] if n]}
    return WriterResult(shard=record, stats=stats, fidelity=fidelity, timing=timing, teacher_window=window,
                        index_rows=index_rows, nodes=nodes)


def _with_backoff(fn: Any, backoff_s: float, tries: int = WRITE_RETRIES) -> Any:
    """fn(), retried on storage errors (OSError: network, throttling, a full disk) with doubling waits."""
    for attempt in range(tries):
        try:
            return fn()
        except OSError as e:
            if attempt == tries - 1:
                raise
            log.warning("storage error (attempt %d of %d), retrying: %s", attempt + 1, tries, e)
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


class WriteStage:
    """`write_shard_batch` in a long-lived actor: the tar writer's imports (webdataset pulls in torch, ~2 s)
    are paid once per actor, not once per shard in a fresh task worker."""

    def __init__(self, **kwargs: Any):
        import webdataset  # noqa: F401  (imported now, while the first videos decode)

        self.kwargs = kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return write_shard_batch(batch, **self.kwargs)
