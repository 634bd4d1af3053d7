"""The driver's bookkeeping (pipeline.tally) and the writer's typed result rows (pipeline.results): pure logic."""

from __future__ import annotations

import pyarrow as pa

from feature_store.records import CommitBatch, Fidelity, ShardRecord, TargetStats
from pipeline.records import Failure
from pipeline.results import RESULT_SCHEMA, WriterResult, results_table
from pipeline.tally import Claims, CommitCadence, Tally, sha_prefixes


def shard(name: str, *segs: tuple[str, int, int], source: str = "") -> WriterResult:
    rows = [{"sample_key": f"{sha}-{seg}", "video_sha256": sha, "video_id": sha, "source": source or f"/v/{sha}.mp4",
             "source_raw": None, "segment": seg, "segments_total": total, "frame_indices": [0, 1],
             "timestamps": [0.0, 0.5], "labels_json": '{"shape": "disk"}', "shard": name, "num_frames": 2,
             "decoder": "decord", "video_size": 10, "video_mtime": 1.0} for sha, seg, total in segs]
    return WriterResult(shard=ShardRecord(name, len(rows), 100, "h"), stats=TargetStats(2, [1.0], [1.0]),
                        fidelity=Fidelity(2, 1.9, 0.9), timing={"decode_s": 1.0, "teacher_s": 2.0, "write_s": 0.1},
                        teacher_window=(5.0, 6.0), index_rows=rows)


def round_trip(r: WriterResult) -> WriterResult:
    table = results_table([r])
    assert table.schema == RESULT_SCHEMA
    return WriterResult.from_row(table.to_pylist()[0])


def test_results_round_trip_as_typed_columns_with_a_non_utf8_name():
    raw = b"/v/caf\xe9.mp4"  # latin-1 bytes: not UTF-8
    name = raw.decode("utf-8", "surrogateescape")
    r = shard("s1", ("a", 0, 2))
    r.index_rows[0].update(source=raw.decode("utf-8", "backslashreplace"), source_raw=raw)
    r.nodes = {"decode": ["n1", "n2"], "teacher": ["n2"], "write": ["n3"]}
    back = round_trip(r)
    assert back.nodes == r.nodes
    assert back.shard == r.shard and back.stats == r.stats and back.fidelity == r.fidelity
    assert back.timing == r.timing and back.teacher_window == (5.0, 6.0)
    rows = back.store_rows()
    assert rows[0]["source"] == name and rows[0]["labels"] == {"shape": "disk"} and "labels_json" not in rows[0]
    f = round_trip(WriterResult(failure=Failure("a", "/v/a.mp4", "teacher", "oom", "m")))
    assert f.shard is None and f.failure == Failure("a", "/v/a.mp4", "teacher", "oom", "m")
    assert pa.Table.from_pylist([], schema=RESULT_SCHEMA).num_rows == 0


def test_a_video_fails_once_per_run_and_clears_its_ledger_only_when_complete():
    tally, batch = Tally(segment_frames=4, retrying={"a"}), CommitBatch()
    assert tally.failure(Failure("b", "/v/b.mp4", "teacher", "oom", "m"), batch)
    assert not tally.failure(Failure("b", "/v/b.mp4", "write", "write_error", "m"), batch)  # another batch, same video
    assert [f["error"] for f in batch.failures] == ["oom"] and tally.counters["videos_failed"] == 1
    assert tally.shard(shard("s1", ("a", 0, 2)), batch) == 0  # half of "a": its old failure stays
    assert batch.succeeded == []
    assert tally.shard(shard("s2", ("a", 1, 2)), batch) == 1
    assert batch.succeeded == ["sha:a"] and tally.counters["videos_new_ok"] == 1 and not tally.inflight
    assert tally.counters["frames_computed"] == 8 and len(batch.rows) == 2 and batch.stats.n == 4
    assert not tally.stage_nodes  # no Ray: no node ids


def test_segments_stored_by_an_earlier_run_count_towards_completion():
    tally, batch = Tally(segment_frames=4, partial={"a": 2}), CommitBatch()
    assert tally.shard(shard("s1", ("a", 2, 3)), batch) == 1


def test_commit_cadence_commits_every_n_shards_and_at_the_end():
    committed: list[int] = []
    cadence = CommitCadence(lambda b: committed.append(len(b.shards)), CommitBatch, every_shards=2, every_s=1e9)
    tally = Tally(segment_frames=4)
    for i, sha in enumerate("abc"):
        tally.shard(shard(f"s{i}", (sha, 0, 1)), cadence.batch)
        cadence.maybe()
    assert committed == [2]
    cadence.flush()
    cadence.flush()  # nothing left: no empty version
    assert committed == [2, 1] and cadence.versions == 2


def sha(c: str) -> str:
    return c * 64


def test_two_files_with_the_same_bytes_end_as_one_videos_rows_and_one_duplicate():
    tally, batch = Tally(segment_frames=4), CommitBatch()
    a, b = sha("a"), sha("b")
    # the copy's segments interleave with the first's, across shards, in any order
    assert tally.shard(shard("s1", (a, 0, 2), (b, 0, 1)), batch) == 1
    assert tally.shard(shard("s2", (a, 0, 2), (a, 1, 2), source="/v/copy.mp4"), batch) == 0
    assert tally.shard(shard("s3", (a, 1, 2)), batch) == 1
    assert tally.shard(shard("s4", (a, 0, 2), source="/v/late-copy.mp4"), batch) == 0  # after "a" finished
    assert tally.shard(shard("s5", (a, 0, 2)), batch) == 0  # a retried block's output: not a duplicate file
    assert sorted((r["video_sha256"][0], r["segment"], r["source"]) for r in batch.rows) == [
        ("a", 0, f"/v/{a}.mp4"), ("a", 1, f"/v/{a}.mp4"), ("b", 0, f"/v/{b}.mp4")]
    assert tally.counters["videos_duplicate"] == 2 and tally.counters["videos_new_ok"] == 2
    assert [(c["source"], c["video_sha256"]) for c in batch.copies] == [("/v/copy.mp4", a), ("/v/late-copy.mp4", a)]
    assert not tally.inflight  # per-video state only while a video is in flight


def test_content_already_in_the_index_under_another_name_is_a_duplicate():
    a, c = sha("a"), sha("c")
    asked: list[list[str]] = []

    def lookup(shas):
        asked.append(shas)
        return pa.table({"video_sha256": [a], "source": ["/old/a.mp4"]})

    claims = Claims(sha_prefixes(pa.array([a, sha("d")])), lookup)
    tally, batch = Tally(segment_frames=4, claims=claims), CommitBatch()
    assert tally.shard(shard("s1", (a, 0, 1), (c, 0, 1)), batch) == 1
    assert [r["video_sha256"] for r in batch.rows] == [c] and tally.counters["videos_duplicate"] == 1
    assert asked == [[a]]  # the index is asked only about the prefix hits
    same = Tally(segment_frames=4, claims=Claims(sha_prefixes(pa.array([a])), lambda s: lookup(s)),
                 partial={a: 1})
    assert same.shard(shard("s2", (a, 1, 2), source="/old/a.mp4"), batch) == 1  # completing its own video


def test_sha_prefixes_are_the_first_64_bits():
    shas = pa.chunked_array([[sha("f"), "0123456789abcdef" * 4], ["", "xyz"]])
    assert sha_prefixes(shas).tolist() == [2**64 - 1, 0x0123456789ABCDEF]
