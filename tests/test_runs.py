"""Run records in a KEY (feature_store.runs) and `subsume store runs`."""

from __future__ import annotations

import json

import pytest

from feature_store.runs import list_runs, write_run
from feature_store.store import FeatureStore, KeyNotFound
from tests.conftest import run_cli
from tests.storehelpers import small_spec


def test_runs_are_written_into_the_key_and_listed_oldest_first(tmp_path):
    store = FeatureStore(str(tmp_path / "s"))
    key = store.ensure_key(small_spec())
    assert list_runs(store, key) == []
    write_run(store, key, "20261130120000-bbbbbbbb", {"run_id": "20261130120000-bbbbbbbb", "videos_ok": 2})
    rel = write_run(store, key, "20261130110000-aaaaaaaa", {"run_id": "20261130110000-aaaaaaaa", "videos_ok": 1,
                                                             "failures_by_reason": {"corrupt": 1}})
    assert rel == "runs/20261130110000-aaaaaaaa.json"
    assert json.loads((tmp_path / "s" / key / rel).read_text())["videos_ok"] == 1
    assert [r["run_id"] for r in list_runs(store, key)] == ["20261130110000-aaaaaaaa", "20261130120000-bbbbbbbb"]
    with pytest.raises(KeyNotFound):
        list_runs(store, "nope")
    rc, out, _ = run_cli(["store", "runs", str(tmp_path / "s"), key, "--json"])
    assert [r["videos_ok"] for r in out["runs"]] == [1, 2]
    rc, _, err = run_cli(["store", "runs", str(tmp_path / "s"), "nope"], check=False)
    assert rc != 0 and "nope" in err
