"""Inspect, verify and clean a KEY. Verify re-reads every byte; gc never touches what a live writer owns."""

from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import fsutil
from .records import ShardRecord, StoreError
from .shards import FRAMES_EXT, META_EXT, PATCHES_EXT, TARGETS_EXT, decode_frames, npy_load
from .ledger import Verdict, decide, judge_version
from .records import table_rows
from .retention import Retention, expire_versions
from .store import GRACE_FLOOR_S, FeatureStore, sha256_stream

DEFAULT_MAX_ATTEMPTS = 3
from .tables import commit_metadata


@dataclass
class VerifyReport:
    key: str
    version: int
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, where: str, detail: str) -> None:
        self.problems.append({"kind": kind, "where": where, "detail": detail})


def verify(store: FeatureStore, key: str, version: int | None = None, *, sample: float = 1.0,
           seed: int = 0, on_ray: bool = False) -> VerifyReport:
    """Check a version: spec and KEY agree; the index and ledger digests equal the sum of their commits'
    recorded digests; every shard's size and sha256 against its record; every sample's arrays against the
    spec; every index row against the sample's own JSON. `sample` < 1 checks that fraction of shards."""
    store.spec(key)  # no KEY at all is the caller's mistake (KeyNotFound), not a finding about a KEY
    try:
        if not store.tables(key).index.exists():
            raise FileNotFoundError(f"{store.tables(key).index.uri} is not a Delta table")
        snap = store.open(key, version)
    except (StoreError, OSError, ValueError) as e:  # a missing or unreadable index is a finding, not a crash
        rep = VerifyReport(key=key, version=version or 0)
        rep.add("missing_index", key, f"{type(e).__name__}: {e}")
        return rep
    rep = VerifyReport(key=key, version=snap.version)
    if snap.spec.key != key:
        rep.add("spec_mismatch", "spec.json", f"spec.json defines KEY {snap.spec.key}, stored under {key}")
    if snap.version == 0:
        return rep
    try:
        _check_digests(store, snap, rep)
        rows = snap.index_columns(["sample_key", "shard", "video_sha256", "segment"])
    except (OSError, ValueError) as e:
        rep.add("missing_index", key, f"{type(e).__name__}: {e}")
        return rep
    if snap.duplicates.num_rows:
        rep.notes.append(f"{snap.duplicates.num_rows} samples committed twice by concurrent writers; readers "
                         f"take the copy in the shard that sorts first")
    records = {r["name"]: r for r in snap.shard_table.select(["name", "count", "bytes", "sha256"]).to_pylist()}
    for shard in sorted(set(snap.shard_names()) - set(records)):
        rep.add("index_points_nowhere", shard, "index rows name a shard that has no shard record")
    names = sorted(records)
    if sample < 1.0:
        names = sorted(random.Random(seed).sample(names, max(1, round(len(names) * sample)))) if names else []
    rows = rows.sort_by([("shard", "ascending")])
    if on_ray:
        _verify_shards_on_ray(snap, [(records[n], _slice_of(rows, n)) for n in names], rep)
        return rep
    for name in names:
        _verify_shard(store, snap, ShardRecord(**records[name]), _rows_of(_slice_of(rows, name)), rep)
    return rep


def _verify_shards_on_ray(snap, work: list[tuple[dict[str, Any], pa.Table]], rep: VerifyReport) -> None:
    """Each shard re-read and checked by a Ray task (a large KEY's shards are read where the cluster is);
    a task gets its shard's record and index rows as an Arrow slice."""
    import ray

    @ray.remote(num_cpus=0.5)
    def check(record: dict[str, Any], rows: pa.Table) -> VerifyReport:
        part = VerifyReport(key=snap.key, version=snap.version)
        _verify_shard(snap.store, snap, ShardRecord(**record), _rows_of(rows), part)
        return part

    for part in ray.get([check.remote(rec, rows) for rec, rows in work]):
        rep.shards_checked += part.shards_checked
        rep.samples_checked += part.samples_checked
        rep.problems += part.problems


