"""The store's contract on a local disk: snapshots, concurrent commits, verify, gc, readers."""

import os
import threading
import time

import numpy as np
import pytest
import webdataset as wds

from feature_store.maintenance import gc, inspect, verify
from feature_store.reader import SplitFilter, decode_sample, iter_samples, torch_dataset
from feature_store.scan import Match
from feature_store.store import CommitBatch, FeatureStore, KeyNotFound, failure_id, table_rows
from tests.storehelpers import S, T, D, add_video, key, small_spec, store, video_sha  # noqa: F401 (fixtures)




def test_commit_publishes_a_version_in_delta_tables(store, key, tmp_path):
    from deltalake import DeltaTable

    snap = add_video(store, key, "a", 3)
    assert snap.version == 1 and snap.index.num_rows == 3
    assert snap.manifest["counts"]["samples"] == 3 and snap.manifest["version"] == 1
    kdir = tmp_path / "store" / key
    shard = snap.shards[0]
    assert (kdir / shard.name).stat().st_size == shard.bytes and len(shard.sha256) == 64
    index = DeltaTable(str(kdir / "tables" / "index")).to_pyarrow_table()  # any Delta reader opens it
    assert DeltaTable(str(kdir / "tables" / "index")).version() == snap.version
    assert set(index.column_names) >= {"sample_key", "video_id", "source", "segment", "frame_indices", "timestamps",
                                        "labels", "shard"}
    assert DeltaTable(str(kdir / "tables" / "shards")).to_pyarrow_table().column("name").to_pylist() == [shard.name]
    assert (kdir / "tables" / "failures" / "_delta_log").is_dir()
    assert not any(k.startswith(".") or "." in k for k in index.column("sample_key").to_pylist())


def test_shards_read_with_plain_webdataset_and_tar(store, key, tmp_path):
    add_video(store, key, "a", 2)
    shard = store.open(key).shards[0].name
    url = str(tmp_path / "store" / key / shard)
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert len(samples) == 2
    assert set(samples[0]) >= {"__key__", "teacher.npy", "frames.jpg", "json"}
    import tarfile

    with tarfile.open(url) as tar:
        assert len(tar.getnames()) == 2 * 3


def test_old_snapshots_stay_readable_after_the_key_grows(store, key):
    add_video(store, key, "a", 2)
    add_video(store, key, "b", 2)
    v1 = store.open(key, 1)
    assert v1.index.num_rows == 2 and store.open(key).index.num_rows == 4
    assert {s["sample_key"] for s in iter_samples(store, v1)} == set(v1.index.column("sample_key").to_pylist())


def test_concurrent_commits_lose_nothing(store, key):
    batches = [add_video(store, key, f"v{i}", 2, run_id=f"20260101000000-run{i:05d}", commit=False) for i in range(8)]
    errors = []

    def commit(b):
        try:
            store.commit(key, b)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    snap = store.open(key)
    assert snap.version == 8 and store.versions(key) == list(range(1, 9))
    assert snap.index.num_rows == 16 and len(snap.shards) == 8


def test_duplicate_samples_from_two_writers_are_indexed_once(store, key):
    add_video(store, key, "a", 2, run_id="20260101000000-runaaaaa")
    snap = add_video(store, key, "a", 2, run_id="20260101000000-runbbbbb")
    assert snap.index.num_rows == 2
    assert len(list(iter_samples(store, snap))) == 2  # the reader skips the unreferenced copies


def test_failure_ledger_counts_attempts_and_clears_on_success(store, key):
    sha = video_sha("bad")
    fail = {"failure_id": failure_id(sha, "/v/bad.mp4"), "video_sha256": sha, "source": "/v/bad.mp4",
            "stage": "decode", "error": "not_a_video", "message": "x", "attempts": 1, "retryable": True,
            "last_attempt": "now"}
    store.commit(key, CommitBatch(failures=[fail, fail], run_id="20260101000000-run00001"))  # two segments
    store.commit(key, CommitBatch(failures=[fail], run_id="20260101000000-run00001"))  # same run again
    snap = store.commit(key, CommitBatch(failures=[fail], run_id="20260101000000-run00002"))
    assert snap.failures.to_pylist()[0]["attempts"] == 2  # one attempt per video per run
    snap = store.commit(key, CommitBatch(succeeded=[fail["failure_id"]], run_id="20260101000000-run00003"))
    assert snap.failures.num_rows == 0
    assert store.open(key, snap.version - 1).failures.num_rows == 1  # older versions keep their view


