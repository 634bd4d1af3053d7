"""Nothing committed is ever lost: lost commit responses, gc beside a live writer, backends whose exclusive create
is not exclusive, names that are not UTF-8, format-1 KEYs, and verify's checks."""

import json
import os
import time

import fsspec
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

from feature_store import fsutil, tables
from feature_store.maintenance import failures_report, gc, verify
from feature_store.reader import iter_samples
from feature_store.store import FeatureStore, FormatError, failure_id, table_rows
from tests.storehelpers import add_video, key, make_samples, small_spec, store  # noqa: F401 (fixtures)




def _all_keys(store, key):
    return sorted(s["sample_key"] for s in iter_samples(store, store.open(key)))


def test_a_commit_whose_response_was_lost_is_recognised_not_repeated_or_undone(store, key, monkeypatch):
    add_video(store, key, "a", 2)
    real = tables._write_deltalake
    calls = []

    def lands_then_raises(table, data, **kw):  # the log entry is written, the caller hears an error (S3 412 on retry)
        calls.append(1)
        real(table, data, **kw)
        raise OSError("connection reset while reading the response")

    monkeypatch.setattr(tables, "_write_deltalake", lands_then_raises)
    batch = add_video(store, key, "b", 3, run_id="20260101000000-lost0001", commit=False)
    snap = store.commit(key, batch)
    monkeypatch.setattr(tables, "_write_deltalake", real)
    assert len(calls) == 2  # shard records and index, each written once: recognised, not retried
    assert snap.version == 2 and store.latest_version(key) == 2
    assert snap.index.num_rows == 5 and snap.duplicates.num_rows == 0
    assert len(_all_keys(store, key)) == 5
    assert verify(store, key).ok


def test_a_commit_that_did_not_land_is_retried(store, key, monkeypatch):
    real = tables._write_deltalake
    failed = []

    def fails_once(table, data, **kw):
        if not failed:
            failed.append(1)
            raise OSError("503 slow down")
        real(table, data, **kw)

    monkeypatch.setattr(tables, "_write_deltalake", fails_once)
    snap = add_video(store, key, "a", 2)
    assert snap.version == 1 and snap.index.num_rows == 2 and verify(store, key).ok


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_gc_grace_zero_beside_a_live_writer_loses_nothing(store, key, tmp_path):
    run = "20260101000000-live0002"
    add_video(store, key, "a", 2, run_id=run)
    store.heartbeat(key, run)
    # the writer has published a shard it has not committed yet, and it is old (a slow teacher)
    pending = add_video(store, key, "b", 2, run_id=run, commit=False)
    shard = tmp_path / "store" / key / pending.shards[0].name
    _age(shard, 7200)
    out = gc(store, grace=0)
    assert out["grace_s"] >= 15 * 60 and shard.exists()
    store.commit(key, pending)
    assert len(_all_keys(store, key)) == 4 and verify(store, key).ok


def test_lease_age_is_judged_on_the_storages_clock(store, key, tmp_path, monkeypatch):
    run = "20260101000000-live0003"
    store.heartbeat(key, run)
    pending = add_video(store, key, "b", 2, run_id=run, commit=False)
    _age(tmp_path / "store" / key / pending.shards[0].name, 7200)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)  # gc's host clock runs two hours ahead
    gc(store, grace=0)
    monkeypatch.setattr(time, "time", real)
    store.commit(key, pending)
    assert verify(store, key).ok and len(_all_keys(store, key)) == 2


def test_gc_removes_an_expired_writers_orphans(store, key, tmp_path):
    run = "20260101000000-dead0003"
    store.heartbeat(key, run)
    orphan = add_video(store, key, "b", 2, run_id=run, commit=False).shards[0].name
    kdir = tmp_path / "store" / key
    _age(kdir / orphan, 7200)
    _age(kdir / "leases" / f"{run}.json", 7200)
    out = gc(store, grace=0)
    assert not (kdir / orphan).exists() and any(run in r for r in out["removed"])


class ExistsThenWrite(MemoryFileSystem):
    protocol = "existsthenwrite"
    pipe_file = AbstractFileSystem.pipe_file  # fsspec's default: check, then write (two writers both pass)


class Overwrites(MemoryFileSystem):
    protocol = "overwrites"

    def pipe_file(self, path, value, mode="overwrite", **kw):  # ignores mode="create"
        return super().pipe_file(path, value, mode="overwrite", **kw)


@pytest.mark.parametrize("cls", [ExistsThenWrite, Overwrites])
def test_a_backend_without_exclusive_create_is_refused_when_opened_for_writing(cls):
    fsspec.register_implementation(cls.protocol, cls, clobber=True)
    store = FeatureStore(f"{cls.protocol}://bucket/store")
    with pytest.raises(fsutil.NotExclusive, match=cls.__name__):
        store.ensure_key(small_spec())


def test_names_that_are_not_utf8_are_recorded_losslessly(store, key):
    bad = "/videos/caf\udce9.mp4"  # latin-1 bytes in a UTF-8 world, as os.listdir hands them over
    batch = add_video(store, key, "a", 2, commit=False)
    for r in batch.rows:
        r["source"] = bad
    batch.failures.append({"failure_id": failure_id("", bad), "video_sha256": "", "source": bad, "stage": "read",
                           "error": "missing", "message": "gone", "retryable": False})
    store.commit(key, batch)
    snap = add_video(store, key, "b", 1)  # later commits keep working
    assert {r["source"] for r in table_rows(snap.index)} == {bad, "/videos/b.mp4"}
    assert [r["source"] for r in failures_report(store, key)] == [bad]


