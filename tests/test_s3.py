"""The store on a real S3 endpoint: moto's server on 127.0.0.1, reached through s3fs with the standard AWS
environment (AWS_ENDPOINT_URL, keys), as users configure it."""

import threading
import uuid

import pytest

from feature_store.maintenance import gc, verify
from feature_store.reader import iter_samples
from feature_store.store import FeatureStore
from tests.storehelpers import add_video, small_spec


def test_store_round_trip_on_s3(s3_env):
    store = FeatureStore(f"s3://{s3_env}/features")
    key = store.ensure_key(small_spec())
    add_video(store, key, "a", 3, labels={"shape": "circle"})
    snap = add_video(store, key, "b", 2)
    assert store.keys() == [key]
    assert snap.version == 2 and snap.index.num_rows == 5
    assert len(list(iter_samples(store, snap))) == 5
    assert verify(store, key).ok


def test_exclusive_create_is_atomic_on_s3(s3_env):
    from feature_store import fsutil

    store = FeatureStore(f"s3://{s3_env}/x")
    path = fsutil.join(store.path, "once.json")
    assert fsutil.create_exclusive(store.fs, path, b"first")
    assert not fsutil.create_exclusive(store.fs, path, b"second")
    assert fsutil.read_bytes(store.fs, path) == b"first"


def test_concurrent_commits_on_s3_lose_nothing(s3_env):
    store = FeatureStore(f"s3://{s3_env}/features")
    key = store.ensure_key(small_spec())
    batches = [add_video(store, key, f"v{i}", 1, run_id=f"20260101000000-s3run{i:03d}", commit=False)
               for i in range(5)]
    threads = [threading.Thread(target=lambda b=b: FeatureStore(store.root).commit(key, b)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = store.open(key)
    assert snap.version == 5 and snap.index.num_rows == 5


def test_verify_catches_damage_on_s3(s3_env):
    store = FeatureStore(f"s3://{s3_env}/features")
    key = store.ensure_key(small_spec())
    add_video(store, key, "a", 2)
    shard = store.open(key).shards[0].name
    path = f"{store.key_path(key)}/{shard}"
    data = bytearray(store.fs.cat_file(path))
    data[100] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    assert "checksum_mismatch" in {p["kind"] for p in verify(store, key).problems}


def test_gc_on_s3_removes_orphans(s3_env):
    store = FeatureStore(f"s3://{s3_env}/features")
    key = store.ensure_key(small_spec())
    add_video(store, key, "a", 1)
    orphan = f"{store.key_path(key)}/shards/20200101000000-deadbeef-x.tar"
    store.fs.pipe_file(orphan, b"never committed")
    out = gc(store, grace=0, now=store.storage_now(key) + 3600)  # an hour later on the storage's clock
    assert any("deadbeef" in r for r in out["removed"])
    assert verify(store, key).ok
