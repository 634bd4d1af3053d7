"""The extraction job: videos → (Ray Data) decode → teacher actor pool → shards → commits to the store.

The driver plans (what to compute, reuse, skip), streams the pipeline's small per-shard results back,
and commits them to the KEY every few shards or seconds, so a killed run loses at most the shards
since its last commit and a rerun finishes the rest.
"""

from __future__ import annotations

import json
import math
import logging
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from feature_store.spec import FeatureSpec, SamplingSpec, StorageSpec, TeacherSpec
from feature_store.ledger import FAILURES_SCHEMA, cause_of, judge_version
from feature_store.snapshot import Snapshot
from feature_store.store import HEARTBEAT_S, CommitBatch, FeatureStore, Fidelity, ShardRecord, TargetStats, new_run_id
from pipeline.decode import DecodeLimits
from pipeline.plan import Plan, VideoInput, index_for_inputs, index_for_listing, known_hashes, make_plan
from pipeline.sources import VideoRef, hash_video, list_videos, stat_video
from pipeline.stages import DecodeStage, TeacherStage, WriteStage, failure_record


# Bytes to hash before a distributed job pays for itself: threads in the driver hash a local or object-store
# file at disk or network speed, and a Ray job first starts worker processes (tens of seconds on a small node).
HASH_ON_CLUSTER_ABOVE_BYTES = 16 * 2**30


@dataclass
class ExtractConfig:
    videos: str
    store: str
    teacher: TeacherSpec
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    size: int | None = None
    max_failure_fraction: float = 0.5
    max_attempts: int = 3
    retry_failed: bool = False  # retry every failed video once, whatever the ledger says
    decode_timeout: float = 300.0
    batch_size: int = 64
    teacher_actors: int | None = None
    decode_concurrency: int | None = None
    samples_per_shard: int = 64
    device: str = "auto"
    dry_run: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    commit_every_shards: int = 8
    commit_every_s: float = 30.0
    max_in_flight: int = 2  # batches queued per actor (bounded memory: decoded frames never pile up)
    object_store_memory_gb: float | None = None
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)


def resolve_feature_spec(cfg: ExtractConfig) -> FeatureSpec:
    """The KEY's definition for this run's settings (see feature_store.teacher.feature_spec_for)."""
    from feature_store.teacher import feature_spec_for

    return feature_spec_for(cfg.teacher, cfg.sampling, cfg.storage, size=cfg.size)


def identify_videos(refs: list[VideoRef], snapshot: Snapshot | None, storage_options: dict[str, Any],
                    connect: Callable[[], None]) -> list[VideoInput]:
    """Content hash per video; unchanged files (same source, size, mtime/ETag as stored) are not re-read.

    A few files are hashed here in threads; many are hashed across the cluster (I/O bound: a fraction of a
    CPU per task), which is where they are on a large corpus in object storage.
    """
    inputs: list[VideoInput] = []
    for r in refs:
        st = stat_video(r.source, storage_options)
        inputs.append(VideoInput(r.source, r.video_id, dict(r.labels), size=st.size, mtime=st.mtime, error=st.error))
    stats = [(v.source, v.size, v.mtime) for v in inputs]
    known = known_hashes(stats, index_for_listing(snapshot, stats))
    to_hash: list[dict[str, Any]] = []
    for i, v in enumerate(inputs):
        if not v.error:
            v.sha256 = known[i]
            if not v.sha256:
                to_hash.append({"i": i, "source": v.source, "size": v.size})

    def _hash(row: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"i": row["i"], "sha256": hash_video(row["source"], storage_options), "error": ""}
        except OSError as e:
            return {"i": row["i"], "sha256": "", "error": f"unreadable: {e}"}

    if sum(r["size"] for r in to_hash) > HASH_ON_CLUSTER_ABOVE_BYTES:
        import ray

        connect()
        _quiet_ray_data()
        blocks = min(len(to_hash), 4 * int(_cluster_resources()[0]))
        hashed = ray.data.from_items(to_hash, override_num_blocks=blocks).map(_hash, num_cpus=0.25).take_all()
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            hashed = list(pool.map(_hash, to_hash))
    for h in hashed:
        inputs[h["i"]].sha256, inputs[h["i"]].error = h["sha256"], h["error"]
    return inputs


def steady_rate(frames: int, teacher_spans: list[tuple[float, float]]) -> float | None:
    """Frames/s while the teacher stage works: all frames over the time from its first call's start to its
    last call's end (wall clock of the actors). Ray start, actor starts, model loads and the last shard's write
    are outside that window; a slower decode stage still shows, as the teacher waiting inside it."""
    if not teacher_spans:
        return None
    window = max(t1 for _, t1 in teacher_spans) - min(t0 for t0, _ in teacher_spans)
    return round(frames / window, 2) if window > 0 else None


