"""Loader headroom: samples/s the shard reader delivers alone against samples/s the student step consumes.

The reader is what the training loop uses (`feature_store.reader.iter_samples` over one snapshot of the KEY,
the training split, the loop's shuffle buffer) plus `collate` into batches, in this one process. The
consumption rate is the cached-target student step of the cached_vs_online benchmark with the head of the
extraction teacher (whose KEY is read) and the same batch size.
"""

from __future__ import annotations

import time

from benchmarks.cached_vs_online import student_rate
from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession

NAME = "loader"
TARGET = Target(3.0)


def reader_rate(session: BenchSession) -> dict[str, float]:
    from feature_store.reader import SplitFilter, iter_samples
    from feature_store.store import FeatureStore
    from training.config import DataConfig
    from training.loop import collate

    cfg = session.cfg
    run = session.extract(max(cfg.scales))
    store = FeatureStore(run["store"])
    snap = store.open(run["key"])
    data = DataConfig(batch_size=cfg.batch_size)
    split = SplitFilter("train", data.heldout_fraction)
    n = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.loader_epochs):
        batch = []
        for sample in iter_samples(store, snap, epoch=epoch, seed=cfg.seed, shuffle_buffer=data.shuffle_buffer,
                                   split=split):
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                collate(batch)
                n, batch = n + len(batch), []
    wall = time.perf_counter() - t0
    return {"samples": n, "epochs": cfg.loader_epochs, "wall_s": sig(wall), "samples_per_s": sig(n / wall),
            "frames_per_sample": snap.spec.sampling.segment_frames, "shards": len(snap.shards)}


def run(session: BenchSession) -> BenchResult:
    teacher = session.cfg.extract_teacher
    session.log(f"{NAME}: reading the largest KEY alone")
    reader = reader_rate(session)
    consumed = student_rate(session, teacher)
    value = reader["samples_per_s"] / consumed
    summary = f"reader {reader['samples_per_s']:.0f} samples/s vs student step {consumed:.1f} samples/s"
    figures = {"reader": reader, "student_samples_per_s": sig(consumed), "student_teacher_head": teacher,
               "batch_size": session.cfg.batch_size}
    return BenchResult(NAME, sig(value), TARGET, summary, figures)
