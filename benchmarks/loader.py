"""Loader headroom at 224 px: samples/s the training data path delivers alone against samples/s the student
step consumes, and the data-wait fraction of the real training loop.

The data path is the training loop's own (`training.data.make_loader`: a torch DataLoader whose worker
processes read shards, decode JPEG frames, resize them to the student's size and collate, with the default
`LoaderConfig` workers and prefetch) over a KEY whose frames are stored at 224 px. That KEY is written here
(synthetic smooth frames with noise, the store's own JPEG encoding and shard writer) rather than extracted:
on a CPU a teacher at 224 px would take most of the benchmark's time. The consumption rate is the
cached-target student step (`benchmarks.student_step`) at 224 px with the same batch and view length.
The data-wait fraction comes from `metrics.jsonl` of a short in-process `run_train` on the same KEY.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from statistics import median

import numpy as np
import torch

from benchmarks.measure import timed
from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession, synthetic_frames

NAME = "loader"
TARGET = Target(3.0)
SIZE = 224
SAMPLES = 48
EMBED_DIM = 64


def write_key_224(session: BenchSession) -> tuple[str, str]:
    """A KEY of SAMPLES samples of segment_frames JPEG frames at 224 px (written once per workdir)."""
    from feature_store.shards import build_sample, encode_frames, sample_key
    from feature_store.spec import FeatureSpec, PreprocessSpec, SamplingSpec, StorageSpec, TeacherSpec
    from feature_store.store import CommitBatch, FeatureStore, TargetStats

    cfg = session.cfg
    store = FeatureStore(str(session.workdir / "loader-224"))
    spec = FeatureSpec(teacher=TeacherSpec(model="synthetic-224"), teacher_fingerprint="0" * 64,
                       teacher_class="Synthetic", embed_dim=EMBED_DIM, output_used="cls",
                       preprocess=PreprocessSpec(resize=SIZE, crop=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3),
                       sampling=SamplingSpec(fps=4.0, segment_frames=cfg.segment_frames), storage=StorageSpec())
    key = store.ensure_key(spec)
    if store.latest_version(key) > 0:
        return store.root, key
    t, rng = cfg.segment_frames, np.random.default_rng(cfg.seed)
    for shard in range(SAMPLES // 8):
        samples, rows, stats = [], [], TargetStats()
        for i in range(8):
            sha = hashlib.sha256(f"loader-{shard}-{i}".encode()).hexdigest()
            frames = synthetic_frames(t, SIZE, seed=shard * 8 + i).numpy()
            targets = rng.normal(size=(t, EMBED_DIM)).astype(np.float16)
            k = sample_key(sha, 0)
            meta = {"sample_key": k, "video_sha256": sha, "source": f"synthetic/{sha[:8]}", "video_id": sha[:8],
                    "labels": {}, "segment": 0, "segments_total": 1, "frame_indices": list(range(t)),
                    "timestamps": [j / 4 for j in range(t)], "num_frames": t, "decoder": "synthetic",
                    "video_size": 0, "video_mtime": 0.0}
            samples.append(build_sample(k, encode_frames(frames, "jpeg"), "jpeg", targets, meta))
            rows.append({**{f: meta[f] for f in meta}, "shard": None})
            stats = stats.merge(TargetStats.of(targets.astype(np.float32)))
        rec = store.write_shard(key, "20260101000000-bench001", samples)
        for r in rows:
            r["shard"] = rec.name
        store.commit(key, CommitBatch(shards=[rec], rows=rows, stats=stats, run_id="20260101000000-bench001"))
    return store.root, key


def loader_rate(root: str, key: str, session: BenchSession) -> dict[str, float]:
    """Samples/s out of the default DataLoader over the rank's stream, from its first batch on (start-up of
    the loader processes is reported apart)."""
    from feature_store.store import FeatureStore
    from training.config import DataConfig, LoaderConfig
    from training.data import DataPosition, StreamSpec, make_loader

    cfg, loader, data = session.cfg, LoaderConfig(), DataConfig(batch_size=session.cfg.batch_size)
    version = FeatureStore(root).latest_version(key)
    spec = StreamSpec(root=root, key=key, version=version, storage_options={}, rank=0, world_size=1, seed=cfg.seed,
                      shuffle_buffer=data.shuffle_buffer, heldout_fraction=0.0, batch_size=cfg.batch_size,
                      image_size=SIZE)
    dl = make_loader(spec, DataPosition.start(max(1, loader.num_workers)), num_workers=loader.num_workers,
                     prefetch_factor=loader.prefetch_factor, pin_memory=False)
    batches = max(2, cfg.loader_epochs * SAMPLES // cfg.batch_size)
    t0 = time.perf_counter()
    it = iter(dl)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches - 1):
        next(it)
    wall = time.perf_counter() - t1
    del it
    n = (batches - 1) * cfg.batch_size
    return {"samples": n, "wall_s": sig(wall), "samples_per_s": sig(n / wall), "first_batch_s": sig(first),
            "num_workers": loader.num_workers, "prefetch_factor": loader.prefetch_factor,
            "frames_per_sample": cfg.segment_frames, "frame_size": SIZE}


def student_rate_224(session: BenchSession) -> float:
    """Cached-target samples/s of the student step at 224 px (the loop's own step, no data reading)."""
    from benchmarks.student_step import StudentStep, bench_train_config

    cfg, dev = session.cfg, session.device
    tcfg = bench_train_config(arch=cfg.student_arch, size=cfg.student_size, frames=cfg.view_frames, image_size=SIZE,
                              patch=cfg.student_patch, batch_size=cfg.batch_size, seed=cfg.seed)
    frames = synthetic_frames(cfg.batch_size * cfg.segment_frames, SIZE).view(cfg.batch_size, cfg.segment_frames,
                                                                              SIZE, SIZE, 3)
    targets = torch.randn(cfg.batch_size, cfg.segment_frames, EMBED_DIM)
    step = StudentStep(tcfg, EMBED_DIM, dev, torch.zeros(EMBED_DIM), torch.ones(EMBED_DIM))
    timed(lambda: [step(frames, targets, i) for i in range(cfg.warmup_steps)], dev)
    times = [timed(lambda: [step(frames, targets, i) for i in range(cfg.steps)], dev) for _ in range(cfg.repeats)]
    return cfg.steps * cfg.batch_size / median(times)


def loop_data_wait(root: str, key: str, session: BenchSession) -> dict[str, float]:
    """The real training loop (in-process, default loader) on the 224-px KEY: its data-wait fraction after
    the first step (which includes starting the loader processes)."""
    from training.config import DataConfig, TrainConfig
    from training.models import StudentConfig
    from training.train import run_train

    cfg = session.cfg
    steps = max(4, cfg.steps + cfg.warmup_steps)
    tcfg = TrainConfig(steps=steps, log_every=1, checkpoint_every=steps, seed=cfg.seed, report_to=[],
                       student=StudentConfig(arch=cfg.student_arch, size=cfg.student_size, frames=cfg.view_frames,
                                             image_size=SIZE, patch=cfg.student_patch),
                       data=DataConfig(batch_size=cfg.batch_size, heldout_fraction=0.0))
    out = session.workdir / f"loader-run-{time.time_ns()}"
    run_train(tcfg, root, key, str(out), in_process=True, log=lambda m: None)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    wait, busy = sum(r["data_time_s"] for r in rows), sum(r["data_time_s"] + r["step_time_s"] for r in rows)
    return {"steps": len(rows), "data_wait_frac": sig(wait / max(busy, 1e-9)),
            "samples_per_s": sig(median(r["samples_per_s"] for r in rows))}


def run(session: BenchSession) -> BenchResult:
    session.log(f"{NAME}: writing a {SIZE}-px KEY, then the default loader alone, the student step, the loop")
    root, key = write_key_224(session)
    reader = loader_rate(root, key, session)
    consumed = student_rate_224(session)
    loop = loop_data_wait(root, key, session)
    value = reader["samples_per_s"] / consumed
    summary = (f"loader {reader['samples_per_s']:.1f} samples/s ({reader['num_workers']} workers) vs student step "
               f"{consumed:.1f} samples/s at {SIZE} px; training loop waits for data {loop['data_wait_frac']:.0%}")
    figures = {"reader": reader, "student_samples_per_s": sig(consumed), "loop": loop,
               "batch_size": session.cfg.batch_size, "view_frames": session.cfg.view_frames,
               "device": str(session.device)}
    notes = ["on a CPU the loader processes share the cores with the student step, so the loop's data-wait "
             "fraction is an upper bound of what a GPU run sees"] if session.device.type == "cpu" else []
    return BenchResult(NAME, sig(value), TARGET, summary, figures, notes)