@dataclass(frozen=True)
class ActorPlan:
    """How many decode and teacher actors the pipeline runs, and what each reserves from Ray."""

    decode_actors: int  # the decode pool's largest size (Ray Data grows it from one while decoding lags)
    decode_cpus: float
    teacher_actors: int
    teacher_cpus: float
    teacher_gpus: float
    teacher_threads: int  # torch intra-op threads of each teacher actor; 0 leaves torch's default (GPU)


def plan_actors(cpus: float, gpus: float, device: str = "auto", *, teacher_actors: int | None = None,
                decode_concurrency: int | None = None) -> ActorPlan:
    """The default split of a cluster between decoding and the teacher (either count can be fixed by the user).

    GPU: one teacher actor per GPU, decoders on the CPUs. CPU: the teacher costs far more per frame than
    decoding (20x on the demo's videos), and one single-threaded torch process per core runs faster than one
    process on all cores, so teacher actors take the cores and each decoder reserves a quarter CPU; the cores
    are shared by the OS, and Ray Data adds decoders only while the teacher waits for frames.
    """
    if gpus >= 1 and device in ("auto", "cuda"):
        n_teacher = teacher_actors or int(gpus)
        n_decode = decode_concurrency or max(1, int(cpus - 0.5 * n_teacher))
        return ActorPlan(n_decode, 1.0, n_teacher, 0.5, 1.0, 0)
    n_teacher = teacher_actors or max(1, int(cpus))
    n_decode = decode_concurrency or max(1, int(cpus) // 2)
    decode_cpus = 0.25
    teacher_cpus = max(0.05, (cpus - n_decode * decode_cpus) / n_teacher)
    # torch threads: the actor's share of the cores, rounded up (a decoder's quarter core is mostly idle)
    return ActorPlan(n_decode, decode_cpus, n_teacher, math.floor(teacher_cpus * 1000) / 1000, 0.0,
                     max(1, math.ceil(teacher_cpus - 1e-6)))


def cluster_actor_plan(device: str = "auto", *, teacher_actors: int | None = None,
                       decode_concurrency: int | None = None) -> ActorPlan:
    """`plan_actors` for the connected Ray cluster's CPUs and GPUs."""
    cpus, gpus = _cluster_resources()
    return plan_actors(cpus, gpus, device, teacher_actors=teacher_actors, decode_concurrency=decode_concurrency)


def _cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 1)), float(res.get("GPU", 0))