def test_metadata_update_changes_source_and_labels_not_targets(store, key):
    add_video(store, key, "a", 2, labels={"shape": "circle"})
    before = {s["sample_key"]: s["targets"] for s in iter_samples(store, store.open(key))}
    snap = store.commit(key, CommitBatch(metadata_updates=[{"video_sha256": video_sha("a"), "source": "/new/a.mp4",
                                                            "video_id": "a2", "labels": {"shape": "square"}}]))
    rows = table_rows(snap.index)
    assert {r["source"] for r in rows} == {"/new/a.mp4"} and {r["video_id"] for r in rows} == {"a2"}
    after = list(iter_samples(store, snap))
    assert all(s["labels"] == {"shape": "square"} for s in after)
    assert all(np.array_equal(before[s["sample_key"]], s["targets"]) for s in after)


def test_a_relabelled_version_reads_through_a_shard_filter(store, key):
    """Relabelling two videos rewrites their index rows into one new file, which deltalake 1.6.6 writes with
    string_view columns (delta-rs #4579) beside untouched `string` files; every reader filters that mix by
    shard, which failed with ArrowNotImplementedError (string, string_view)."""
    for v in "abc":
        add_video(store, key, v, 2, labels={"shape": "circle"})
    before = {s["sample_key"]: s["targets"] for s in iter_samples(store, store.open(key))}
    moved = [{"video_sha256": video_sha(v), "source": f"/videos/{v}.mp4", "video_id": v, "video_size": 1000,
              "video_mtime": 1.0, "labels": {"shape": "square", "split": "train"}} for v in "ab"]
    version = store.commit(key, CommitBatch(metadata_updates=moved, run_id="20260101000000-run00009")).version
    snap = FeatureStore(store.root).open(key, version)  # a reader's fresh handle on that version
    rows = table_rows(snap.rows_for_shards(snap.shard_names()[:2], ["video_id", "labels"]))
    assert len(rows) == 4 and snap.index_columns(where=Match("video_id", ["c"])).num_rows == 2
    labels = {r["video_id"]: dict(r["labels"]) for r in table_rows(snap.index)}
    assert labels == {"a": {"shape": "square", "split": "train"}, "b": {"shape": "square", "split": "train"},
                      "c": {"shape": "circle"}}
    after = [s for r in range(3) for s in iter_samples(store, snap, rank=r, world_size=3)]  # a shard each
    assert sorted(s["labels"].get("split", "") for s in after) == ["", "", "train", "train", "train", "train"]
    assert len(after) == 6 and all(np.array_equal(before[s["sample_key"]], s["targets"]) for s in after)
    assert verify(store, key, version).ok


def test_verify_passes_on_a_clean_store(store, key):
    add_video(store, key, "a", 3)
    rep = verify(store, key)
    assert rep.ok, rep.problems
    assert rep.samples_checked == 3 and rep.shards_checked == 1


def _shard_path(store, key, tmp_path):
    return tmp_path / "store" / key / store.open(key).shards[0].name


def test_verify_catches_a_flipped_byte(store, key, tmp_path):
    add_video(store, key, "a", 2)
    p = _shard_path(store, key, tmp_path)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))
    kinds = {x["kind"] for x in verify(store, key).problems}
    assert "checksum_mismatch" in kinds


def test_verify_catches_truncated_and_missing_shards(store, key, tmp_path):
    add_video(store, key, "a", 2)
    add_video(store, key, "b", 2)
    shards = store.open(key).shards
    p0 = tmp_path / "store" / key / shards[0].name
    p0.write_bytes(p0.read_bytes()[:1000])
    os.unlink(tmp_path / "store" / key / shards[1].name)
    kinds = {x["kind"] for x in verify(store, key).problems}
    assert {"size_mismatch", "missing_shard"} <= kinds


def test_verify_catches_wrong_dtype_and_dangling_index_rows(store, key):
    add_video(store, key, "a", 2, target_dtype="float32")  # the spec says float16
    batch = add_video(store, key, "b", 1, commit=False)
    batch.rows[0]["shard"] = "shards/nowhere.tar"
    batch.shards = []
    store.commit(key, batch)
    kinds = {x["kind"] for x in verify(store, key).problems}
    assert {"bad_targets", "index_points_nowhere"} <= kinds


def test_gc_removes_dead_leftovers_but_not_a_live_writers(store, key, tmp_path):
    add_video(store, key, "a", 1, run_id="20260101000000-live0001")
    kdir = tmp_path / "store" / key
    (kdir / "_tmp" / "20260101000000-dead0001").mkdir(parents=True)
    (kdir / "_tmp" / "20260101000000-dead0001" / "x.tar").write_bytes(b"partial")
    (kdir / "_tmp" / "20260101000000-live0001").mkdir(parents=True, exist_ok=True)
    (kdir / "_tmp" / "20260101000000-live0001" / "y.tar").write_bytes(b"partial")
    (kdir / "shards" / "20260101000000-dead0001-orphan.tar").write_bytes(b"never committed")
    for p in kdir.rglob("*"):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    store.heartbeat(key, "20260101000000-live0001")
    out = gc(store, grace=0)  # raised to the floor: two-hour-old leftovers go, the fresh lease stays
    removed = " ".join(out["removed"])
    assert "dead0001" in removed and "orphan" in removed
    assert (kdir / "_tmp" / "20260101000000-live0001" / "y.tar").exists()
    assert verify(store, key).ok


