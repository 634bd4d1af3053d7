"""Inspect, verify and clean a KEY. Verify re-reads every byte; gc never touches what a live writer owns."""

from __future__ import annotations

import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import fsutil
from .shards import FRAMES_EXT, META_EXT, PATCHES_EXT, TARGETS_EXT, decode_frames, npy_load
from .store import FeatureStore, sha256_stream, table_rows


@dataclass
class VerifyReport:
    key: str
    version: int
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, where: str, detail: str) -> None:
        self.problems.append({"kind": kind, "where": where, "detail": detail})


def verify(store: FeatureStore, key: str, version: int | None = None) -> VerifyReport:
    """Check every shard's size and sha256 against the manifest, every sample's arrays against the spec,
    and every index row against the shards."""
    snap = store.open(key, version)
    spec = snap.spec
    rep = VerifyReport(key=key, version=snap.version)
    t, d = spec.sampling.segment_frames, spec.embed_dim
    crop = spec.preprocess.crop
    dtype = np.dtype(spec.storage.target_dtype)
    frames_ext = FRAMES_EXT[spec.storage.frame_encoding]
    rows = table_rows(snap.index)
    keys_by_shard: dict[str, set[str]] = {}
    for r in rows:
        keys_by_shard.setdefault(r["shard"], set()).add(r["sample_key"])
    listed = {s.name for s in snap.shards}
    for shard in sorted(set(keys_by_shard) - listed):
        rep.add("index_points_nowhere", shard, "index rows name a shard the manifest does not list")

    for rec in snap.shards:
        rep.shards_checked += 1
        path = fsutil.join(store.key_path(key), rec.name)
        if not fsutil.exists(store.fs, path):
            rep.add("missing_shard", rec.name, "listed in the manifest but not in the store")
            continue
        size = store.fs.size(path)
        if size != rec.bytes:
            rep.add("size_mismatch", rec.name, f"{size} bytes on disk, {rec.bytes} in the manifest")
        with store.fs.open(path, "rb") as f:
            sha = sha256_stream(f)
        if sha != rec.sha256:
            rep.add("checksum_mismatch", rec.name, f"sha256 {sha[:12]}..., manifest says {rec.sha256[:12]}...")
        found = _check_samples(store, path, rec.name, rep, t=t, d=d, crop=crop, dtype=dtype, frames_ext=frames_ext,
                               encoding=spec.storage.frame_encoding, patch_grid=spec.teacher.patch_grid)
        if found is None:
            continue
        if len(found) != rec.count:
            rep.add("count_mismatch", rec.name, f"{len(found)} samples, manifest says {rec.count}")
        for k in sorted(keys_by_shard.get(rec.name, set()) - found):
            rep.add("index_points_nowhere", f"{rec.name}:{k}", "index row names a sample the shard lacks")
    return rep


def _check_samples(store: FeatureStore, path: str, name: str, rep: VerifyReport, *, t: int, d: int, crop: int,
                   dtype: np.dtype, frames_ext: str, encoding: str, patch_grid: int) -> set[str] | None:
    members: dict[str, dict[str, bytes]] = {}
    try:
        with store.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                skey, _, suffix = base.partition(".")
                members.setdefault(skey, {})[suffix] = tar.extractfile(m).read()
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
                    if p.shape[:3] != (t, patch_grid, patch_grid):
                        rep.add("bad_patches", where, f"patches {p.shape}, expected {(t, patch_grid, patch_grid)}+")
        except Exception as e:  # any decode failure is damage to report, not a crash
            rep.add("undecodable_sample", where, f"{type(e).__name__}: {e}")
    return set(members)


def inspect(store: FeatureStore, key: str, version: int | None = None) -> dict[str, Any]:
    snap = store.open(key, version)
    m = snap.manifest
    counts = dict(m.get("counts", {}))
    fails = table_rows(snap.failures)
    by_error = Counter(f["error"] for f in fails)
    max_attempts_seen = max((f["attempts"] for f in fails), default=0)
    quarantined = [f for f in fails if not f["retryable"] or f["attempts"] >= m.get("max_attempts", 3)]
    frames = counts.get("frames", 0)
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
        "failures_by_error": dict(by_error),
        "quarantined": len(quarantined),
        "max_attempts_seen": max_attempts_seen,
        "fidelity": m.get("fidelity"),
        "updated_at": m.get("created_at"),
    }


def gc(store: FeatureStore, *, grace: float = 3600.0, delete_keys: list[str] | None = None,
       now: float | None = None) -> dict[str, Any]:
    """Remove leftovers of killed jobs: temp shards, shards no snapshot references, snapshot files of lost
    commits, expired leases. Only files older than `grace` seconds whose writer holds no live lease."""
    now = time.time() if now is None else now
    removed: list[str] = []
    for key in delete_keys or []:
        store.spec(key)  # raises KeyNotFound
        store.delete_key(key)
        removed.append(key + "/")
    for key in store.keys():
        kp = store.key_path(key)
        live = store.live_runs(key, grace)
        versions = store.versions(key)
        referenced: set[str] = set()
        for v in versions:
            m = store.open(key, v).manifest
            referenced.update(s["name"] for s in m.get("shards", []))
            referenced.update((m["index_file"], m["failures_file"]))

        def old(e: dict[str, Any]) -> bool:
            mtime = e.get("mtime") or e.get("LastModified") or e.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            return mtime is not None and now - float(mtime) > grace

        def run_of(name: str) -> str:
            base = name.rsplit("/", 1)[-1]
            return "-".join(base.split("-")[:2])

        for e in fsutil.listdir(store.fs, fsutil.join(kp, "_tmp")):
            run = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if run not in live and old(e):
                store.fs.rm(e["name"], recursive=True)
                removed.append(e["name"])
        for e in fsutil.listdir(store.fs, fsutil.join(kp, "shards")):
            rel = "shards/" + e["name"].rsplit("/", 1)[-1]
            if rel not in referenced and run_of(rel) not in live and old(e):
                store.fs.rm_file(e["name"])
                removed.append(e["name"])
        for e in fsutil.listdir(store.fs, fsutil.join(kp, "snapshots")):
            rel = "snapshots/" + e["name"].rsplit("/", 1)[-1]
            if rel.endswith(".parquet") and rel not in referenced and old(e):
                store.fs.rm_file(e["name"])
                removed.append(e["name"])
        for e in fsutil.listdir(store.fs, fsutil.join(kp, "leases")):
            run = e["name"].rsplit("/", 1)[-1].removesuffix(".json")
            if run not in live and old(e):
                store.fs.rm_file(e["name"])
                removed.append(e["name"])
    return {"removed": removed, "count": len(removed)}
