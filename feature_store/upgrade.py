"""`subsume store upgrade ROOT KEY`: convert a KEY written by store format 1 (snapshots/*.json + Parquet copies)
into format 2 once. The latest format-1 snapshot becomes version 1; its shards stay where they are. Older
format-1 snapshots are not carried over (their files stay until deleted by hand)."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq

from . import fsutil
from .records import CommitBatch, Fidelity, ShardRecord, TargetStats, table_rows
from .store import FeatureStore


def _latest_format1(store: FeatureStore, key: str) -> tuple[int, dict[str, Any]]:
    folder = fsutil.join(store.key_path(key), "snapshots")
    versions = sorted(int(e["name"].rsplit("/", 1)[-1][:-5]) for e in fsutil.listdir(store.fs, folder)
                      if e["name"].endswith(".json") and e["name"].rsplit("/", 1)[-1][:-5].isdigit())
    if not versions:
        raise FileNotFoundError(f"{store.root}/{key} has no format-1 snapshots to upgrade")
    path = fsutil.join(folder, f"{versions[-1]:08d}.json")
    return versions[-1], json.loads(fsutil.read_bytes(store.fs, path))


def _parquet(store: FeatureStore, key: str, rel: str):
    return pq.read_table(io.BytesIO(fsutil.read_bytes(store.fs, fsutil.join(store.key_path(key), rel))))


def upgrade_format1(store: FeatureStore, key: str) -> dict[str, Any]:
    spec = store.spec(key)
    if store.tables(key).index.exists():
        raise ValueError(f"{key} is already in store format 2")
    number, manifest = _latest_format1(store, key)
    # ensure_key refuses format-1 KEYs; the tables are created here
    from .ledger import LEDGER_SCHEMA
    from .records import INDEX_SCHEMA, SHARDS_SCHEMA

    fsutil.probe_exclusive_create(store.fs, fsutil.join(store.key_path(key), "_probe"))
    t = store.tables(key)
    t.index.create(INDEX_SCHEMA)
    t.shards.create(SHARDS_SCHEMA)
    t.failures.create(LEDGER_SCHEMA)
    rows = table_rows(_parquet(store, key, manifest["index_file"]))  # format 1 KEYs are small enough
    failures = table_rows(_parquet(store, key, manifest["failures_file"]))
    batch = CommitBatch(shards=[ShardRecord(**s) for s in manifest.get("shards", [])], rows=rows,
                        stats=TargetStats(**manifest.get("target_stats", {})),
                        fidelity=Fidelity(**manifest.get("fidelity_sums", {})) if manifest.get("fidelity_sums") else Fidelity(),
                        run_id=f"upgrade-format1-{number}", max_attempts=manifest.get("max_attempts"))
    for f in failures:  # attempts become that many runs' attempts
        for i in range(int(f.get("attempts") or 1)):
            batch.failures.append({**f, "at": f"{f.get('last_attempt', '')}#{i}"})
    snap = _commit_attempts(store, key, batch)
    return {"key": key, "from_snapshot": number, "version": snap.version, "samples": snap.manifest["counts"]["samples"],
            "shards": snap.manifest["counts"]["shards"], "spec_key": spec.key}


def _commit_attempts(store: FeatureStore, key: str, batch: CommitBatch):
    """Format 1 counted attempts; the ledger counts runs: one synthetic run per past attempt."""
    by_attempt: dict[int, list[dict[str, Any]]] = {}
    seen: dict[str, int] = {}
    for f in batch.failures:
        n = seen.get(f["failure_id"], 0)
        seen[f["failure_id"]] = n + 1
        by_attempt.setdefault(n, []).append(f)
    batch.failures = by_attempt.pop(0, [])
    for n, fails in sorted(by_attempt.items()):
        store.commit(key, CommitBatch(failures=fails, run_id=f"{batch.run_id}-attempt{n}"))
    return store.commit(key, batch)
