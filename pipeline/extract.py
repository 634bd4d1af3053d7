"""The extraction job: videos → (Ray Data) decode → teacher actor pool → shards → commits to the store.

The driver plans (what to compute, reuse, skip), streams the pipeline's small per-shard results back,
and commits them to the KEY every few shards or seconds, so a killed run loses at most the shards
since its last commit and a rerun finishes the rest. A small work list with no Ray cluster in sight runs
the same stages in this process instead (pipeline.local; `choose_executor`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_store.spec import FeatureSpec, SamplingSpec, StorageSpec, TeacherSpec
from feature_store.ledger import FAILURES_SCHEMA, judge_version
from feature_store.runs import write_run
from feature_store.scan import Match
from feature_store.snapshot import Snapshot
from feature_store.store import HEARTBEAT_S, CommitBatch, FeatureStore, new_run_id
from pipeline.decode import DecodeLimits
from pipeline.plan import Plan, index_for_shas, index_for_sources, join_known, make_plan, release_memory
from pipeline.sources import hash_video, listing_table
from pipeline.records import Failure
from pipeline.results import WriterResult
from pipeline.stages import DecodeStage, TeacherStage, WriteStage, decoder_process
from pipeline.tally import Claims, CommitCadence, Tally, sha_prefixes
from pipeline.visibility import WorkListRows, ensure_visible
from pipeline.worklist import VIDEOS_PER_BLOCK, WorkList, work_blocks  # noqa: F401  (VIDEOS_PER_BLOCK: API)


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
    executor: str = "auto"  # "ray", "local" (this process, no Ray) or "auto" (see choose_executor)


# "auto" runs a work list in this process, without Ray, when it is at most this many videos and bytes and no
# Ray cluster is addressed or running here: starting Ray and its actors costs ~10 s on a small machine, more
# than such a job takes (docs/benchmarks.md, `extraction`); past these sizes Ray's actor pools win.
LOCAL_MAX_VIDEOS = 256
LOCAL_MAX_BYTES = 256 * 2**20
EXECUTORS = ("auto", "ray", "local")


def choose_executor(requested: str, videos: int, video_bytes: int, *, ray_in_use: bool) -> str:
    """"ray" or "local" for a work list of `videos` files of `video_bytes` in all. `ray_in_use`: a cluster
    address is set (RAY_ADDRESS) or this process already runs Ray; "auto" then keeps to Ray."""
    if requested not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, not {requested!r}")
    if requested != "auto":
        return requested
    small = videos <= LOCAL_MAX_VIDEOS and video_bytes <= LOCAL_MAX_BYTES
    return "local" if small and not ray_in_use else "ray"


def _ray_in_use() -> bool:
    import os

    ray = sys.modules.get("ray")  # not imported: not running here (and no import just to ask)
    return bool(os.environ.get("RAY_ADDRESS")) or bool(ray is not None and ray.is_initialized())


def resolve_feature_spec(cfg: ExtractConfig) -> FeatureSpec:
    """The KEY's definition for this run's settings (see feature_store.teacher.feature_spec_for)."""
    from feature_store.teacher import feature_spec_for

    return feature_spec_for(cfg.teacher, cfg.sampling, cfg.storage, size=cfg.size)


def hash_failed_sources(listing: pa.Table, failures: pa.Table, storage_options: dict[str, Any]) -> pa.Table:
    """Hash now the few new files whose source has a failure on record, so that the ledger (keyed by content)
    decides about them at planning; every other new file is hashed by the decode stage as it reads it."""
    if not failures.num_rows:
        return listing
    mask = pc.and_(pc.and_(pc.equal(listing.column("sha256"), ""), pc.equal(listing.column("error"), "")),
                   pc.is_in(listing.column("source"), value_set=failures.column("source")))
    rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    if not len(rows):
        return listing
    from concurrent.futures import ThreadPoolExecutor

    from feature_store.names import decode_name

    sources = listing.select(["source", "source_raw"]).take(pa.array(rows)).to_pylist()

    def _hash(r: dict[str, Any]) -> str:
        try:
            return hash_video(decode_name(r["source"], r["source_raw"]), storage_options)
        except OSError:  # unreadable now: the decode stage records why
            return ""

    with ThreadPoolExecutor(max_workers=8) as pool:
        hashes = list(pool.map(_hash, sources))
    sha = listing.column("sha256").combine_chunks().to_numpy(zero_copy_only=False).copy()
    sha[rows] = hashes
    return listing.set_column(listing.schema.get_field_index("sha256"), "sha256", pa.array(sha, pa.string()))


def steady_rate(frames: int, teacher_spans: list[tuple[float, float]]) -> float | None:
    """Frames/s while the teacher stage works: all frames over the time from its first call's start to its
    last call's end (wall clock of the actors). Ray start, actor starts, model loads and the last shard's write
    are outside that window; a slower decode stage still shows, as the teacher waiting inside it."""
    if not teacher_spans:
        return None
    window = max(t1 for _, t1 in teacher_spans) - min(t0 for t0, _ in teacher_spans)
    return round(frames / window, 2) if window > 0 else None


# A shard writer mostly waits on storage; it reserves this much CPU so that Ray places it on a worker node.
WRITER_CPUS = 0.25


@dataclass(frozen=True)
class ActorPlan:
    """How many decode and teacher actors the pipeline runs, and what each reserves from Ray."""

    decode_actors: int  # the decode pool's largest size (Ray Data grows it from one while decoding lags)
    decode_cpus: float
    teacher_actors: int
    teacher_cpus: float
    teacher_gpus: float
    teacher_threads: int  # torch intra-op threads of each teacher actor; 0 leaves torch's default (GPU)
    writer_actors: int = 1  # the writer pool's largest size
    writer_cpus: float = WRITER_CPUS  # reserved, so no writer is placed on a 0-CPU head node


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
        n_writer = max(1, min(4, int(cpus) // 4))
        n_decode = decode_concurrency or max(1, int(cpus - 0.5 * n_teacher - WRITER_CPUS * n_writer))
        return ActorPlan(n_decode, 1.0, n_teacher, 0.5, 1.0, 0, n_writer)
    n_teacher = teacher_actors or max(1, int(cpus))
    n_decode = decode_concurrency or max(1, int(cpus) // 2)
    n_writer = max(1, min(n_decode, 4))
    decode_cpus = 0.25
    # writer CPU first, then decoders; the teachers share what is left
    teacher_cpus = max(0.05, (cpus - n_writer * WRITER_CPUS - n_decode * decode_cpus) / n_teacher)
    # torch threads: the actor's share of the cores, rounded up (a decoder's quarter core is mostly idle)
    return ActorPlan(n_decode, decode_cpus, n_teacher, math.floor(teacher_cpus * 1000) / 1000, 0.0,
                     max(1, math.ceil(teacher_cpus - 1e-6)), n_writer)


def cluster_actor_plan(device: str = "auto", *, teacher_actors: int | None = None,
                       decode_concurrency: int | None = None) -> ActorPlan:
    """`plan_actors` for the connected Ray cluster's CPUs and GPUs."""
    cpus, gpus = _cluster_resources()
    return plan_actors(cpus, gpus, device, teacher_actors=teacher_actors, decode_concurrency=decode_concurrency)


