"""The driver's bookkeeping (pipeline.tally) and the writer's typed result rows (pipeline.results): pure logic."""

from __future__ import annotations

import pyarrow as pa

from feature_store.records import CommitBatch, Fidelity, ShardRecord, TargetStats
from pipeline.plan import WorkItem
from pipeline.records import Failure
from pipeline.results import RESULT_SCHEMA, WriterResult, results_table
from pipeline.tally import CommitCadence, Tally


def item(sha: str, attempts: int = 0, have: list[int] | None = None) -> WorkItem:
    return WorkItem(f"/v/{sha}.mp4", sha, {}, sha, 10, 1.0, have_segments=have or [], attempts=attempts)


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
    tally, batch = Tally([item("a", attempts=1), item("b")], segment_frames=4), CommitBatch()
    assert tally.failure(Failure("b", "/v/b.mp4", "teacher", "oom", "m"), batch)
    assert not tally.failure(Failure("b", "/v/b.mp4", "write", "write_error", "m"), batch)  # another batch, same video
    assert [f["error"] for f in batch.failures] == ["oom"] and tally.counters["videos_failed"] == 1
    assert tally.shard(shard("s1", ("a", 0, 2)), batch) == 0  # half of "a": its old failure stays
    assert batch.succeeded == []
    assert tally.shard(shard("s2", ("a", 1, 2)), batch) == 1
    assert batch.succeeded == ["sha:a"] and tally.counters["videos_new_ok"] == 1 and not tally.pending
    assert tally.counters["frames_computed"] == 8 and len(batch.rows) == 2 and batch.stats.n == 4
    assert not tally.stage_nodes  # no Ray: no node ids


def test_segments_stored_by_an_earlier_run_count_towards_completion():
    tally, batch = Tally([item("a", have=[0, 1])], segment_frames=4), CommitBatch()
    assert tally.shard(shard("s1", ("a", 2, 3)), batch) == 1


def test_commit_cadence_commits_every_n_shards_and_at_the_end():
    committed: list[int] = []
    cadence = CommitCadence(lambda b: committed.append(len(b.shards)), CommitBatch, every_shards=2, every_s=1e9)
    tally = Tally([item("a"), item("b"), item("c")], segment_frames=4)
    for i, sha in enumerate("abc"):
        tally.shard(shard(f"s{i}", (sha, 0, 1)), cadence.batch)
        cadence.maybe()
    assert committed == [2]
    cadence.flush()
    cadence.flush()  # nothing left: no empty version
    assert committed == [2, 1] and cadence.versions == 2