def _slice_of(rows: pa.Table, shard: str) -> pa.Table:
    """The index rows of one shard (`rows` sorted by shard): an Arrow slice, no copy."""
    col = rows.column("shard")
    lo = pc.index(col, shard).as_py()
    if lo < 0:
        return rows.slice(0, 0)
    return rows.slice(lo, pc.sum(pc.equal(col, shard)).as_py())


def _rows_of(rows: pa.Table) -> dict[str, dict[str, Any]]:
    """One shard's index rows as Python rows: one shard's worth, never the whole index."""
    return {r["sample_key"]: r for r in rows.to_pylist()}


def _verify_shard(store: FeatureStore, snap, rec: ShardRecord, rows: dict[str, dict[str, Any]],
                  rep: VerifyReport) -> None:
    spec = snap.spec
    rep.shards_checked += 1
    path = fsutil.join(store.key_path(snap.key), rec.name)
    if not fsutil.exists(store.fs, path):
        rep.add("missing_shard", rec.name, "listed in the shard table but not in the store")
        return
    size = store.fs.size(path)
    if size != rec.bytes:
        rep.add("size_mismatch", rec.name, f"{size} bytes on disk, {rec.bytes} in its record")
    with store.fs.open(path, "rb") as f:
        sha = sha256_stream(f)
    if sha != rec.sha256:
        rep.add("checksum_mismatch", rec.name, f"sha256 {sha[:12]}..., record says {rec.sha256[:12]}...")
    found = _check_samples(store, path, rec.name, rep, t=spec.sampling.segment_frames, d=spec.embed_dim,
                           crop=spec.preprocess.crop, dtype=np.dtype(spec.storage.target_dtype),
                           frames_ext=FRAMES_EXT[spec.storage.frame_encoding],
                           encoding=spec.storage.frame_encoding, patch_grid=spec.teacher.patch_grid, rows=rows)
    if found is None:
        return
    if len(found) != rec.count:
        rep.add("count_mismatch", rec.name, f"{len(found)} samples, record says {rec.count}")
    for k in sorted(set(rows) - found):
        rep.add("index_points_nowhere", f"{rec.name}:{k}", "index row names a sample the shard lacks")


def _check_digests(store: FeatureStore, snap, rep: VerifyReport) -> None:
    """The version's index (and the ledger it saw) hash to the sum of the digests their commits recorded."""
    from .store import table_digest

    t = store.tables(snap.key)
    expected = _recorded_digest(t.index, snap.version)
    actual = table_digest(snap.index_columns())
    if expected != actual:
        rep.add("index_checksum_mismatch", "tables/index", f"digest {actual}, commits recorded {expected}")
    lv = int(snap.commit.get("ledger_version", -1))
    if lv >= 0:
        expected = _recorded_digest(t.failures, lv)
        actual = table_digest(snap.ledger)
        if expected != actual:
            rep.add("ledger_checksum_mismatch", "tables/failures", f"digest {actual}, commits recorded {expected}")


def _recorded_digest(loc, version: int) -> str:
    total = 0
    for v in range(1, version + 1):
        meta = commit_metadata(loc, v)
        if "digest" in meta:
            total += int(meta["digest"], 16)
        else:
            extra = fsutil.join(loc.path, "_subsume_digests", f"{v:020d}")
            if fsutil.exists(loc.fs, extra):
                total += int(fsutil.read_bytes(loc.fs, extra), 16)
    return f"{total % 2**128:032x}"