def test_verify_reports_index_rows_that_disagree_with_the_samples(store, key):
    batch = add_video(store, key, "a", 2, commit=False)
    batch.rows[0]["segment"] = 7
    store.commit(key, batch)
    kinds = {p["kind"] for p in verify(store, key).problems}
    assert "index_disagrees" in kinds


def test_verify_catches_an_index_changed_behind_the_stores_back(store, key):
    from deltalake import write_deltalake

    add_video(store, key, "a", 2)
    loc = store.tables(key).index
    extra = loc.open().to_pyarrow_table().slice(0, 1)
    write_deltalake(loc.uri, extra, mode="append")  # not through a store commit: no digest recorded
    kinds = {p["kind"] for p in verify(store, key).problems}
    assert "index_checksum_mismatch" in kinds


def test_verify_reports_a_missing_index_instead_of_crashing(store, key, tmp_path):
    import shutil

    add_video(store, key, "a", 2)
    shutil.rmtree(tmp_path / "store" / key / "tables" / "index")
    rep = verify(store, key)
    assert not rep.ok and rep.problems[0]["kind"] == "missing_index"


def test_verify_sample_checks_a_fraction_of_the_shards(store, key):
    for i in range(10):
        add_video(store, key, f"v{i}", 1)
    rep = verify(store, key, sample=0.3)
    assert rep.ok and rep.shards_checked == 3


def _format1_key(root, spec):
    """A KEY as store format 1 wrote it: snapshots/N.json naming Parquet copies of the index and ledger."""
    import pyarrow as pa

    store = FeatureStore(root)
    kdir = os.path.join(root, spec.key)
    os.makedirs(os.path.join(kdir, "snapshots"))
    with open(os.path.join(kdir, "spec.json"), "w") as f:
        from feature_store.spec import to_dict

        json.dump(to_dict(spec), f)
    samples, rows = make_samples("old", 3, spec=spec)
    rec = store.write_shard(spec.key, "20250101000000-format01", samples)
    for r in rows:
        r["shard"] = rec.name
    pq.write_table(pa.Table.from_pylist([{**r, "labels": list(r["labels"].items())} for r in rows]),
                   os.path.join(kdir, "snapshots", "00000001-x.index.parquet"))
    fails = [{"failure_id": "src:/v/bad.mp4", "video_sha256": "", "source": "/v/bad.mp4", "stage": "read",
              "error": "timeout", "message": "slow", "attempts": 2, "retryable": True, "last_attempt": "2025"}]
    pq.write_table(pa.Table.from_pylist(fails), os.path.join(kdir, "snapshots", "00000001-x.failures.parquet"))
    manifest = {"version": 1, "index_file": "snapshots/00000001-x.index.parquet",
                "failures_file": "snapshots/00000001-x.failures.parquet",
                "shards": [rec.__dict__], "target_stats": {"n": 0, "sum": [], "sumsq": []}}
    with open(os.path.join(kdir, "snapshots", "00000001.json"), "w") as f:
        json.dump(manifest, f)
    return store


def test_format1_keys_are_refused_with_a_message_then_upgraded(tmp_path):
    from feature_store.upgrade import upgrade_format1

    spec = small_spec()
    store = _format1_key(str(tmp_path / "old"), spec)
    with pytest.raises(FormatError, match="store upgrade"):
        store.open(spec.key)
    out = upgrade_format1(store, spec.key)
    snap = store.open(spec.key)
    assert out["samples"] == 3 and snap.index.num_rows == 3
    assert len(list(iter_samples(store, snap))) == 3
    assert snap.failures.to_pylist()[0]["attempts"] == 2
    assert verify(store, spec.key).ok


def test_opening_a_version_reads_only_its_commit_not_the_history(store, key, monkeypatch):
    for i in range(5):
        add_video(store, key, f"v{i}", 1)
    read = []
    real = fsutil.read_bytes
    monkeypatch.setattr(fsutil, "read_bytes", lambda fs, p: (read.append(p), real(fs, p))[1])
    snap = store.open(key, 3)
    logs = [p for p in read if "_delta_log" in p]
    assert logs == [logs[0]] and logs[0].endswith(f"{3:020d}.json")
    assert snap.index.num_rows == 3


def test_a_training_run_pins_its_version_against_retention(store, key):
    from feature_store.retention import Retention, retained_versions

    for i in range(4):
        add_video(store, key, f"v{i}", 1)
    store.heartbeat(key, "20260101000000-train001", pinned_version=2)
    leases = store.leases(key)
    pinned = {lz["pinned_version"] for lz in leases}
    assert retained_versions(store, key, Retention(keep_last=1), pinned) == [2, 4]
    assert retained_versions(store, key, Retention(keep=(1,), keep_last=2), set()) == [1, 3, 4]


@pytest.mark.ray
def test_verify_as_a_ray_job_finds_what_the_local_verify_finds(store, key, tmp_path, ray_session):
    for i in range(3):
        add_video(store, key, f"v{i}", 2)
    assert verify(store, key, on_ray=True).ok
    p = tmp_path / "store" / key / store.open(key).shards[1].name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    local, distributed = verify(store, key), verify(store, key, on_ray=True)
    assert distributed.shards_checked == 3 and not distributed.ok
    assert sorted(x["kind"] for x in distributed.problems) == sorted(x["kind"] for x in local.problems)


def test_store_verify_on_a_key_that_is_not_there_is_a_usage_error(store, key):
    from tests.conftest import run_cli

    add_video(store, key, "a", 1)
    rc, _, err = run_cli(["store", "verify", store.root, "fk-not-there", "--json"], check=False)
    assert rc == 2 and "no KEY 'fk-not-there'" in err
