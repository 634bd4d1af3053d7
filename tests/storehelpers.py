"""Build small real stores for tests: synthetic frames and targets, real shards, real commits."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from feature_store.shards import build_sample, encode_frames, sample_key
from feature_store.spec import FeatureSpec, PreprocessSpec, SamplingSpec, StorageSpec, TeacherSpec
from feature_store.store import CommitBatch, FeatureStore, TargetStats

T, D, S = 4, 8, 16
DP = 6  # patch-token dim, when a spec keeps patch grids


def small_spec(patch_grid: int = 0, **storage) -> FeatureSpec:
    return FeatureSpec(teacher=TeacherSpec(model="tiny", patch_grid=patch_grid), teacher_fingerprint="0" * 64, teacher_class="Tiny",
                       embed_dim=D, output_used="cls",
                       preprocess=PreprocessSpec(resize=S, crop=S, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                       sampling=SamplingSpec(fps=2.0, segment_frames=T), storage=StorageSpec(**storage))


def video_sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def make_samples(video: str, segments: int, *, spec: FeatureSpec, labels: dict | None = None, seed: int = 0,
                 target_dtype: str | None = None):
    rng = np.random.default_rng(abs(hash((video, seed))) % 2**32)
    sha = video_sha(video)
    samples, rows = [], []
    for seg in range(segments):
        frames = rng.integers(0, 255, (T, S, S, 3), dtype=np.uint8)
        targets = rng.normal(size=(T, D)).astype(target_dtype or spec.storage.target_dtype)
        g = spec.teacher.patch_grid
        patches = rng.normal(size=(T, g, g, DP)).astype(spec.storage.target_dtype) if g else None
        key = sample_key(sha, seg)
        meta = {"sample_key": key, "video_sha256": sha, "source": f"/videos/{video}.mp4", "video_id": video,
                "labels": labels or {}, "segment": seg, "segments_total": segments,
                "frame_indices": list(range(seg * T, seg * T + T)), "timestamps": [i / 2 for i in range(T)],
                "num_frames": 100, "decoder": "decord", "video_size": 1000, "video_mtime": 1.0}
        blob = encode_frames(frames, spec.storage.frame_encoding)
        samples.append(build_sample(key, blob, spec.storage.frame_encoding, targets, meta, patches))
        rows.append({k: meta[k] for k in ("sample_key", "video_sha256", "video_id", "source", "segment",
                                          "segments_total", "frame_indices", "timestamps", "labels", "num_frames",
                                          "decoder", "video_size", "video_mtime")})
    return samples, rows


def add_video(store: FeatureStore, key: str, video: str, segments: int = 3, *, run_id: str = "20260101000000-test0001",
              labels: dict | None = None, commit: bool = True, **kw):
    spec = store.spec(key)
    samples, rows = make_samples(video, segments, spec=spec, labels=labels, **kw)
    rec = store.write_shard(key, run_id, samples)
    for r in rows:
        r["shard"] = rec.name
    stats = TargetStats()
    from feature_store.shards import npy_load

    for s in samples:
        stats = stats.merge(TargetStats.of(npy_load(s.members["teacher.npy"]).astype(np.float32)))
    batch = CommitBatch(shards=[rec], rows=rows, stats=stats, run_id=run_id)
    if commit:
        return store.commit(key, batch)
    return batch


def moto_server_process():
    """Start moto's S3 server in a child process; returns (endpoint, process). delta-rs holds the GIL while it
    talks to S3, so an in-process (threaded) moto server could not answer it. One starter for the tests and
    the store_scale benchmark."""
    from benchmarks.store_scale import moto_server

    return moto_server()


# Fixtures for the store tests (import them by name into a test module).
@pytest.fixture
def store(tmp_path):
    st = FeatureStore(str(tmp_path / "store"))
    st.ensure_key(small_spec())
    return st


@pytest.fixture
def key():
    return small_spec().key