def _check_samples(store: FeatureStore, path: str, name: str, rep: VerifyReport, *, t: int, d: int, crop: int,
                   dtype: np.dtype, frames_ext: str, encoding: str, patch_grid: int,
                   rows: dict[str, dict[str, Any]]) -> set[str] | None:
    members: dict[str, dict[str, bytes]] = {}
    try:
        with store.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                skey, _, suffix = base.partition(".")
                parts = members.setdefault(skey, {})
                if suffix in parts:
                    rep.add("duplicate_sample", f"{name}:{skey}", f"two {suffix} members with one sample key")
                parts[suffix] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        rep.add("unreadable_shard", name, f"{type(e).__name__}: {e}")
        return None
    for skey, parts in members.items():
        rep.samples_checked += 1
        where = f"{name}:{skey}"
        missing = [s for s in (TARGETS_EXT, frames_ext, META_EXT) if s not in parts]
        if missing:
            rep.add("incomplete_sample", where, f"missing {', '.join(missing)}")
            continue
        try:
            targets = npy_load(parts[TARGETS_EXT])
            if targets.dtype != dtype or targets.shape != (t, d):
                rep.add("bad_targets", where, f"targets {targets.dtype} {targets.shape}, expected {dtype} {(t, d)}")
            elif not np.isfinite(targets.astype(np.float32)).all():
                rep.add("bad_targets", where, "targets hold NaN or inf")
            frames = decode_frames(parts[frames_ext], encoding, t)
            if frames.dtype != np.uint8 or frames.shape != (t, crop, crop, 3):
                rep.add("bad_frames", where, f"frames {frames.dtype} {frames.shape}, expected uint8 {(t, crop, crop, 3)}")
            if patch_grid:
                if PATCHES_EXT not in parts:
                    rep.add("incomplete_sample", where, f"missing {PATCHES_EXT}")
                else:
                    p = npy_load(parts[PATCHES_EXT])
                    if p.shape[:3] != (t, patch_grid, patch_grid) or p.dtype != dtype:
                        rep.add("bad_patches", where, f"patches {p.dtype} {p.shape}, expected {dtype} "
                                                      f"{(t, patch_grid, patch_grid)}+")
                    elif not np.isfinite(p.astype(np.float32)).all():
                        rep.add("bad_patches", where, "patches hold NaN or inf")
            _check_row(rows.get(skey), json.loads(parts[META_EXT]), where, rep)
        except Exception as e:  # any decode failure is damage to report, not a crash
            rep.add("undecodable_sample", where, f"{type(e).__name__}: {e}")
    return set(members)


def _check_row(row: dict[str, Any] | None, meta: dict[str, Any], where: str, rep: VerifyReport) -> None:
    """The index row agrees with the sample's own JSON (video hash, segment)."""
    if row is None:
        return  # a sample no index row names (a duplicate copy, or a shard's unreferenced part)
    for field_ in ("video_sha256", "segment"):
        if row[field_] != meta.get(field_):
            rep.add("index_disagrees", where, f"{field_}: index {row[field_]!r}, sample JSON {meta.get(field_)!r}")


def inspect(store: FeatureStore, key: str, version: int | None = None) -> dict[str, Any]:
    snap = store.open(key, version)
    m = snap.manifest
    counts = dict(m.get("counts", {}))
    fails = snap.failures
    max_attempts = m.get("max_attempts") or DEFAULT_MAX_ATTEMPTS
    verdicts = failure_verdicts(fails, max_attempts=max_attempts)
    frames = counts.get("frames", 0)
    by_error = fails.group_by("error").aggregate([("failure_id", "count")]).to_pylist() if fails.num_rows else []
    return {
        "key": key,
        "version": snap.version,
        "manifest_sha256": snap.manifest_sha256 if snap.version else None,
        "teacher": m.get("teacher"),
        "preprocessing": m.get("preprocessing"),
        "sampling": m.get("sampling"),
        "storage": m.get("spec", {}).get("storage"),
        "counts": counts,
        "bytes_on_disk": counts.get("bytes", 0),
        "bytes_per_frame": (counts.get("bytes", 0) / frames) if frames else None,
        "failures_by_error": {r["error"]: r["failure_id_count"] for r in by_error},
        "quarantined": sum(1 for v in verdicts if not v.retry),
        "max_attempts": max_attempts,
        "max_attempts_seen": int(pc.max(fails.column("attempts")).as_py() or 0) if fails.num_rows else 0,
        "fidelity": m.get("fidelity"),
        "updated_at": m.get("created_at"),
    }