def cluster_nodes() -> list[dict[str, Any]]:
    """The cluster's nodes as the run saw them at its end: id, address, CPUs, GPUs, alive."""
    import ray

    return [{"node_id": n["NodeID"], "address": n.get("NodeManagerAddress", ""),
             "cpus": n.get("Resources", {}).get("CPU", 0.0), "gpus": n.get("Resources", {}).get("GPU", 0.0),
             "alive": bool(n.get("Alive"))} for n in ray.nodes()]


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


@dataclass
class Planned:
    """What `plan` decided: the KEY, the inputs listed, the split (compute, reuse, quarantine...) and the KEY
    version it was planned against (None: a new KEY)."""

    spec: FeatureSpec
    inputs_total: int
    plan: Plan
    snapshot: Snapshot | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # planning steps: key, listing, joining, planning

    @property
    def key(self) -> str:
        return self.spec.key


def run_extract(cfg: ExtractConfig, connect: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run (or dry-run) an extraction: plan -> run -> commit -> report. `connect()` is called before the first
    use of Ray (to join or start a cluster); a run with nothing to compute never starts one."""
    t_start = time.perf_counter()
    ray_link = _OnceConnect(connect)
    store = FeatureStore(cfg.store, cfg.storage_options)
    decoder = early_decoder(cfg)  # None unless this run may decode in this process
    try:
        planned = plan_run(cfg, store, ray_link)
        base = {"store": cfg.store, "key": planned.key, "teacher": cfg.teacher.model,
                "videos_total": planned.inputs_total, "planning_s": planned.seconds}
        if cfg.dry_run:
            return {**base, **dry_run_report(planned.plan)}
        store.ensure_key(planned.spec)
        run = ExtractionRun(cfg, store, planned, decoder)
        run.execute(ray_link)
    finally:
        if decoder is not None:
            decoder.close()
    summary = {**base, **run.report(time.perf_counter() - t_start, used_ray=ray_link.used)}
    summary["run_record"] = write_run(store, planned.key, run.run_id, summary)  # runs/<run_id>.json in the KEY
    return summary


def early_decoder(cfg: ExtractConfig) -> Any:
    """The decode stage's child process, started before planning when the run may decode in this process
    (`--executor local`, or `auto` with no cluster in use): its imports (torch, ~2 s on a small CPU) then
    overlap resolving the KEY and planning instead of delaying the first video. Closed unused if the run
    turns out to need Ray or to have nothing to compute."""
    if cfg.dry_run or cfg.executor == "ray" or (cfg.executor == "auto" and _ray_in_use()):
        return None
    return decoder_process(timeout_s=cfg.decode_timeout, limits=asdict(cfg.decode_limits))


class _OnceConnect:
    """Connects to Ray on first use, and notes it (a run that needed no Ray says so)."""

    def __init__(self, connect: Callable[[], None]):
        self._connect, self.used = connect, False

    def __call__(self) -> None:
        if not self.used:
            self.used = True
            self._connect()


def plan_run(cfg: ExtractConfig, store: FeatureStore, connect: Callable[[], None]) -> Planned:
    """List the videos (Arrow), join them against the KEY's index and failure ledger, and split them. Needs
    no Ray: new files are hashed later, by the decode stage (`connect` is kept for callers that pass it)."""
    say = StageLines(cfg.progress)
    say("key", "resolving the KEY (teacher fingerprint)")
    spec = resolve_feature_spec(cfg)
    say("listing", f"listing {cfg.videos}")
    listing = listing_table(cfg.videos, cfg.storage_options)
    say.rows = listing.num_rows
    say("joining", f"listed {listing.num_rows} videos; joining them against KEY {spec.key}")
    snapshot = store.open(spec.key) if store.has_key(spec.key) else None
    failures = snapshot.failures if snapshot else FAILURES_SCHEMA.empty_table()
    copies = snapshot.copies(["source", "video_size", "video_mtime", "video_sha256"],
                             Match("source", pc.unique(listing.column("source")))) if snapshot else None
    listing = join_known(listing, index_for_sources(snapshot, listing.column("source")), copies)
    listing = hash_failed_sources(listing, failures, cfg.storage_options)
    known = int(pc.sum(pc.not_equal(listing.column("sha256"), "")).as_py() or 0)
    say("planning", f"{known} known unchanged, {listing.num_rows - known} new or changed (hashed as they are "
                    f"decoded); planning")
    plan = make_plan(listing, index_for_shas(snapshot, listing.column("sha256")), failures,
                     max_attempts=cfg.max_attempts, segment_frames=cfg.sampling.segment_frames,
                     retry_failed=cfg.retry_failed)
    summary = plan.summary()
    say("", f"planned: {summary['to_compute']} to compute ({summary['to_complete']} to complete), {plan.reused} "
            f"reused, {len(plan.quarantined)} quarantined, {len(plan.unreadable)} unreadable, "
            f"{plan.duplicates} duplicates")
    return Planned(spec, listing.num_rows, plan, snapshot, say.seconds)


class StageLines:
    """Progress before the per-video bar: one timestamped line per step on stderr (quiet when disabled), and
    the seconds each step took (`seconds`: step -> s), which the run's report carries."""

    def __init__(self, enabled: bool):
        self.enabled, self.t0 = enabled, time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.rows = 0  # videos listed (known after listing): the steps' memory is released for a large listing
        self._step, self._since = "", self.t0

    def __call__(self, step: str, msg: str) -> None:
        release_memory(self.rows)  # a step's scratch goes back to the OS: the steps' peaks do not stack
        now = time.perf_counter()
        if self._step:
            self.seconds[f"{self._step}_s"] = round(now - self._since, 3)
        self._step, self._since = step, now
        if self.enabled:
            print(f"extract [{now - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def dry_run_report(plan: Plan) -> dict[str, Any]:
    return {"dry_run": True, **plan.summary(), "compute": plan.work.column("source").to_pylist(),
            "quarantined": [{"source": src, "why": why} for src, why in plan.quarantined],
            "unreadable": [{"source": src, "why": err} for src, err in plan.unreadable]}


def known_contents(snapshot: Snapshot | None) -> Claims:
    """Claims that know the contents the KEY version holds (8 bytes a video, one scan of one index column),
    so a new file whose bytes are already indexed under another name is a duplicate at commit."""
    if snapshot is None or snapshot.version == 0:
        return Claims()

    def lookup(shas: list[str]) -> pa.Table:
        return snapshot.index_columns(["video_sha256", "source"], Match("video_sha256", shas))

    return Claims(np.unique(sha_prefixes(snapshot.index_columns(["video_sha256"]).column("video_sha256"))), lookup)


class ExtractionRun:
    """One run that computes: holds the lease, streams the writers' results into commits, then reports."""

    def __init__(self, cfg: ExtractConfig, store: FeatureStore, planned: Planned, decoder: Any = None):
        self.cfg, self.store, self.planned, self.plan = cfg, store, planned, planned.plan
        self.run_id = new_run_id()
        self.judged_by = judge_version()
        size = int(pc.sum(self.plan.work.column("size")).as_py() or 0) if self.plan.work.num_rows else 0
        self.executor = choose_executor(cfg.executor, self.plan.work.num_rows, size, ray_in_use=_ray_in_use())
        if decoder is not None and (self.executor != "local" or not self.plan.work.num_rows):
            decoder.close()  # started before planning in case; not needed (its memory goes back now)
            decoder = None
        self.decoder = decoder  # a decoder process started before planning, for the in-process executor
        self.tally = Tally(cfg.sampling.segment_frames, partial=self.plan.partial, retrying=self.plan.retrying,
                           claims=known_contents(planned.snapshot) if self.plan.work.num_rows else Claims())
        self.cadence = CommitCadence(lambda b: store.commit(planned.key, b), self._new_batch,
                                     cfg.commit_every_shards, cfg.commit_every_s)
        self.cadence.batch.metadata_updates = list(self.plan.metadata_updates)
        for source, error in self.plan.unreadable:
            self.tally.failure(Failure("", source, "read", error.split(":")[0], error), self.cadence.batch)

    def _new_batch(self) -> CommitBatch:
        return CommitBatch(run_id=self.run_id, max_attempts=self.cfg.max_attempts, judged_by=self.judged_by)

    def execute(self, connect: Callable[[], None]) -> None:
        lease = Lease(self.store, self.planned.key, self.run_id)
        progress = Progress(self.plan.work.num_rows, self.cfg.progress)
        work = WorkList(self.store, self.planned.key, self.run_id)
        try:  # the lease must stop with the run, also when it fails (a long-lived caller goes on)
            if self.plan.work.num_rows:
                results = self._local_results() if self.executor == "local" else self._ray_results(connect, work)
                for r in results:
                    self._take(r, progress)
                    self.cadence.maybe()
            self.cadence.flush()
        finally:
            progress.close()
            work.remove()
            lease.end()

    def _ray_results(self, connect: Callable[[], None], work: WorkList) -> Iterator[WriterResult]:
        connect()
        ensure_visible(self.store.root, WorkListRows(self.plan.work))  # every node sees the local paths
        ds = build_dataset(self.cfg, self.planned.spec, self.store, self.planned.key, self.run_id, self.plan, work)
        for row in ds.iter_rows():
            yield WriterResult.from_row(row)

    def _local_results(self) -> Iterator[WriterResult]:
        from pipeline.local import LocalStages, run_local, teacher_cpu_threads

        cfg, spec, device = self.cfg, self.planned.spec, local_device(self.cfg.device)
        stages = LocalStages(decode_args(cfg, spec), teacher_args(cfg, spec, device, teacher_cpu_threads(device)),
                             writer_args(self.store, self.planned.key, self.run_id, spec),
                             teacher_batch=teacher_batch(cfg, spec), shard_size=cfg.samples_per_shard,
                             decoder=self.decoder)
        return run_local(self.plan.work, stages)

    def _take(self, r: WriterResult, progress: Progress) -> None:
        if r.failure is not None:
            if self.tally.failure(r.failure, self.cadence.batch):
                progress.update(failed=1)
        else:
            done = self.tally.shard(r, self.cadence.batch)
            progress.update(done=done, frames=r.shard.count * self.cfg.sampling.segment_frames, shards=1)

    def report(self, wall: float, *, used_ray: bool) -> dict[str, Any]:
        snap, plan, t, c = self.store.open(self.planned.key), self.plan, self.tally, self.tally.counters
        dup = plan.duplicates + c["videos_duplicate"]
        lost = max(0, plan.work.num_rows - c["videos_new_ok"] - c["videos_failed"] - c["videos_duplicate"])
        failed = c["videos_failed"] + len(plan.unreadable) + len(plan.quarantined) + lost
        reasons = Counter(t.failures_by_reason)
        if plan.quarantined:
            reasons["quarantined"] += len(plan.quarantined)
        frames = c["frames_computed"]
        result = {
            "version": snap.version, "run_id": self.run_id,
            "videos_ok": plan.reused + c["videos_new_ok"], "videos_failed": failed,
            "videos_reused": plan.reused, "videos_quarantined": len(plan.quarantined),
            "videos_duplicate": dup, "failures_by_reason": dict(reasons),
            "samples": snap.manifest["counts"]["samples"], "samples_written": c["samples_written"],
            "samples_duplicate": c["duplicate_rows"],
            "shards": len(snap.shards), "shards_written": c["shards_written"], "bytes_written": c["bytes_written"],
            "frames_computed": frames, "frames_reused": plan.frames_reused,
            "metadata_updates": len(plan.metadata_updates), "versions_committed": self.cadence.versions,
            "wall_s": round(wall, 3), "used_ray": used_ray, "executor": self.executor,
            "frames_per_s": round(frames / wall, 2) if wall else None,
            "steady_frames_per_s": steady_rate(frames, t.teacher_windows),
            "stage_busy_s": {k: round(v, 3) for k, v in t.timing.items()},
            "stage_frames_per_s": {k.removesuffix("_s"): round(frames / v, 2) for k, v in t.timing.items() if v},
            "fidelity": snap.manifest.get("fidelity"),
            "nodes": cluster_nodes() if used_ray else [],
            "stage_nodes": {stage: sorted(ids) for stage, ids in t.stage_nodes.items()},
        }
        return {**result, **self._verdict(failed)}

    def _verdict(self, failed: int) -> dict[str, Any]:
        n, cfg = self.planned.inputs_total, self.cfg
        if n and failed / n > cfg.max_failure_fraction:
            return {"_exit_code": 3, "error": f"{failed} of {n} videos failed (more than --max-failure-fraction "
                                              f"{cfg.max_failure_fraction}); see `subsume store failures "
                                              f"{cfg.store} {self.planned.key}`"}
        return {}


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


def build_dataset(cfg: ExtractConfig, spec: FeatureSpec, store: FeatureStore, key: str, run_id: str, plan: Plan,
                  work: WorkList):
    """The pipeline over the plan's work list, written as Parquet into `work` and read in blocks of at most
    VIDEOS_PER_BLOCK videos: decode (hashes what it reads) -> teacher -> writers."""
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
    work.write(plan.work, run_id, work_blocks(plan.work.num_rows, n_decode))
    ds = work.dataset().map_batches(
        DecodeStage, batch_size=1, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=n_decode, max_tasks_in_flight_per_actor=cfg.max_in_flight),
        num_cpus=actors.decode_cpus, fn_constructor_kwargs=decode_args(cfg, spec))
    device = "cuda" if use_gpu else ("cpu" if cfg.device == "auto" else cfg.device)
    ds = ds.map_batches(
        TeacherStage, batch_size=teacher_batch(cfg, spec),
        compute=ActorPoolStrategy(size=actors.teacher_actors, max_tasks_in_flight_per_actor=cfg.max_in_flight),
        num_gpus=actors.teacher_gpus, num_cpus=actors.teacher_cpus,
        fn_constructor_kwargs=teacher_args(cfg, spec, device, actors.teacher_threads))
    ds = ds.map_batches(
        WriteStage, batch_size=cfg.samples_per_shard, num_cpus=actors.writer_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=actors.writer_actors,
                                  max_tasks_in_flight_per_actor=cfg.max_in_flight),
        fn_constructor_kwargs=writer_args(store, key, run_id, spec))
    return ds