class Lease:
    """Keeps this run's lease fresh while it runs, so `store gc` leaves its files alone even when no shard
    arrives for a long time (a slow teacher, a stuck decoder waiting for its timeout)."""

    def __init__(self, store: FeatureStore, key: str, run_id: str, every_s: float = HEARTBEAT_S):
        import threading

        self.store, self.key, self.run_id = store, key, run_id
        self._stop = threading.Event()
        store.heartbeat(key, run_id)
        self._thread = threading.Thread(target=self._beat, args=(every_s,), daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.store.heartbeat(self.key, self.run_id)
            except OSError:  # a missed beat is retried; gc's grace period is much longer
                pass

    def end(self) -> None:
        self._stop.set()
        self.store.end_lease(self.key, self.run_id)


class Progress:
    """One line on stderr: videos done/failed of total, frames/s, shards; quiet when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and total > 0
        self.done = self.failed = self.frames = self.shards = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="video", desc="extract", file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int = 0, failed: int = 0, frames: int = 0, shards: int = 0) -> None:
        self.done, self.failed = self.done + done, self.failed + failed
        self.frames, self.shards = self.frames + frames, self.shards + shards
        if self.bar is not None:
            rate = self.frames / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"failed={self.failed} frames/s={rate:.1f} shards={self.shards}")
            self.bar.update(done + failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_extract(cfg: ExtractConfig, connect: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run (or dry-run) an extraction. `connect()` is called before the first use of Ray (to join or start a
    cluster); a run with nothing to compute never starts one."""
    t_start = time.perf_counter()
    used_ray: list[bool] = []

    def connect_once() -> None:  # noted, so a run that needed no Ray can say so
        if not used_ray:
            used_ray.append(True)
            connect()

    store = FeatureStore(cfg.store, cfg.storage_options)
    spec = resolve_feature_spec(cfg)
    key = spec.key
    refs = list_videos(cfg.videos, cfg.storage_options)
    snapshot = store.open(key) if key in store.keys() else None
    failures = snapshot.failures if snapshot else FAILURES_SCHEMA.empty_table()
    inputs = identify_videos(refs, snapshot, cfg.storage_options, connect_once)
    plan = make_plan(inputs, index_for_inputs(snapshot, inputs), failures, max_attempts=cfg.max_attempts,
                     segment_frames=cfg.sampling.segment_frames, retry_failed=cfg.retry_failed)
    base = {"store": cfg.store, "key": key, "teacher": cfg.teacher.model, "videos_total": len(refs)}
    if cfg.dry_run:
        return {**base, "dry_run": True, **plan.summary(),
                "compute": [w.source for w in plan.compute],
                "quarantined": [{"source": v.source, "why": why} for v, why in plan.quarantined],
                "unreadable": [{"source": v.source, "why": v.error} for v in plan.unreadable]}

    store.ensure_key(spec)
    run_id = new_run_id()
    lease = Lease(store, key, run_id)
    judged_by = judge_version()

    def new_batch(**kw: Any) -> CommitBatch:
        return CommitBatch(run_id=run_id, max_attempts=cfg.max_attempts, judged_by=judged_by, **kw)

    pending = new_batch(metadata_updates=plan.metadata_updates)
    for v in plan.unreadable:
        pending.failures.append(json.loads(failure_record(sha256="", source=v.source, stage="read",
                                                          error=v.error.split(":")[0], message=v.error)))
    counters: Counter = Counter()
    failures_by_reason: Counter = Counter(f["error"] for f in pending.failures)
    timing: Counter = Counter()
    expected = {w.sha256: None for w in plan.compute}  # segments still to come, filled from the first row
    got: dict[str, int] = defaultdict(int)
    have = {w.sha256: len(w.have_segments) for w in plan.compute}
    failed_before = {w.sha256 for w in plan.compute if w.attempts}  # their ledger entries clear on success
    progress = Progress(len(plan.compute), cfg.progress)
    last_commit = time.perf_counter()
    teacher_spans: list[tuple[float, float]] = []  # (first teacher call start, last end) per shard

    def commit() -> None:
        nonlocal pending, last_commit
        if not pending.empty():
            store.commit(key, pending)
        pending = new_batch()
        last_commit = time.perf_counter()

    failed_ids: set[str] = set()
    try:  # the lease must stop with the run, also when it fails (a long-lived caller goes on)
        if plan.compute:
            connect_once()
            ds = build_dataset(cfg, spec, store, key, run_id, plan)
            for row in ds.iter_rows():
                p = json.loads(row["payload"])
                if "failure" in p:
                    f = {**p["failure"], "cause": cause_of(p["failure"]["error"], p["failure"].get("retryable", True))}
                    if f["failure_id"] in failed_ids:  # a video failing on several segments fails once per run
                        continue
                    failed_ids.add(f["failure_id"])
                    pending.failures.append(f)
                    failures_by_reason[f["error"]] += 1
                    counters["videos_failed"] += 1
                    expected.pop(f["video_sha256"], None)
                    progress.update(failed=1)
                else:
                    rec = ShardRecord(**p["shard"])
                    pending.shards.append(rec)
                    pending.rows.extend(p["rows"])
                    pending.shard_stats[rec.name] = TargetStats(**p["stats"])
                    pending.shard_fidelity[rec.name] = Fidelity(**p["fidelity"])
                    pending.stats = pending.stats.merge(pending.shard_stats[rec.name])
                    pending.fidelity = pending.fidelity.merge(pending.shard_fidelity[rec.name])
                    timing.update(p["timing"])
                    counters["samples_written"] += rec.count
                    counters["bytes_written"] += rec.bytes
                    counters["shards_written"] += 1
                    frames = rec.count * cfg.sampling.segment_frames
                    counters["frames_computed"] += frames
                    if p.get("teacher_span"):
                        teacher_spans.append(tuple(p["teacher_span"]))
                    finished = 0
                    for r in p["rows"]:
                        sha = r["video_sha256"]
                        got[sha] += 1
                        if sha in expected and got[sha] + have[sha] >= r["segments_total"]:
                            expected.pop(sha)
                            if sha in failed_before:
                                pending.succeeded.append(f"sha:{sha}")
                            finished += 1
                    counters["videos_new_ok"] += finished
                    progress.update(done=finished, frames=frames, shards=1)
                if len(pending.shards) >= cfg.commit_every_shards or time.perf_counter() - last_commit > cfg.commit_every_s:
                    commit()
        commit()
    finally:
        progress.close()
        lease.end()
    snap = store.open(key)

    wall = time.perf_counter() - t_start
    n_inputs = len(refs)
    failed = counters["videos_failed"] + len(plan.unreadable) + len(plan.quarantined) + len(expected)
    if plan.quarantined:
        failures_by_reason["quarantined"] += len(plan.quarantined)
    frames_computed = counters["frames_computed"]
    result = {
        **base,
        "version": snap.version,
        "run_id": run_id,
        "videos_ok": len(plan.reused) + counters["videos_new_ok"],
        "videos_failed": failed,
        "videos_reused": len(plan.reused),
        "videos_quarantined": len(plan.quarantined),
        "videos_duplicate": len(plan.duplicates),
        "failures_by_reason": dict(failures_by_reason),
        "samples": snap.manifest["counts"]["samples"],
        "samples_written": counters["samples_written"],
        "shards": len(snap.shards),
        "shards_written": counters["shards_written"],
        "bytes_written": counters["bytes_written"],
        "frames_computed": frames_computed,
        "frames_reused": plan.frames_reused,
        "metadata_updates": len(plan.metadata_updates),
        "wall_s": round(wall, 3),
        "used_ray": bool(used_ray),
        "frames_per_s": round(frames_computed / wall, 2) if wall else None,
        "steady_frames_per_s": steady_rate(frames_computed, teacher_spans),
        "stage_busy_s": {k: round(v, 3) for k, v in timing.items()},
        "stage_frames_per_s": {k.removesuffix("_s"): round(frames_computed / v, 2) for k, v in timing.items() if v},
        "fidelity": snap.manifest.get("fidelity"),
    }
    if n_inputs and failed / n_inputs > cfg.max_failure_fraction:
        result["_exit_code"] = 3
        result["error"] = (f"{failed} of {n_inputs} videos failed (more than --max-failure-fraction "
                           f"{cfg.max_failure_fraction}); see `subsume store failures {cfg.store} {key}`")
    return result


def _quiet_ray_data():
    """Our own progress line says what matters: no Ray Data progress bars or progress log lines on the console
    (ray-data.log in the session folder keeps everything). Returns the DataContext."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)
    return ctx


def build_dataset(cfg: ExtractConfig, spec: FeatureSpec, store: FeatureStore, key: str, run_id: str, plan: Plan):
    import ray
    from ray.data import ActorPoolStrategy

    ctx = _quiet_ray_data()
    ctx.execution_options.preserve_order = False
    if cfg.object_store_memory_gb:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=cfg.object_store_memory_gb * 1e9)
    actors = cluster_actor_plan(cfg.device, teacher_actors=cfg.teacher_actors,
                                decode_concurrency=cfg.decode_concurrency)
    use_gpu = actors.teacher_gpus > 0
    n_decode = actors.decode_actors
    items = [w.to_row() for w in plan.compute]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * n_decode))
    ds = ds.map_batches(
        DecodeStage, batch_size=1,
        compute=ActorPoolStrategy(min_size=1, max_size=n_decode, max_tasks_in_flight_per_actor=cfg.max_in_flight),
        num_cpus=actors.decode_cpus,
        fn_constructor_kwargs=dict(sampling=asdict(spec.sampling), preprocess=asdict(spec.preprocess),
                                   storage=asdict(spec.storage), timeout_s=cfg.decode_timeout,
                                   storage_options=cfg.storage_options, limits=asdict(cfg.decode_limits)),
    )
    ds = ds.map_batches(
        TeacherStage, batch_size=max(1, cfg.batch_size // spec.sampling.segment_frames),
        compute=ActorPoolStrategy(size=actors.teacher_actors, max_tasks_in_flight_per_actor=cfg.max_in_flight),
        num_gpus=actors.teacher_gpus,
        num_cpus=actors.teacher_cpus,
        fn_constructor_kwargs=dict(teacher=asdict(cfg.teacher), size=cfg.size,
                                   device="cuda" if use_gpu else ("cpu" if cfg.device == "auto" else cfg.device),
                                   precision=cfg.teacher.precision, batch_size=cfg.batch_size, storage=asdict(spec.storage),
                                   segment_frames=spec.sampling.segment_frames,
                                   cpu_threads=actors.teacher_threads,
                                   expect=dict(fingerprint=spec.teacher_fingerprint, embed_dim=spec.embed_dim,
                                               output_used=spec.output_used)))
    ds = ds.map_batches(
        WriteStage, batch_size=cfg.samples_per_shard, num_cpus=0,
        compute=ActorPoolStrategy(min_size=1, max_size=n_decode, max_tasks_in_flight_per_actor=cfg.max_in_flight),
        fn_constructor_kwargs=dict(root=store.root, storage_options=store.storage_options, key=key, run_id=run_id,
                                   storage=asdict(spec.storage)))
    return ds
