"""pipeline.stages called as Ray Data calls them (a dict of numpy columns in, columns out), on real H.264
videos decoded by decord/PyAV in the decoder child, a real tiny transformers teacher and a real store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from feature_store.preprocess import resolve_preprocess
from feature_store.shards import decode_frames
from feature_store.spec import SamplingSpec, StorageSpec
from pipeline.records import SegmentRow, from_batch, to_batch
from pipeline.sampling import cut_segments
from pipeline.stages import DecodeStage, TeacherMismatch, TeacherStage, write_shard_batch
from tests import videos as V

SEG = 8
SAMPLING = SamplingSpec(fps=10, segment_frames=SEG)
STORAGE = StorageSpec()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {"a": V.write_video(d / "a.mp4", V.marked_frames(40), fps=10),  # 5 segments
            "b": V.write_video(d / "b.mkv", V.marked_frames(20, start=100), fps=10),  # 2 segments
            "short": V.write_video(d / "short.mp4", V.marked_frames(3), fps=10),  # padded to one
            "text": V.write_text(d / "text.mp4")}


@pytest.fixture(scope="module")
def preprocess(tiny_teacher):
    return resolve_preprocess(str(tiny_teacher))


NAMES: dict[str, str] = {}  # sha256 -> the clip's name in these tests


def sha_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def work(*items: tuple[str, Path, list[int]], planned: bool = True) -> pa.Table:
    """A work-list batch (WORK_SCHEMA). `planned`: the content hash is known (a file the KEY has seen);
    otherwise "" and the decode stage hashes what it reads."""
    from pipeline.plan import WORK_SCHEMA

    for name, p, _ in items:
        NAMES[sha_of(p)] = name
    return pa.Table.from_pylist([{"source": str(p), "video_id": name, "labels": [("v", name)], "size": 1, "mtime": 0.0,
                                  "sha256": sha_of(p) if planned else "", "have_segments": have, "attempts": 0}
                                 for name, p, have in items], schema=WORK_SCHEMA)


def name_of(sha: str) -> str:
    return NAMES.get(sha, "?")[:1]


def decode_stage(preprocess, decoder="auto") -> DecodeStage:
    return DecodeStage(dataclasses.asdict(SAMPLING), dataclasses.asdict(preprocess), dataclasses.asdict(STORAGE),
                       timeout_s=60, decoder=decoder)


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def decoded(clips, preprocess):
    stage = decode_stage(preprocess)
    batches = list(stage(work(("a", clips["a"], [1]), ("b", clips["b"], []), ("short", clips["short"], []))))
    batches += list(stage(work(("text", clips["text"], []), planned=False)))  # a new file: hashed as it is read
    stage.proc.close()
    return batches


def test_decode_stage_streams_each_new_segment_with_typed_columns(decoded, clips):
    # Segments leave in several batches (as chunks of frames fill them), not one per video.
    assert len(decoded) >= 4
    rows = from_batch(concat(decoded))
    ok = [r for r in rows if not r.failed]
    assert [(r.video_id, r.segment) for r in ok] == [("a", 0), ("a", 2), ("a", 3), ("a", 4), ("b", 0), ("b", 1),
                                                     ("short", 0)]
    assert {r.video_id: r.segments_total for r in ok} == {"a": 5, "b": 2, "short": 1}
    for r in ok:
        assert r.frames.shape == (SEG, 32, 32, 3) and r.frames.dtype == np.uint8
        # the teacher gets the stored frames: the encoded blob decoded back, bit for bit
        np.testing.assert_array_equal(r.frames, decode_frames(r.frames_blob, STORAGE.frame_encoding, SEG))
        assert r.decoder == "decord" and r.fps == pytest.approx(10) and r.decode_s >= 0
    a2 = next(r for r in ok if (r.video_id, r.segment) == ("a", 2))
    assert a2.frame_indices.tolist() == list(range(16, 24)) == [int(x) for x in cut_segments(40, SAMPLING)[2] + 0]
    np.testing.assert_allclose(a2.timestamps, np.arange(16, 24) / 10, atol=1e-4)
    short = next(r for r in ok if r.video_id == "short")
    assert short.padded and short.frame_indices.tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    (fail,) = [r for r in rows if r.failed]
    assert (fail.video_id, fail.source, fail.stage, fail.error) == ("", str(clips["text"]), "decode", "not_a_video")
    assert json.loads(ok[0].labels_json) == {"v": "a"}
    # every row carries the hash of the bytes read; the new file's failure is keyed by it
    assert all(r.video_sha256 == sha_of(clips[r.video_id or "text"]) for r in rows)
    assert fail.video_sha256 == sha_of(clips["text"])


def test_a_file_that_changed_since_planning_is_a_new_video(clips, preprocess, tmp_path):
    stage = decode_stage(preprocess)
    stale = work(("b", clips["b"], [0])).set_column(6, "sha256", pa.array(["0" * 64]))  # planned hash: stale
    try:
        rows = from_batch(concat(list(stage(stale))))
    finally:
        stage.proc.close()
    assert [(r.segment, r.video_sha256) for r in rows] == [(0, sha_of(clips["b"])), (1, sha_of(clips["b"]))]


def test_pyav_segments_wait_for_the_count_then_match_decord(clips, preprocess, decoded):
    stage = decode_stage(preprocess, decoder="pyav")
    try:
        batches = list(stage(work(("a", clips["a"], [1]))))
    finally:
        stage.proc.close()
    assert len(batches) == 1  # PyAV announces no count: the video's segments leave together at its end
    pyav = [r for r in from_batch(batches[0])]
    decord = [r for r in from_batch(concat(decoded)) if r.video_id == "a"]
    assert [(r.segment, r.segments_total) for r in pyav] == [(r.segment, r.segments_total) for r in decord]
    assert all(r.decoder == "pyav" for r in pyav)
    for p, d in zip(pyav, decord):
        assert p.frame_indices.tolist() == d.frame_indices.tolist()
        assert np.abs(p.frames.astype(np.int16) - d.frames).mean() < 2  # same frames, two decoders, JPEG'd


def test_a_video_over_a_cap_fails_with_its_reason(clips, preprocess):
    stage = DecodeStage(dataclasses.asdict(SAMPLING), dataclasses.asdict(preprocess), dataclasses.asdict(STORAGE),
                        timeout_s=60, limits={"max_duration_s": 2.5})
    try:
        rows = from_batch(concat(list(stage(work(("a", clips["a"], []), ("b", clips["b"], []))))))
    finally:
        stage.proc.close()
    assert [(r.video_id or r.source.rsplit("/", 1)[-1], r.error) for r in rows if r.failed] == [("a.mp4", "too_long")]
    assert {r.video_id for r in rows if not r.failed} == {"b"}


# --- teacher -------------------------------------------------------------------------------------------

def teacher_stage(tiny_teacher, **kw) -> TeacherStage:
    return TeacherStage({"model": str(tiny_teacher)}, size=None, device="cpu", precision="fp32", batch_size=16,
                        storage=dataclasses.asdict(STORAGE), segment_frames=SEG, **kw)


def test_teacher_embeds_the_ready_frames_across_videos(decoded, tiny_teacher):
    from feature_store.teacher import load_teacher
    from feature_store.spec import TeacherSpec

    batch = concat(decoded)
    out = teacher_stage(tiny_teacher)(batch)
    assert "frames" not in out and out["targets"].shape == (8, SEG, 16)
    rows = from_batch(out)
    ref = load_teacher(TeacherSpec(model=str(tiny_teacher)), device="cpu")
    for r, src in zip([r for r in rows if not r.failed], [r for r in from_batch(batch) if not r.failed]):
        want = ref.embed(torch.from_numpy(src.frames)).embeds.numpy().astype(np.float16)
        np.testing.assert_allclose(r.targets.astype(np.float32), want.astype(np.float32), atol=2e-3)
        assert r.fid_n == SEG and r.fid_min > 0.99 and r.teacher_t1 >= r.teacher_t0 > 0
    assert [r.error for r in rows if r.failed] == ["not_a_video"]


def test_teacher_refuses_weights_that_are_not_the_keys(tiny_teacher):
    from feature_store.teacher import weights_fingerprint

    good = weights_fingerprint(tiny_teacher)
    teacher_stage(tiny_teacher, expect={"fingerprint": good, "embed_dim": 16, "output_used": "image_embeds"})
    for wrong in ({"fingerprint": "0" * 64}, {"embed_dim": 17}, {"output_used": "cls"}):
        with pytest.raises(TeacherMismatch, match=next(iter(wrong))):
            teacher_stage(tiny_teacher, expect=wrong)


def test_an_out_of_memory_batch_is_retried_once_at_half_size(decoded, tiny_teacher, monkeypatch):
    stage = teacher_stage(tiny_teacher)
    real = stage.teacher.embed_batched
    sizes = []

    def fits_eight(frames, batch_size):
        sizes.append(batch_size)
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(frames, batch_size)

    monkeypatch.setattr(stage.teacher, "embed_batched", fits_eight)
    rows = from_batch(stage(concat(decoded)))
    assert sizes == [16, 8] and sum(not r.failed for r in rows) == 7

    def never_fits(frames, batch_size):
        sizes.append(batch_size)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    sizes.clear()
    monkeypatch.setattr(stage.teacher, "embed_batched", never_fits)
    rows = from_batch(stage(concat(decoded)))
    assert sizes == [16, 8]
    # one failure row per video, whatever the number of its segments in the batch
    assert sorted((name_of(r.video_sha256), r.error, r.stage) for r in rows) == [
        ("a", "oom", "teacher"), ("b", "oom", "teacher"), ("s", "oom", "teacher"), ("t", "not_a_video", "decode")]
    # the same videos failing again in a later batch of this actor are not reported twice
    rows = from_batch(stage(concat(decoded)))
    assert [(name_of(r.video_sha256), r.error) for r in rows] == [("t", "not_a_video")]


# --- writer --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def targeted(decoded, tiny_teacher):
    return teacher_stage(tiny_teacher)(concat(decoded))


def write(batch, root, **kw):
    from pipeline.results import RESULT_SCHEMA, WriterResult

    table = write_shard_batch(batch, root=str(root), storage_options={}, key="k", run_id="r",
                              storage=dataclasses.asdict(STORAGE), backoff_s=0.01, **kw)
    assert table.schema == RESULT_SCHEMA  # typed columns, the same schema for a batch of only failures
    return [WriterResult.from_row(r) for r in table.to_pylist()]


def test_writer_writes_one_shard_as_a_typed_result(targeted, tmp_path):
    from feature_store.shards import parse_sample

    results = write(targeted, tmp_path)
    shard = next(r for r in results if r.shard)
    assert shard.shard.count == 7 and len(shard.index_rows) == 7
    assert shard.timing["write_s"] > 0 and shard.fidelity.n == 7 * SEG and shard.stats.n == 7 * SEG
    assert shard.teacher_window and shard.teacher_window[0] <= shard.teacher_window[1]
    rows = shard.store_rows()
    assert all(r["shard"] == shard.shard.name and isinstance(r["labels"], dict) for r in rows)
    assert [r.failure.error for r in results if r.failure] == ["not_a_video"]
    import tarfile

    with tarfile.open(tmp_path / "k" / shard.shard.name) as tar:
        names = tar.getnames()
        raw = {n.split(".", 1)[1]: tar.extractfile(n).read() for n in names if n.startswith(rows[0]["sample_key"])}
    sample = parse_sample({"__key__": rows[0]["sample_key"], **raw}, STORAGE.frame_encoding)
    assert sample["meta"]["segments_total"] == 5 and sample["targets"].shape == (SEG, 16)
    assert "decode_s" not in sample["meta"] and "fid_sum" not in sample["meta"]  # timing is not sample metadata


def test_writer_retries_storage_errors_then_fails_the_videos_not_the_job(targeted, tmp_path, monkeypatch):
    from feature_store.store import FeatureStore

    real = FeatureStore.write_shard
    calls = []

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError("storage hiccup (simulated)")
        return real(self, *a, **kw)

    monkeypatch.setattr(FeatureStore, "write_shard", flaky)
    results = write(targeted, tmp_path)
    assert len(calls) == 3 and sum(r.shard is not None for r in results) == 1

    def down(self, *a, **kw):
        raise ConnectionError("storage down (simulated)")

    monkeypatch.setattr(FeatureStore, "write_shard", down)
    results = write(targeted, tmp_path)
    fails = sorted((name_of(r.failure.video_sha256), r.failure.error, r.failure.stage) for r in results)
    assert fails == [("a", "write_error", "write"), ("b", "write_error", "write"), ("s", "write_error", "write"),
                     ("t", "not_a_video", "decode")]
    assert all(r.failure.retryable for r in results)


def test_rows_round_trip_through_columns():
    row = SegmentRow(video_sha256="x", source="s", sample_key="k", segment=3, labels_json='{"a": 1}',
                     frame_indices=np.arange(4), timestamps=np.arange(4) / 2,
                     frames=np.full((4, 2, 2, 3), 7, np.uint8), frames_blob=b"\x00\x01")
    fail = SegmentRow(video_sha256="y", source="t", error="timeout", stage="decode", message="m")
    shapes = {"frame_indices": ((4,), np.int64), "timestamps": ((4,), np.float64), "frames": ((4, 2, 2, 3), np.uint8)}
    batch = to_batch([row, fail], shapes)
    assert batch["frames"].shape == (2, 4, 2, 2, 3) and batch["segment"].dtype == np.int64
    back = from_batch(batch)
    assert back[0].segment == 3 and back[0].frames_blob == b"\x00\x01" and back[0].frames[0, 0, 0, 0] == 7
    assert back[1].failed and back[1].frames is None and back[1].as_failure().transient
    assert not SegmentRow(video_sha256="z", source="u", error="not_a_video").as_failure().transient
    assert not SegmentRow(video_sha256="z", source="u", error="too_short").as_failure().retryable


def test_a_decoder_that_crashes_or_hangs_part_way_costs_only_its_video(clips, preprocess, tmp_path):
    import shutil

    from tests import decode_stubs

    crash, slow = tmp_path / "crash.mp4", tmp_path / "slow.mp4"
    shutil.copy(clips["a"], crash)
    shutil.copy(clips["a"], slow)
    stage = DecodeStage(dataclasses.asdict(SAMPLING), dataclasses.asdict(preprocess), dataclasses.asdict(STORAGE),
                        timeout_s=20, decode_fn=decode_stubs.by_name)
    try:
        rows = from_batch(concat(list(stage(work(("c", crash, []), ("s", slow, []), ("b", clips["b"], []))))))
    finally:
        stage.proc.close()
    fails = [(Path(r.source).stem[:1], r.error, r.stage) for r in rows if r.failed]
    assert fails == [("c", "crashed", "decode"), ("s", "timeout", "decode")]
    # the chunk that arrived before the crash or hang still gave its (complete) segments; the next video is whole
    assert [(r.video_id, r.segment) for r in rows if not r.failed] == [
        ("c", 0), ("c", 1), ("s", 0), ("s", 1), ("b", 0), ("b", 1)]
    assert {r.video_sha256 for r in rows if r.video_id in "cs"} == {sha_of(clips["a"])}  # copies: one content
    assert stage.proc.restarts == 2
