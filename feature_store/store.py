"""The feature store: KEYs of cached teacher targets on a local disk or object storage.

Layout of one KEY (ROOT/KEY/), store format 2:
  spec.json                  the FeatureSpec that defines the KEY (immutable, created once)
  shards/<run>-<id>.tar      committed WebDataset shards (immutable; plain `webdataset` and `tar` read them)
  tables/index/              Delta Lake table: one row per sample (INDEX_SCHEMA). Its version IS the KEY version.
  tables/shards/             Delta Lake table: one record per shard (name, count, bytes, sha256, target-stat and
                             fidelity sums), appended before the index commit that references the shard
  tables/failures/           Delta Lake table: the failure ledger, append-only attempts (see ledger.py)
  tables/copies/             Delta Lake table: files whose bytes the index holds under another source
                             (extraction's commit-time dedup; created by the first commit that has one)
  leases/<run>.json          a live writer's (or training run's) heartbeat; its age is judged by the storage's clock
  _tmp/<run>/...             shards being written (local disks only), removed by `gc`

Commit (commit cost = the batch): publish shards (rename / single PUT), append their records to
tables/shards, append failure attempts to tables/failures, then append the batch's index rows to
tables/index: that append is the new KEY version. Each append is one Delta commit (tables.append), which
recognises its own commit after a lost response. A version's manifest, counts and target statistics are
Arrow aggregations over what that version's index references: opening a version costs O(its index) and
never replays history. A shard published but never indexed (a crash in between) is invisible to readers
and removed by `gc` once its writer's lease has expired.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa

from . import fsutil
from .ledger import LEDGER_SCHEMA, cause_of
from .records import (COPIES_SCHEMA, INDEX_SCHEMA, SHARDS_SCHEMA, CommitBatch, Fidelity, KeyNotFound, ShardRecord,  # noqa: F401
                      StoreError, TargetStats, failure_id, new_run_id, rows_table, table_rows, utcnow)
from .snapshot import STORE_FORMAT, Snapshot
from .spec import FeatureSpec, feature_spec_from_dict, to_dict
from .tables import DeltaLocation, append, commit_metadata, delta_storage_options

HEARTBEAT_S = 60.0  # how often a writer refreshes its lease
GRACE_FLOOR_S = 15 * 60.0
LEDGER_REFRESH_S = 30.0  # a version records a ledger version at most this stale (other runs' attempts)  # gc treats no lease or file younger than this as dead, whatever --grace says


@dataclass(frozen=True)
class KeyTables:
    index: DeltaLocation
    shards: DeltaLocation
    failures: DeltaLocation
    copies: DeltaLocation


class FormatError(StoreError):
    pass


class FeatureStore:
    """A store root (local folder or fsspec URL) holding one folder per KEY."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        # A local root is made absolute: Ray workers do not share the driver's working directory.
        self.root = root.rstrip("/") if "://" in root else os.path.abspath(root)
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsutil.url_to_fs(self.root, self.storage_options)
        self._delta_options = delta_storage_options(self.root, self.storage_options)
        self._specs: dict[str, FeatureSpec] = {}
        self._format2: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["storage_options"])

    # -- paths -------------------------------------------------------------------------------------------
    def key_path(self, key: str) -> str:
        return fsutil.join(self.path, key)

    def url(self, key: str, rel: str) -> str:
        """A full URL (with protocol) for a path inside a KEY, for readers that open it themselves."""
        path = fsutil.join(self.key_path(key), rel)
        return path if fsutil.is_local(self.fs) else self.fs.unstrip_protocol(path)

    def tables(self, key: str) -> KeyTables:
        def loc(name: str) -> DeltaLocation:
            rel = f"tables/{name}"
            return DeltaLocation(self.url(key, rel), self._delta_options, self.fs, fsutil.join(self.key_path(key), rel))

        return KeyTables(loc("index"), loc("shards"), loc("failures"), loc("copies"))

    # -- KEYs ----------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        out = []
        for e in fsutil.listdir(self.fs, self.path):
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "directory" and fsutil.exists(self.fs, fsutil.join(self.path, name, "spec.json")):
                out.append(name)
        return sorted(out)

    def has_key(self, key: str) -> bool:
        """One existence check (its spec.json), not a listing of every KEY in the root."""
        return key in self._specs or fsutil.exists(self.fs, fsutil.join(self.key_path(key), "spec.json"))

    def ensure_key(self, spec: FeatureSpec) -> str:
        """Create the KEY (or check the existing one) for writing: probe that the backend's exclusive create is
        exclusive, write spec.json once, create the three tables at version 0."""
        key = spec.key
        fsutil.probe_exclusive_create(self.fs, fsutil.join(self.key_path(key), "_probe"))
        spec_path = fsutil.join(self.key_path(key), "spec.json")
        data = json.dumps(to_dict(spec), indent=2, sort_keys=True).encode()
        if not fsutil.create_exclusive(self.fs, spec_path, data):
            existing = json.loads(fsutil.read_bytes(self.fs, spec_path))
            if feature_spec_from_dict(existing).key != key:
                raise StoreError(f"{spec_path} holds a different spec than its KEY says; the store is damaged")
        self._check_format(key)
        t = self.tables(key)
        t.index.create(INDEX_SCHEMA)
        t.shards.create(SHARDS_SCHEMA)
        t.failures.create(LEDGER_SCHEMA)
        return key

    def spec(self, key: str) -> FeatureSpec:
        """The KEY's spec (immutable, so read once per FeatureStore)."""
        if key in self._specs:
            return self._specs[key]
        path = fsutil.join(self.key_path(key), "spec.json")
        if not fsutil.exists(self.fs, path):
            raise KeyNotFound(f"no KEY {key!r} in {self.root}")
        self._specs[key] = feature_spec_from_dict(json.loads(fsutil.read_bytes(self.fs, path)))
        return self._specs[key]

    def _check_format(self, key: str) -> None:
        if key in self._format2:
            return
        kp = self.key_path(key)
        if self.tables(key).index.exists():
            self._format2.add(key)
        elif fsutil.exists(self.fs, fsutil.join(kp, "snapshots")):
            raise FormatError(f"KEY {key} in {self.root} was written by store format 1 (snapshots/*.json); this "
                              f"version reads format {STORE_FORMAT}. Convert it once with "
                              f"`subsume store upgrade {self.root} {key}` (docs/feature-store.md)")

    # -- versions ------------------------------------------------------------------------------------------
    def versions(self, key: str) -> list[int]:
        """Versions that can be opened (1..latest, less those `gc` expired)."""
        out = []
        for e in fsutil.listdir(self.fs, fsutil.join(self.tables(key).index.path, "_delta_log")):
            name = e["name"].rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) > 0:
                out.append(int(name[:-5]))
        return sorted(out)

    def latest_version(self, key: str) -> int:
        self.spec(key)
        self._check_format(key)
        index = self.tables(key).index
        return index.latest_version() if index.exists() else 0

    def open(self, key: str, version: int | None = None) -> Snapshot:
        """The version `version` of a KEY (default: the latest). Raises KeyNotFound. Costs a few small reads;
        the index is read when a property needs it."""
        spec = self.spec(key)
        latest = self.latest_version(key)
        version = latest if version is None else int(version)
        if version == 0:
            return Snapshot(self, key, 0, spec, {})
        if version < 0 or version > latest:
            raise KeyNotFound(f"KEY {key} has no version {version} (latest is {latest})")
        try:
            commit = commit_metadata(self.tables(key).index, version)
        except FileNotFoundError:
            raise KeyNotFound(f"KEY {key}: version {version} was expired by `store gc` and cannot be opened") from None
        return Snapshot(self, key, version, spec, commit)

    def commit(self, key: str, batch: CommitBatch) -> Snapshot:
        """Publish `batch` as the next version of `key`: shard records, failure ledger, then the index append
        (the version). Each step appends only the batch; concurrent writers' appends all land."""
        t = self.tables(key)
        if batch.metadata_updates:
            from .metadata import apply_metadata_updates

            version = apply_metadata_updates(t.index, batch.metadata_updates, batch.run_id)
            if not (batch.rows or batch.shards or batch.failures or batch.succeeded):
                return self.open(key, version)
        meta = {"run_id": batch.run_id, "rows": str(len(batch.rows))}
        if batch.max_attempts is not None:
            meta["max_attempts"] = str(batch.max_attempts)
        if batch.shards:
            append(t.shards, _shard_rows(batch), {"run_id": batch.run_id})
        if batch.copies:
            t.copies.create(COPIES_SCHEMA)  # a KEY's first duplicate creates the table
            append(t.copies, rows_table([{**c, "run_id": batch.run_id} for c in batch.copies], COPIES_SCHEMA),
                   {"run_id": batch.run_id})
        ledger = _ledger_rows(batch)
        if ledger.num_rows:
            lv = append(t.failures, ledger, {"run_id": batch.run_id, "digest": table_digest(ledger)})
        else:  # the ledger others appended to is looked up at most every LEDGER_REFRESH_S (a listing)
            lv = t.failures.latest_version(max_age_s=LEDGER_REFRESH_S)
        meta["ledger_version"] = str(lv)
        rows = rows_table(batch.rows, INDEX_SCHEMA)
        meta["digest"] = table_digest(rows)
        version = append(t.index, rows, meta)
        if batch.run_id:
            self.heartbeat(key, batch.run_id)
        return Snapshot(self, key, version, self.spec(key), meta)

    # -- writers -------------------------------------------------------------------------------------------
    def heartbeat(self, key: str, run_id: str, pinned_version: int | None = None) -> None:
        """Refresh a run's lease (its age is the object's modification time on the storage's clock). A training
        run passes the version it reads, so `gc` keeps that version openable while the run lives."""
        path = fsutil.join(self.key_path(key), "leases", f"{run_id}.json")
        body = {"run_id": run_id, "pinned_version": pinned_version}
        fsutil.atomic_write(self.fs, path, json.dumps(body).encode())

    def end_lease(self, key: str, run_id: str) -> None:
        path = fsutil.join(self.key_path(key), "leases", f"{run_id}.json")
        if fsutil.exists(self.fs, path):
            self.fs.rm_file(path)

    def storage_now(self, key: str) -> float:
        """The storage's clock: the modification time of an object written now (writers' clocks may drift)."""
        path = fsutil.join(self.key_path(key), "leases", ".clock")
        fsutil.atomic_write(self.fs, path, b"")
        return fsutil.mtime(self.fs, path)

    def leases(self, key: str) -> list[dict[str, Any]]:
        """Every lease with its `age_s` on the storage's clock and the version it pins (if any)."""
        now = self.storage_now(key)
        out = []
        for e in fsutil.listdir(self.fs, fsutil.join(self.key_path(key), "leases")):
            name = e["name"].rsplit("/", 1)[-1]
            if not name.endswith(".json"):
                continue
            try:
                lease = json.loads(fsutil.read_bytes(self.fs, e["name"]))
            except (OSError, ValueError):
                continue
            lease["age_s"] = now - fsutil.entry_mtime(e)
            lease["path"] = e["name"]
            out.append(lease)
        return out

    def live_runs(self, key: str, grace: float) -> set[str]:
        """Runs whose lease is younger than max(grace, GRACE_FLOOR_S) on the storage's clock."""
        grace = max(grace, GRACE_FLOOR_S)
        return {lease["run_id"] for lease in self.leases(key) if lease["age_s"] < grace}

    def write_shard(self, key: str, run_id: str, samples: Iterable[Any]) -> ShardRecord:
        """Write encoded samples (feature_store.shards.EncodedSample) as one shard and publish it atomically."""
        import os
        import tempfile

        import webdataset as wds

        name = f"shards/{run_id}-{uuid.uuid4().hex[:12]}.tar"
        final = fsutil.join(self.key_path(key), name)
        if fsutil.is_local(self.fs):
            tmp_dir = fsutil.join(self.key_path(key), "_tmp", run_id)
            os.makedirs(tmp_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".tar", dir=tmp_dir)
        else:
            fd, tmp = tempfile.mkstemp(suffix=".tar")
        count = 0
        try:
            with os.fdopen(fd, "wb") as f:
                with wds.TarWriter(f, encoder=False, mtime=0) as tw:
                    for s in samples:
                        tw.write(s.tar_dict())
                        count += 1
                f.flush()
                os.fsync(f.fileno())
            size = os.path.getsize(tmp)
            sha = _sha256_file(tmp)
            fsutil.put_file_atomic(self.fs, tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return ShardRecord(name=name, count=count, bytes=size, sha256=sha)

    def delete_key(self, key: str) -> None:
        self.fs.rm(self.key_path(key), recursive=True)
        self._specs.pop(key, None)  # what was cached about it is gone with it
        self._format2.discard(key)



def _shard_rows(batch: CommitBatch) -> pa.Table:
    """Shard records with their own target-stat and fidelity sums. A batch that only has batch-level sums
    books them on its first shard (every version that lists the batch's rows lists that shard)."""
    rows = []
    for i, rec in enumerate(batch.shards):
        st = batch.shard_stats.get(rec.name) or (batch.stats if i == 0 and not batch.shard_stats else TargetStats())
        fi = batch.shard_fidelity.get(rec.name) or (batch.fidelity if i == 0 and not batch.shard_fidelity else Fidelity())
        rows.append({"name": rec.name, "count": rec.count, "bytes": rec.bytes, "sha256": rec.sha256,
                     "run_id": batch.run_id, "stats_n": st.n, "stats_sum": st.sum, "stats_sumsq": st.sumsq,
                     "fid_n": fi.n, "fid_sum": fi.sum_cos, "fid_min": fi.min_cos})
    return rows_table(rows, SHARDS_SCHEMA)


def _ledger_rows(batch: CommitBatch) -> pa.Table:
    """One attempt row per failing video of this batch (a video failing on several segments is one attempt),
    and a `cleared` row per formerly failing video the batch completed (`succeeded`; the writer knows from its
    plan which videos had failed, so the ledger grows with failures, not with the KEY)."""
    at = utcnow(micro=True)
    rows, seen = [], set()
    for f in batch.failures:
        if f["failure_id"] in seen:
            continue
        seen.add(f["failure_id"])
        rows.append({"failure_id": f["failure_id"], "kind": "attempt", "video_sha256": f.get("video_sha256", ""),
                     "source": f.get("source", ""), "stage": f.get("stage", ""), "error": f.get("error", ""),
                     "cause": f.get("cause") or cause_of(f.get("error", ""), f.get("retryable", True)),
                     "message": f.get("message", ""), "judged_by": f.get("judged_by") or batch.judged_by,
                     "run_id": batch.run_id, "at": f.get("at") or at})
    for fid in sorted(set(batch.succeeded) - seen):
        rows.append({"failure_id": fid, "kind": "cleared", "source": "", "run_id": batch.run_id, "at": at})
    return rows_table(rows, LEDGER_SCHEMA)


def table_digest(table: pa.Table) -> str:
    """An order-independent digest of a table's rows: the sum (mod 2^128) of each row's 128-bit BLAKE2b. The
    digest of a version's whole table is then the sum of its commits' digests (verify checks that)."""
    import hashlib

    total = 0
    names = sorted(table.column_names)
    for batch in table.select(names).to_batches(max_chunksize=4096):
        cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for row in zip(*cols):
            h = hashlib.blake2b(repr(row).encode(), digest_size=16).digest()
            total += int.from_bytes(h, "big")
    return f"{total % 2**128:032x}"


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_stream(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()
