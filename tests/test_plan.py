import pyarrow as pa
import pytest

from feature_store.ledger import FAILURES_SCHEMA, judge_version
from feature_store.records import INDEX_SCHEMA, rows_table
from feature_store.store import failure_id
from pipeline import plan as plan_mod
from pipeline.plan import VideoInput


def row(sha, seg, total, source="/v/a.mp4", vid="a", labels=None, size=10, mtime=1.0):
    return {"sample_key": f"{sha}-s{seg}", "video_sha256": sha, "segment": seg, "segments_total": total,
            "source": source, "video_id": vid, "labels": labels or {}, "video_size": size, "video_mtime": mtime}


def fail(sha, source, attempts, retryable=True, error="timeout", judged_by=None):
    return {"failure_id": failure_id(sha, source), "video_sha256": sha, "source": source, "attempts": attempts,
            "retryable": retryable, "error": error, "cause": "transient" if retryable else "deterministic",
            "judged_by": judge_version() if judged_by is None else judged_by}


def make_plan(inputs, index_rows, failure_rows, **kw):
    """The planner takes Arrow tables (a KEY version's index and failure state)."""
    return plan_mod.make_plan(inputs, rows_table(index_rows, INDEX_SCHEMA), rows_table(failure_rows, FAILURES_SCHEMA),
                              **kw)


def sha_of(plan):
    return plan.work.column("sha256").to_pylist()


def vi(source, sha, vid="a", labels=None, error="", size=10, mtime=1.0):
    return VideoInput(source, vid, labels or {}, sha256=sha, size=size, mtime=mtime, error=error)


def test_complete_videos_are_reused_and_partial_ones_completed():
    index = [row("A", 0, 2), row("A", 1, 2), row("B", 0, 3, source="/v/b.mp4", vid="b")]
    plan = make_plan([vi("/v/a.mp4", "A"), vi("/v/b.mp4", "B", vid="b"), vi("/v/c.mp4", "C", vid="c")], index, [],
                     max_attempts=3, segment_frames=4)
    assert plan.reused == 1
    assert {w["sha256"]: w["have_segments"] for w in plan.work.to_pylist()} == {"B": [0], "C": []}
    assert plan.partial == {"B": 1} and plan.summary()["to_complete"] == 1
    assert plan.frames_reused == 3 * 4
    assert not plan.metadata_updates


def test_renamed_video_is_reused_with_its_metadata_updated():
    index = [row("A", 0, 1, source="/old/a.mp4", vid="a", labels={"shape": "circle"})]
    plan = make_plan([vi("/new/x.mp4", "A", vid="x", labels={"shape": "square"})], index, [], max_attempts=3,
                     segment_frames=4)
    assert not plan.work.num_rows and plan.reused == 1
    assert plan.metadata_updates == [{"video_sha256": "A", "source": "/new/x.mp4", "video_id": "x",
                                      "labels": {"shape": "square"}, "video_size": 10, "video_mtime": 1.0}]


def test_failed_videos_are_retried_until_quarantined():
    failures = [fail("F", "/v/f.mp4", 2), fail("G", "/v/g.mp4", 3),
                fail("H", "/v/h.mp4", 1, retryable=False, error="not_a_video")]
    inputs = [vi("/v/f.mp4", "F"), vi("/v/g.mp4", "G"), vi("/v/h.mp4", "H")]
    plan = make_plan(inputs, [], failures, max_attempts=3, segment_frames=4)
    assert sha_of(plan) == ["F"] and plan.retrying == {"F"}
    assert sorted(src for src, _ in plan.quarantined) == ["/v/g.mp4", "/v/h.mp4"]
    assert plan.work.column("attempts").to_pylist() == [2]