def failure_verdicts(fails: pa.Table, *, max_attempts: int, retry_failed: bool = False) -> list[Verdict]:
    """`ledger.decide` for each failing video of a version (rows of the failure state, not of the index)."""
    now = judge_version()
    return [decide(error=f["error"], cause=f["cause"], attempts=f["attempts"], judged_by=f["judged_by"] or "",
                   judge_now=now, max_attempts=max_attempts, retry_failed=retry_failed)
            for f in fails.select(["error", "cause", "attempts", "judged_by"]).to_pylist()]


def failures_report(store: FeatureStore, key: str, version: int | None = None) -> list[dict[str, Any]]:
    """One row per failing video of a version, with the reason and what the next run will do about it."""
    snap = store.open(key, version)
    max_attempts = snap.manifest.get("max_attempts") or DEFAULT_MAX_ATTEMPTS
    rows = table_rows(snap.failures)
    for r, v in zip(rows, failure_verdicts(snap.failures, max_attempts=max_attempts)):
        r["next_run"] = "retry" if v.retry else "skip"
        r["why"] = v.why
    return rows


def gc(store: FeatureStore, *, grace: float = 3600.0, delete_keys: list[str] | None = None,
       now: float | None = None, retention: Retention | None = None) -> dict[str, Any]:
    """Remove what no retained version and no live writer needs: temp shards, shards no index row names, stale
    leases, Delta files of expired versions. Ages are judged on the storage's clock (`now` overrides it, for
    tests), and nothing younger than max(grace, GRACE_FLOOR_S) is touched."""
    grace = max(grace, GRACE_FLOOR_S)
    removed: list[str] = []
    for key in delete_keys or []:
        store.spec(key)  # raises KeyNotFound
        store.delete_key(key)
        removed.append(key + "/")
    for key in store.keys():
        removed += _gc_key(store, key, grace, now, retention or Retention())
    return {"removed": removed, "count": len(removed), "grace_s": grace}


def _gc_key(store: FeatureStore, key: str, grace: float, now: float | None, retention: Retention) -> list[str]:
    kp = store.key_path(key)
    clock = store.storage_now(key) if now is None else now
    leases = store.leases(key)
    skew = clock - store.storage_now(key) if now is not None else 0.0
    live = {lz["run_id"] for lz in leases if lz["age_s"] + skew < grace}
    pinned = {int(lz["pinned_version"]) for lz in leases if lz["run_id"] in live and lz.get("pinned_version")}

    def old(e: dict[str, Any]) -> bool:
        return clock - fsutil.entry_mtime(e) > grace

    def run_of(name: str) -> str:
        return "-".join(name.rsplit("/", 1)[-1].split("-")[:2])

    removed: list[str] = []
    tmp = fsutil.listdir(store.fs, fsutil.join(kp, "_tmp"))
    shards = fsutil.listdir(store.fs, fsutil.join(kp, "shards"))  # listed BEFORE the index is read (see docs)
    referenced = set(store.open(key).shard_names()) if store.tables(key).index.exists() else set()
    for e in tmp:
        if e["name"].rstrip("/").rsplit("/", 1)[-1] not in live and old(e):
            store.fs.rm(e["name"], recursive=True)
            removed.append(e["name"])
    for e in shards:
        rel = "shards/" + e["name"].rsplit("/", 1)[-1]
        if rel not in referenced and run_of(rel) not in live and old(e):
            store.fs.rm_file(e["name"])
            removed.append(e["name"])
    for lz in leases:
        if lz["run_id"] not in live:
            store.fs.rm_file(lz["path"])
            removed.append(lz["path"])
    if store.tables(key).index.exists():
        removed += expire_versions(store, key, retention, pinned, grace)
    return removed
