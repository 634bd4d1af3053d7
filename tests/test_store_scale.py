"""The store_scale benchmark's parts on a small KEY: the bulk-built KEY is a valid store, the timed commit is a
real commit, planning against it plans only the new videos."""

from benchmarks import store_scale
from feature_store.store import FeatureStore


def test_bulk_built_key_takes_real_commits_and_plans(tmp_path):
    root = str(tmp_path / "store")
    key = store_scale.build_key(root, 1000, 128)
    snap = FeatureStore(root).open(key)
    assert snap.manifest["counts"]["samples"] == 1000 and snap.manifest["counts"]["videos"] == 500
    assert len(snap.shard_names()) == 1000 // store_scale.SAMPLES_PER_SHARD + 1
    res = store_scale.child(root, key, 1000, 128, 2)
    assert len(res["commit_s"]) == 2 and res["peak_rss_kib"] > 0
    after = FeatureStore(root).open(key)
    assert after.version == snap.version + 2 and after.manifest["counts"]["samples"] == 1256
    planned = store_scale.open_and_plan(root, key, 50)
    assert planned["planned_to_compute"] == 50 and planned["samples"] == 1256
