"""Run records: each extraction run leaves its JSON summary in the KEY, at `runs/<run_id>.json`.

Written once, atomically, at the end of a run (a killed run leaves none; its commits say what it did).
`store gc` leaves the folder alone: one small file per run, not per video.
"""

from __future__ import annotations

import json
from typing import Any

from . import fsutil
from .store import FeatureStore, KeyNotFound

RUNS_DIR = "runs"


def write_run(store: FeatureStore, key: str, run_id: str, summary: dict[str, Any]) -> str:
    """Store one run's summary; returns its path relative to the KEY."""
    rel = f"{RUNS_DIR}/{run_id}.json"
    data = json.dumps(summary, sort_keys=True, default=str).encode()
    fsutil.atomic_write(store.fs, fsutil.join(store.key_path(key), rel), data)
    return rel


def list_runs(store: FeatureStore, key: str) -> list[dict[str, Any]]:
    """The KEY's run summaries, oldest first (run ids start with their UTC time)."""
    if not store.has_key(key):
        raise KeyNotFound(f"no KEY {key} in {store.root}")
    folder = fsutil.join(store.key_path(key), RUNS_DIR)
    entries = sorted(e["name"] for e in fsutil.listdir(store.fs, folder) if e["name"].endswith(".json"))
    return [json.loads(fsutil.read_bytes(store.fs, name)) for name in entries]