def test_deterministic_failures_are_retried_only_when_the_judge_changed_or_forced():
    same = fail("H", "/v/h.mp4", 1, retryable=False, error="not_a_video")
    older = fail("J", "/v/j.mp4", 1, retryable=False, error="corrupt", judged_by="decord-0.5/judge-1")
    inputs = [vi("/v/h.mp4", "H"), vi("/v/j.mp4", "J")]
    plan = make_plan(inputs, [], [same, older], max_attempts=3, segment_frames=4)
    assert sha_of(plan) == ["J"] and [src for src, _ in plan.quarantined] == ["/v/h.mp4"]
    forced = make_plan(inputs, [], [same, older], max_attempts=3, segment_frames=4, retry_failed=True)
    assert sorted(sha_of(forced)) == ["H", "J"]


def test_known_hashes_is_a_join_on_source_size_and_mtime():
    index = rows_table([{**row("A", 0, 1, source="/v/a.mp4"), "sample_key": "k1"},
                        {**row("B", 0, 1, source="/v/b\udcff.mp4", size=20), "sample_key": "k2"}], INDEX_SCHEMA)
    stats = [("/v/a.mp4", 10, 1.0), ("/v/a.mp4", 11, 1.0), ("/v/b\udcff.mp4", 20, 1.0), ("/v/c.mp4", 10, 1.0)]
    assert plan_mod.known_hashes(stats, index) == ["A", "", "B", ""]


def test_same_bytes_twice_in_one_input_are_computed_once():
    plan = make_plan([vi("/v/a.mp4", "A"), vi("/v/copy.mp4", "A", vid="copy")], [], [], max_attempts=3,
                     segment_frames=4)
    assert plan.work.num_rows == 1 and plan.duplicates == 1


def test_unreadable_inputs_are_reported_not_computed():
    plan = make_plan([vi("/v/gone.mp4", "", error="missing")], [], [], max_attempts=3, segment_frames=4)
    assert not plan.work.num_rows and [src for src, _ in plan.unreadable] == ["/v/gone.mp4"]


def test_unreadable_inputs_are_quarantined_after_max_attempts():
    plan = make_plan([vi("/v/gone.mp4", "", error="missing")], [], [fail("", "/v/gone.mp4", 3, error="unreadable")],
                     max_attempts=3, segment_frames=4)
    assert not plan.unreadable and len(plan.quarantined) == 1


@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 16, 64])
def test_cpu_actor_plan_fits_the_cluster_and_gives_the_teacher_the_cores(cpus):
    from pipeline.extract import plan_actors

    p = plan_actors(cpus, 0)
    assert p.teacher_gpus == 0 and p.teacher_actors == cpus and p.teacher_threads == 1
    # every actor of the three pools can be placed at once, or the pipeline would wait for CPUs forever; writers
    # reserve CPU, so Ray never places one on a 0-CPU head node
    assert p.writer_cpus > 0 and p.writer_actors >= 1
    assert (p.decode_actors * p.decode_cpus + p.teacher_actors * p.teacher_cpus
            + p.writer_actors * p.writer_cpus <= cpus + 1e-9)


def test_gpu_actor_plan_and_user_overrides():
    from pipeline.extract import plan_actors

    gpu = plan_actors(16, 2)
    assert (gpu.teacher_actors, gpu.teacher_gpus, gpu.teacher_threads) == (2, 1.0, 0)
    assert gpu.writer_actors == 4 and gpu.decode_actors == 14
    assert gpu.decode_actors * gpu.decode_cpus + 2 * gpu.teacher_cpus + 4 * gpu.writer_cpus <= 16
    assert plan_actors(16, 2, "cpu").teacher_gpus == 0  # --device cpu keeps the teacher off the GPUs
    one = plan_actors(8, 0, teacher_actors=1, decode_concurrency=2)
    assert (one.teacher_actors, one.decode_actors, one.writer_actors, one.teacher_threads) == (1, 2, 2, 7)
    assert one.decode_actors * one.decode_cpus + one.teacher_cpus + one.writer_actors * one.writer_cpus <= 8