def test_gc_deletes_a_whole_key_only_on_request(store, key):
    add_video(store, key, "a", 1)
    gc(store, grace=0)
    assert key in store.keys()
    gc(store, grace=0, delete_keys=[key])
    assert key not in store.keys()
    with pytest.raises(KeyNotFound):
        store.open(key)


def test_inspect_reports_counts_and_size(store, key):
    add_video(store, key, "a", 2)
    info = inspect(store, key)
    assert info["counts"]["samples"] == 2 and info["bytes_per_frame"] > 0
    assert info["teacher"]["embed_dim"] == D


def test_readers_split_disjointly_by_rank_and_worker(store, key):
    for i in range(5):
        add_video(store, key, f"v{i}", 2)
    snap = store.open(key)
    everything = {s["sample_key"] for s in iter_samples(store, snap)}
    assert len(everything) == 10
    for world, workers in ((2, 1), (2, 2), (3, 2)):  # 5 shards: shard-level and sample-level splits
        parts = [{s["sample_key"] for s in iter_samples(store, snap, rank=r, world_size=world, worker_id=w,
                                                        num_workers=workers, epoch=1, shuffle_buffer=4)}
                 for r in range(world) for w in range(workers)]
        assert set().union(*parts) == everything
        assert sum(len(p) for p in parts) == len(everything)


def test_heldout_split_is_by_video(store, key):
    for i in range(10):
        add_video(store, key, f"v{i}", 2)
    snap = store.open(key)
    train = list(iter_samples(store, snap, split=SplitFilter("train", 0.3)))
    held = list(iter_samples(store, snap, split=SplitFilter("heldout", 0.3)))
    assert len(train) + len(held) == 20 and held
    assert not {s["video_sha256"] for s in train} & {s["video_sha256"] for s in held}


def test_undecoded_samples_decode_to_the_same_samples_in_the_same_order(store, key):
    for i in range(4):
        add_video(store, key, f"v{i}", 2)
    snap = store.open(key)
    kw = dict(epoch=2, seed=3, shuffle_buffer=3)
    plain = list(iter_samples(store, snap, **kw))
    raw = list(iter_samples(store, snap, decode=False, **kw))
    assert [s["sample_key"] for s in raw] == [s["sample_key"] for s in plain]
    assert "frames" not in raw[0]  # not decoded until asked
    for a, b in zip(plain, map(decode_sample, raw)):
        assert a.keys() == b.keys() and a["labels"] == b["labels"]
        assert np.array_equal(a["frames"], b["frames"]) and np.array_equal(a["targets"], b["targets"])


def test_a_resumed_loader_stream_skips_consumed_samples_without_decoding_them(store, key, monkeypatch):
    import itertools

    from feature_store import reader
    from training.data import StreamPosition, StreamSpec, epoch_stream

    for i in range(4):
        add_video(store, key, f"v{i}", 2)
    spec = StreamSpec(root=store.root, key=key, version=store.latest_version(key), storage_options={}, rank=0,
                      world_size=1, seed=0, shuffle_buffer=4, heldout_fraction=0.0, batch_size=2, image_size=S)
    straight = [s["sample_key"] for s, _, _ in itertools.islice(epoch_stream(spec, 0, 1, StreamPosition()), 8)]
    decoded = []
    real = reader.parse_sample
    monkeypatch.setattr(reader, "parse_sample", lambda raw, enc: (decoded.append(raw["__key__"]), real(raw, enc))[1])
    resumed = [s["sample_key"] for s, _, _ in itertools.islice(epoch_stream(spec, 0, 1, StreamPosition(0, 5)), 3)]
    assert resumed == straight[5:8]
    assert decoded == resumed  # the five consumed samples were read, never decoded


def test_torch_dataset_yields_tensors(store, key):
    import torch

    add_video(store, key, "a", 3)
    ds = torch_dataset(store.root, key, rank=0, world_size=1, shuffle_buffer=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    items = list(loader)
    assert len(items) == 3
    assert items[0]["frames"].shape == (T, S, S, 3) and items[0]["frames"].dtype == torch.uint8
    assert items[0]["targets"].shape == (T, D)


def test_a_local_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert FeatureStore("rel/store").root == str(tmp_path / "rel" / "store")
    assert FeatureStore("s3://bucket/store/").root == "s3://bucket/store"