# The stages' settings, shared by the Ray pipeline and the local one (pipeline.local).
def decode_args(cfg: ExtractConfig, spec: FeatureSpec) -> dict[str, Any]:
    return dict(sampling=asdict(spec.sampling), preprocess=asdict(spec.preprocess), storage=asdict(spec.storage),
                timeout_s=cfg.decode_timeout, storage_options=cfg.storage_options, limits=asdict(cfg.decode_limits))


def teacher_args(cfg: ExtractConfig, spec: FeatureSpec, device: str, cpu_threads: int) -> dict[str, Any]:
    return dict(teacher=asdict(cfg.teacher), size=cfg.size, device=device, precision=cfg.teacher.precision,
                batch_size=cfg.batch_size, storage=asdict(spec.storage), segment_frames=spec.sampling.segment_frames,
                cpu_threads=cpu_threads, expect=dict(fingerprint=spec.teacher_fingerprint, embed_dim=spec.embed_dim,
                                                     output_used=spec.output_used))


def writer_args(store: FeatureStore, key: str, run_id: str, spec: FeatureSpec) -> dict[str, Any]:
    return dict(root=store.root, storage_options=store.storage_options, key=key, run_id=run_id,
                storage=asdict(spec.storage))


def teacher_batch(cfg: ExtractConfig, spec: FeatureSpec) -> int:
    """Segments per teacher call: `batch_size` frames."""
    return max(1, cfg.batch_size // spec.sampling.segment_frames)


def local_device(device: str) -> str:
    """The teacher's device in this process: "auto" is the first GPU if torch sees one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