def test_steady_rate_is_the_frames_over_the_teacher_window():
    from pipeline.extract import steady_rate

    assert steady_rate(400, [(10.0, 12.0), (11.0, 14.0)]) == 400 / 4.0
    assert steady_rate(400, []) is None


def test_a_folder_or_glob_listing_brings_size_and_mtime_so_no_video_is_stat_on_its_own(tmp_path, monkeypatch):
    import pipeline.sources as sources
    from pipeline.sources import LISTING_SCHEMA, listing_table, stat_video

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"12345")
    (tmp_path / "y.avi").write_bytes(b"1")
    (tmp_path / "notes.txt").write_text("not a video")
    expect = {str(tmp_path / "a" / "x.mp4"): stat_video(str(tmp_path / "a" / "x.mp4")),
              str(tmp_path / "y.avi"): stat_video(str(tmp_path / "y.avi"))}

    def no_stat(*a, **kw):
        raise AssertionError("a serial stat per video")

    monkeypatch.setattr(sources, "stat_video", no_stat)
    table = listing_table(str(tmp_path))
    assert table.schema == LISTING_SCHEMA
    assert [(r["video_id"], r["size"], r["mtime"]) for r in table.to_pylist()] == [
        ("a/x", 5, expect[str(tmp_path / "a" / "x.mp4")].mtime), ("y", 1, expect[str(tmp_path / "y.avi")].mtime)]
    assert listing_table(str(tmp_path / "*.avi")).column("source").to_pylist() == [str(tmp_path / "y.avi")]


def test_a_manifest_listing_keeps_labels_and_marks_missing_files(tmp_path):
    from pipeline.sources import listing_table

    (tmp_path / "a.mp4").write_bytes(b"123")
    (tmp_path / "m.csv").write_text("path,video_id,shape\na.mp4,a,disk\ngone.mp4,g,\n")
    rows = listing_table(str(tmp_path / "m.csv")).to_pylist()
    assert [(r["video_id"], dict(r["labels"]), r["size"], r["error"]) for r in rows] == [
        ("a", {"shape": "disk"}, 3, ""), ("g", {}, 0, "missing")]


def test_the_listing_is_planned_by_joins_and_new_files_are_not_hashed_before_decoding():
    """Known unchanged files get their hash from the index; new ones go to the work list with none."""
    index = rows_table([row("A", 0, 1, source="/v/a.mp4"), row("B", 0, 2, source="/v/b.mp4", vid="b")], INDEX_SCHEMA)
    listing = plan_mod.inputs_table([vi("/v/a.mp4", ""), vi("/v/b.mp4", "", vid="b"), vi("/v/c.mp4", "", vid="c"),
                                     vi("/v/a.mp4", "", vid="a2", size=99)]).drop_columns(["sha256"])
    planned = plan_mod.join_known(listing, index)
    assert planned.column("sha256").to_pylist() == ["A", "B", "", ""]
    plan = plan_mod.make_plan(planned, index, FAILURES_SCHEMA.empty_table(), max_attempts=3, segment_frames=4)
    assert plan.reused == 1 and plan.partial == {"B": 1}
    assert [(w["source"], w["sha256"], w["have_segments"]) for w in plan.work.to_pylist()] == [
        ("/v/b.mp4", "B", [0]), ("/v/c.mp4", "", []), ("/v/a.mp4", "", [])]  # a changed file is a new one
    assert plan.work.schema == plan_mod.WORK_SCHEMA


