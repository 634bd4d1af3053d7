"""The feature store: KEYs of cached teacher targets on a local disk or object storage.

Layout of one KEY (ROOT/KEY/):
  spec.json                       the FeatureSpec that defines the KEY (immutable, created once)
  shards/<run>-<id>.tar           committed WebDataset shards (immutable)
  snapshots/<NNNNNNNN>.json       snapshot N: the manifest as of commit N (immutable, created exclusively)
  snapshots/<NNNNNNNN>-<t>.index.parquet, ...failures.parquet   the index and failure ledger of snapshot N
  manifest.json, index.parquet, failures.parquet                 copies of the latest snapshot, for people and tools
  _tmp/<run>/...                  shards being written (local disks only), removed by `gc`
  leases/<run>.json               heartbeat of a live writer, so `gc` never deletes what it is still writing

Commit protocol (optimistic): a writer publishes shards first (rename / single PUT: readers never see a
part), then reads the latest snapshot N, merges its shards, index rows and failures into it, writes the merged
index under a name of its own, and creates snapshots/N+1.json *exclusively* (hard link locally; a conditional
PUT with If-None-Match on S3). If another writer created N+1 first, it re-reads and retries. A shard that was
published but never made it into a snapshot (a crash between the two) is invisible to readers and is
recomputed by the next run; `gc` removes it once its writer's lease has expired.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import fsutil
from .spec import FORMAT_VERSION, FeatureSpec, feature_spec_from_dict, to_dict

INDEX_SCHEMA = pa.schema([
    ("sample_key", pa.string()),
    ("video_sha256", pa.string()),
    ("video_id", pa.string()),
    ("source", pa.string()),
    ("segment", pa.int32()),
    ("segments_total", pa.int32()),
    ("frame_indices", pa.list_(pa.int64())),
    ("timestamps", pa.list_(pa.float64())),
    ("labels", pa.map_(pa.string(), pa.string())),
    ("shard", pa.string()),
    ("num_frames", pa.int32()),
    ("decoder", pa.string()),
    ("video_size", pa.int64()),
    ("video_mtime", pa.float64()),
])

FAILURES_SCHEMA = pa.schema([
    ("failure_id", pa.string()),
    ("video_sha256", pa.string()),
    ("source", pa.string()),
    ("stage", pa.string()),
    ("error", pa.string()),
    ("message", pa.string()),
    ("attempts", pa.int32()),
    ("retryable", pa.bool_()),
    ("last_attempt", pa.string()),
])


class StoreError(Exception):
    pass


class KeyNotFound(StoreError):
    pass


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"


def failure_id(video_sha256: str, source: str) -> str:
    """Failures are keyed by content hash where the bytes were readable, by source otherwise."""
    return f"sha:{video_sha256}" if video_sha256 else f"src:{source}"


@dataclass
class ShardRecord:
    name: str  # relative to the KEY folder, e.g. "shards/20261127-ab12cd34-0f3e.tar"
    count: int
    bytes: int
    sha256: str


@dataclass
class TargetStats:
    """Running per-dimension sums of the stored targets (float64), merged across shards and commits."""

    n: int = 0
    sum: list[float] = field(default_factory=list)
    sumsq: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, targets: np.ndarray) -> "TargetStats":
        t = targets.reshape(-1, targets.shape[-1]).astype(np.float64)
        return cls(n=int(t.shape[0]), sum=t.sum(0).tolist(), sumsq=(t * t).sum(0).tolist())

    def merge(self, other: "TargetStats") -> "TargetStats":
        if not other.n:
            return self
        if not self.n:
            return other
        return TargetStats(self.n + other.n, (np.add(self.sum, other.sum)).tolist(),
                           (np.add(self.sumsq, other.sumsq)).tolist())

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.sum) / max(self.n, 1)
        var = np.asarray(self.sumsq) / max(self.n, 1) - mean * mean
        return mean, np.sqrt(np.maximum(var, 1e-12))


@dataclass
class Fidelity:
    """Cosine similarity of stored targets to the float32 teacher output (raw and centred)."""

    n: int = 0
    sum_cos: float = 0.0
    min_cos: float = 1.0

    def merge(self, other: "Fidelity") -> "Fidelity":
        return Fidelity(self.n + other.n, self.sum_cos + other.sum_cos, min(self.min_cos, other.min_cos))

    def summary(self) -> dict[str, Any]:
        return {"frames": self.n, "mean_cos": (self.sum_cos / self.n) if self.n else None,
                "min_cos": self.min_cos if self.n else None}


@dataclass
class CommitBatch:
    """What a writer adds in one commit."""

    shards: list[ShardRecord] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # index rows, INDEX_SCHEMA
    failures: list[dict[str, Any]] = field(default_factory=list)  # failed attempts of this run
    succeeded: list[str] = field(default_factory=list)  # failure ids to clear (videos now extracted)
    metadata_updates: list[dict[str, Any]] = field(default_factory=list)  # video_sha256, source, video_id, labels, video_size, video_mtime
    stats: TargetStats = field(default_factory=TargetStats)
    fidelity: Fidelity = field(default_factory=Fidelity)
    run_id: str = ""

    def empty(self) -> bool:
        return not (self.shards or self.rows or self.failures or self.succeeded or self.metadata_updates)


@dataclass
class Snapshot:
    """An immutable view of a KEY at one commit."""

    key: str
    version: int
    manifest: dict[str, Any]
    index: pa.Table
    failures: pa.Table

    @property
    def spec(self) -> FeatureSpec:
        return feature_spec_from_dict(self.manifest["spec"])

    @property
    def shards(self) -> list[ShardRecord]:
        return [ShardRecord(**s) for s in self.manifest.get("shards", [])]

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def target_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        return TargetStats(**self.manifest["target_stats"]).mean_std()


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    if not rows:
        return schema.empty_table()
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    # map columns take lists of (k, v) pairs
    for f in schema:
        if pa.types.is_map(f.type):
            cols[f.name] = [sorted((v or {}).items()) for v in cols[f.name]]
    return pa.table(cols, schema=schema)


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for f in table.schema:
        if pa.types.is_map(f.type):
            for r in rows:
                r[f.name] = dict(r[f.name] or [])
    return rows


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def merge_commit(prev: Snapshot | None, spec: FeatureSpec, batch: CommitBatch, version: int) -> tuple[dict, pa.Table, pa.Table]:
    """Pure: the manifest, index and failures of snapshot `version` = `prev` + `batch`."""
    prev_rows = table_rows(prev.index) if prev else []
    prev_fail = table_rows(prev.failures) if prev else []
    prev_manifest = prev.manifest if prev else {}

    # Index: first writer of a sample key wins (a concurrent duplicate's copy stays unreferenced in its shard).
    seen = {r["sample_key"] for r in prev_rows}
    rows = list(prev_rows)
    for r in batch.rows:
        if r["sample_key"] not in seen:
            seen.add(r["sample_key"])
            rows.append(r)
    # Renamed/moved videos: update metadata, never targets.
    updates = {u["video_sha256"]: u for u in batch.metadata_updates}
    if updates:
        for r in rows:
            u = updates.get(r["video_sha256"])
            if u:
                for k in ("source", "video_id", "labels", "video_size", "video_mtime"):
                    if k in u:
                        r[k] = u[k]

    # Failure ledger: attempts accumulate per video; a success clears it.
    failures = {f["failure_id"]: f for f in prev_fail}
    for f in batch.failures:
        old = failures.get(f["failure_id"])
        f = dict(f)
        f["attempts"] = (old["attempts"] if old else 0) + 1
        failures[f["failure_id"]] = f
    done_shas = {r["video_sha256"] for r in batch.rows}
    for fid in list(failures):
        if fid in batch.succeeded or failures[fid]["video_sha256"] in done_shas:
            del failures[fid]

    shards = list(prev_manifest.get("shards", []))
    known = {s["name"] for s in shards}
    shards += [asdict(s) for s in batch.shards if s.name not in known]
    stats = TargetStats(**prev_manifest.get("target_stats", {})).merge(batch.stats)
    fid_prev = prev_manifest.get("fidelity_sums", {})
    fidelity = Fidelity(**fid_prev).merge(batch.fidelity) if fid_prev else batch.fidelity

    index = _table(rows, INDEX_SCHEMA)
    fail_table = _table(list(failures.values()), FAILURES_SCHEMA)
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": spec.key,
        "version": version,
        "parent": prev.version if prev else 0,
        "created_at": utcnow(),
        "run_id": batch.run_id,
        "status": "ok",
        "spec": to_dict(spec),
        "teacher": {
            "model": spec.teacher.model, "revision": spec.teacher.revision, "class": spec.teacher_class,
            "weights_sha256": spec.teacher_fingerprint, "output_used": spec.output_used,
            "embed_dim": spec.embed_dim, "dtype": spec.storage.target_dtype, "patch_grid": spec.teacher.patch_grid,
        },
        "preprocessing": to_dict(spec.preprocess),
        "sampling": to_dict(spec.sampling),
        "counts": {
            "samples": index.num_rows,
            "frames": index.num_rows * spec.sampling.segment_frames,
            "videos": len(set(index.column("video_sha256").to_pylist())) if index.num_rows else 0,
            "shards": len(shards),
            "bytes": int(sum(s["bytes"] for s in shards)),
            "failed_videos": fail_table.num_rows,
        },
        "shards": shards,
        "target_stats": asdict(stats),
        "fidelity_sums": asdict(fidelity),
        "fidelity": fidelity.summary(),
    }
    return manifest, index, fail_table


class FeatureStore:
    """A store root (local folder or fsspec URL) holding one folder per KEY."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        # A local root is made absolute: Ray workers do not share the driver's working directory.
        self.root = root.rstrip("/") if "://" in root else os.path.abspath(root)
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsutil.url_to_fs(self.root, self.storage_options)

    # -- paths -------------------------------------------------------------------------------------------
    def key_path(self, key: str) -> str:
        return fsutil.join(self.path, key)

    def url(self, key: str, rel: str) -> str:
        """A full URL (with protocol) for a path inside a KEY, for readers that open it themselves."""
        path = fsutil.join(self.key_path(key), rel)
        return path if fsutil.is_local(self.fs) else self.fs.unstrip_protocol(path)

    # -- KEYs ----------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        out = []
        for e in fsutil.listdir(self.fs, self.path):
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "directory" and fsutil.exists(self.fs, fsutil.join(self.path, name, "spec.json")):
                out.append(name)
        return sorted(out)

    def ensure_key(self, spec: FeatureSpec) -> str:
        key = spec.key
        spec_path = fsutil.join(self.key_path(key), "spec.json")
        data = json.dumps(to_dict(spec), indent=2, sort_keys=True).encode()
        if not fsutil.create_exclusive(self.fs, spec_path, data):
            existing = json.loads(fsutil.read_bytes(self.fs, spec_path))
            if feature_spec_from_dict(existing).key != key:
                raise StoreError(f"{spec_path} holds a different spec than its KEY says; the store is damaged")
        return key

    def spec(self, key: str) -> FeatureSpec:
        path = fsutil.join(self.key_path(key), "spec.json")
        if not fsutil.exists(self.fs, path):
            raise KeyNotFound(f"no KEY {key!r} in {self.root}")
        return feature_spec_from_dict(json.loads(fsutil.read_bytes(self.fs, path)))

    # -- snapshots -----------------------------------------------------------------------------------------
    def versions(self, key: str) -> list[int]:
        out = []
        for e in fsutil.listdir(self.fs, fsutil.join(self.key_path(key), "snapshots")):
            name = e["name"].rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                out.append(int(name[:-5]))
        return sorted(out)

    def latest_version(self, key: str) -> int:
        v = self.versions(key)
        return v[-1] if v else 0

    def _snapshot_json(self, key: str, version: int) -> str:
        return fsutil.join(self.key_path(key), "snapshots", f"{version:08d}.json")

    def open(self, key: str, version: int | None = None) -> Snapshot:
        """The snapshot `version` of a KEY (default: the latest). Raises KeyNotFound."""
        spec = self.spec(key)
        version = self.latest_version(key) if version is None else version
        if version == 0:
            return Snapshot(key, 0, {"spec": to_dict(spec), "shards": [], "counts": {"samples": 0},
                                     "target_stats": asdict(TargetStats())},
                            INDEX_SCHEMA.empty_table(), FAILURES_SCHEMA.empty_table())
        path = self._snapshot_json(key, version)
        if not fsutil.exists(self.fs, path):
            raise KeyNotFound(f"KEY {key} has no snapshot {version}")
        manifest = json.loads(fsutil.read_bytes(self.fs, path))
        kp = self.key_path(key)
        index = pq.read_table(io.BytesIO(fsutil.read_bytes(self.fs, fsutil.join(kp, manifest["index_file"]))))
        failures = pq.read_table(io.BytesIO(fsutil.read_bytes(self.fs, fsutil.join(kp, manifest["failures_file"]))))
        return Snapshot(key, version, manifest, index.cast(INDEX_SCHEMA), failures.cast(FAILURES_SCHEMA))

    def commit(self, key: str, batch: CommitBatch, *, max_retries: int = 50) -> Snapshot:
        """Publish `batch` as the next snapshot of `key` (optimistic concurrency, retried on conflict)."""
        spec = self.spec(key)
        kp = self.key_path(key)
        for attempt in range(max_retries):
            latest = self.latest_version(key)
            prev = self.open(key, latest) if latest else None
            version = latest + 1
            manifest, index, failures = merge_commit(prev, spec, batch, version)
            token = uuid.uuid4().hex[:8]
            manifest["index_file"] = f"snapshots/{version:08d}-{token}.index.parquet"
            manifest["failures_file"] = f"snapshots/{version:08d}-{token}.failures.parquet"
            index_bytes, failures_bytes = _parquet_bytes(index), _parquet_bytes(failures)
            fsutil.atomic_write(self.fs, fsutil.join(kp, manifest["index_file"]), index_bytes)
            fsutil.atomic_write(self.fs, fsutil.join(kp, manifest["failures_file"]), failures_bytes)
            body = json.dumps(manifest, indent=1, sort_keys=True).encode()
            if fsutil.create_exclusive(self.fs, self._snapshot_json(key, version), body):
                snap = Snapshot(key, version, manifest, index, failures)
                self._publish_latest(key, snap, body, index_bytes, failures_bytes)
                if batch.run_id:
                    self.heartbeat(key, batch.run_id)
                return snap
            # Lost the race: drop our copies and merge again on top of the winner.
            for rel in (manifest["index_file"], manifest["failures_file"]):
                self.fs.rm_file(fsutil.join(kp, rel))
            time.sleep(min(0.05 * (attempt + 1), 1.0))
        raise StoreError(f"could not commit to {key} after {max_retries} attempts (heavy contention?)")

    def _publish_latest(self, key: str, snap: Snapshot, body: bytes, index_bytes: bytes, failures_bytes: bytes) -> None:
        """Refresh the convenience copies, unless a newer snapshot already exists (its writer does it)."""
        if self.latest_version(key) != snap.version:
            return
        kp = self.key_path(key)
        fsutil.atomic_write(self.fs, fsutil.join(kp, "index.parquet"), index_bytes)
        fsutil.atomic_write(self.fs, fsutil.join(kp, "failures.parquet"), failures_bytes)
        fsutil.atomic_write(self.fs, fsutil.join(kp, "manifest.json"), body)

    # -- writers -------------------------------------------------------------------------------------------
    def heartbeat(self, key: str, run_id: str) -> None:
        path = fsutil.join(self.key_path(key), "leases", f"{run_id}.json")
        fsutil.atomic_write(self.fs, path, json.dumps({"run_id": run_id, "at": time.time()}).encode())

    def end_lease(self, key: str, run_id: str) -> None:
        path = fsutil.join(self.key_path(key), "leases", f"{run_id}.json")
        if fsutil.exists(self.fs, path):
            self.fs.rm_file(path)

    def live_runs(self, key: str, grace: float) -> set[str]:
        live = set()
        now = time.time()
        for e in fsutil.listdir(self.fs, fsutil.join(self.key_path(key), "leases")):
            try:
                lease = json.loads(fsutil.read_bytes(self.fs, e["name"]))
            except (OSError, ValueError):
                continue
            if now - float(lease.get("at", 0)) < grace:
                live.add(lease["run_id"])
        return live

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