def test_the_work_list_is_parquet_in_blocks_of_at_most_a_few_hundred_videos_and_shuffled(tmp_path):
    import pyarrow.parquet as pq

    from feature_store.store import FeatureStore
    from pipeline.worklist import VIDEOS_PER_BLOCK, WorkList, work_blocks

    assert work_blocks(3, 2) == 3 and work_blocks(100, 2) == 8
    assert 100_000 / work_blocks(100_000, 2) <= VIDEOS_PER_BLOCK
    listing = plan_mod.inputs_table([vi(f"/d/{i // 50}/{i}.mp4", "") for i in range(1000)])
    plan = plan_mod.make_plan(listing, INDEX_SCHEMA.empty_table(), FAILURES_SCHEMA.empty_table(), max_attempts=3,
                              segment_frames=4)
    store = FeatureStore(str(tmp_path))
    orders = []
    for _ in range(2):
        work = WorkList(store, "k", "run-1")
        assert work.write(plan.work, "run-1", blocks=2) == 5  # 1000 videos: blocks of VIDEOS_PER_BLOCK at most
        tables = [pq.read_table(f) for f in work.files]
        assert all(t.num_rows <= VIDEOS_PER_BLOCK for t in tables)
        orders.append([s for t in tables for s in t.column("source").to_pylist()])
        assert work.path.startswith(str(tmp_path / "k" / "_tmp" / "run-1"))
        work.remove()
        assert not (tmp_path / "k" / "_tmp" / "run-1" / "worklist").exists()
    assert sorted(orders[0]) == sorted(listing.column("source").to_pylist())
    assert orders[0] != listing.column("source").to_pylist() and orders[0] == orders[1]  # seeded, not folder order


def test_a_recorded_copy_is_not_decoded_again_and_takes_over_when_its_original_is_gone():
    from feature_store.records import COPIES_SCHEMA

    index = rows_table([row("A", 0, 1, source="/v/a.mp4")], INDEX_SCHEMA)
    copies = rows_table([{"source": "/v/copy.mp4", "video_size": 10, "video_mtime": 1.0, "video_sha256": "A"}],
                        COPIES_SCHEMA)
    both = plan_mod.inputs_table([vi("/v/copy.mp4", "", vid="copy"), vi("/v/a.mp4", "")])
    plan = plan_mod.make_plan(plan_mod.join_known(both, index, copies), index, FAILURES_SCHEMA.empty_table(),
                              max_attempts=3, segment_frames=4)
    assert not plan.work.num_rows and plan.reused == 1 and plan.duplicates == 1 and not plan.metadata_updates
    alone = plan_mod.inputs_table([vi("/v/copy.mp4", "", vid="copy")])  # the original was moved away
    plan = plan_mod.make_plan(plan_mod.join_known(alone, index, copies), index, FAILURES_SCHEMA.empty_table(),
                              max_attempts=3, segment_frames=4)
    assert plan.reused == 1 and [u["source"] for u in plan.metadata_updates] == ["/v/copy.mp4"]


def test_only_new_files_with_a_failure_on_record_are_hashed_before_planning(tmp_path, monkeypatch):
    import hashlib

    import pipeline.extract as extract

    for name in ("bad.mp4", "new.mp4"):
        (tmp_path / name).write_bytes(name.encode())
    hashed = []
    real = extract.hash_video
    monkeypatch.setattr(extract, "hash_video", lambda src, so=None: hashed.append(src) or real(src, so))
    listing = plan_mod.inputs_table([vi(str(tmp_path / "bad.mp4"), ""), vi(str(tmp_path / "new.mp4"), "")])
    sha = hashlib.sha256(b"bad.mp4").hexdigest()
    failures = rows_table([fail(sha, str(tmp_path / "bad.mp4"), 1, retryable=False, error="not_a_video")],
                          FAILURES_SCHEMA)
    out = extract.hash_failed_sources(listing, failures, {})
    assert hashed == [str(tmp_path / "bad.mp4")] and out.column("sha256").to_pylist() == [sha, ""]
    plan = plan_mod.make_plan(out, INDEX_SCHEMA.empty_table(), failures, max_attempts=3, segment_frames=4)
    assert [src for src, _ in plan.quarantined] == [str(tmp_path / "bad.mp4")]
    assert plan.work.column("source").to_pylist() == [str(tmp_path / "new.mp4")]


def test_planning_in_chunks_decides_exactly_what_one_pass_decides():
    """make_plan plans `chunk` videos at a time (bounded scratch): copies of one content straddling a chunk
    boundary, partial, complete, renamed, failed, new and unreadable videos all come out as in one pass."""
    index = [row("A", 0, 1), row("B", 0, 2, source="/v/b.mp4", vid="b"), row("D", 0, 1, source="/old/d.mp4", vid="d"),
             row("E", 0, 1, source="/v/e.mp4", vid="e"), row("G", 0, 1, source="/v/g.mp4", vid="g")]
    inputs = [vi("/v/g.mp4", "G", vid="g"), vi("/v/a.mp4", "A"), vi("/v/a2.mp4", "A", vid="a2"),
              vi("/v/a3.mp4", "A", vid="a3"), vi("/v/b.mp4", "B", vid="b"), vi("/v/c.mp4", "C", vid="c"),
              vi("/v/d.mp4", "D", vid="d"), vi("/v/gone.mp4", "", error="missing"), vi("/v/n1.mp4", "", vid="n1"),
              vi("/v/f.mp4", "F", vid="f"), vi("/v/n2.mp4", "", vid="n2"), vi("/v/e.mp4", "E", vid="e"),
              vi("/v/h.mp4", "H", vid="h")]
    failures = [fail("F", "/v/f.mp4", 3), fail("H", "/v/h.mp4", 1)]

    def decided(chunk):
        p = make_plan(inputs, index, failures, max_attempts=3, segment_frames=4, chunk=chunk)
        return (p.work.to_pylist(), p.summary(), sorted(p.quarantined), sorted(p.unreadable), p.retrying, p.partial,
                sorted(p.metadata_updates, key=lambda u: u["video_sha256"]))

    whole = decided(10_000)
    assert whole[1]["reused"] == 4 and whole[1]["duplicates"] == 2 and whole[1]["to_compute"] == 5
    assert [w["source"] for w in whole[0]] == ["/v/b.mp4", "/v/c.mp4", "/v/n1.mp4", "/v/n2.mp4", "/v/h.mp4"]
    for chunk in (1, 2, 3):
        assert decided(chunk) == whole, chunk
    assert list(plan_mod._chunk_bounds(pa.chunked_array([["A", "A", "A", "B", "C", "C"]]), 2)) == [(0, 3), (3, 6)]


def test_joining_in_chunks_finds_what_one_join_finds():
    """join_known joins `chunk` listed names at a time against their slice of the index: same result, in the
    listing's order (a manifest's order is not the names' order)."""
    from feature_store.records import COPIES_SCHEMA

    index = rows_table([row("A", 0, 1, source="/v/a.mp4"), row("A", 1, 2, source="/v/a.mp4"),
                        row("B", 0, 1, source="/v/b.mp4", size=20), row("C", 0, 1, source="/v/c.mp4", mtime=2.0)],
                       INDEX_SCHEMA)
    copies = rows_table([{"source": "/v/z.mp4", "video_size": 10, "video_mtime": 1.0, "video_sha256": "A"}],
                        COPIES_SCHEMA)
    listing = plan_mod.inputs_table([vi("/v/z.mp4", ""), vi("/v/c.mp4", ""), vi("/v/a.mp4", ""),
                                     vi("/v/b.mp4", "", size=20), vi("/v/y.mp4", ""), vi("/v/b.mp4", "", size=21)])
    whole = plan_mod.join_known(listing, index, copies, chunk=10_000)
    assert whole.column("sha256").to_pylist() == ["A", "", "A", "B", "", ""]
    assert whole.column("known_copy").to_pylist() == [True, False, False, False, False, False]
    for chunk in (1, 2, 3):
        assert plan_mod.join_known(listing, index, copies, chunk=chunk).equals(whole), chunk
