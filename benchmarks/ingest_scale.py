"""ingest_scale: the extraction driver's peak memory and planning time at two corpus sizes (10^4 and 10^5
input videos by default).

The corpus at size N is a folder of N real H.264 files: `ingest_new` distinct tiny videos (subsume.sample_data)
under new/, and N - ingest_new hardlinks of one more tiny video under known/ (100 per folder), which a
synthetic index in the KEY already lists as extracted (one complete segment each, under its own content hash,
with the size and mtime the listing sees). So planning runs over the whole listing (list, join against the
index, ledger, work list) while the real run computes only the `ingest_new` new videos and reuses the rest:
a fixed amount of compute at both sizes, and everything that grows with N is ingest.

Each measurement is a fresh driver process (`child`): `extract --dry-run` (run_extract with dry_run) and a
real run, connected to a separate Ray cluster started for the benchmark (`ray start --head`), so the driver's
RSS is the driver's own. Peak RSS is sampled with psutil (and the kernel's VmHWM beside it).

Value: the driver's peak RSS at the largest size over the smallest, the worse of dry run and real run;
target <= 1.3. Also: planning wall time at each size (listing + joins + plan, from the run's own
`planning_s`; resolving the KEY, a teacher fingerprint, is reported apart).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.report import BenchResult, Target, sig

NAME = "ingest_scale"
TARGET = Target(1.3, higher_is_better=False)
# The benchmark's own cluster and its drivers: no token authentication (a local cluster; as the tests do)
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_agent_register_timeout_ms": "300000",
           "RAY_raylet_start_wait_time_s": "300"}
PER_FOLDER = 100
LINKS_PER_INODE = 50_000
SAMPLES_PER_SHARD = 64
VIDEO_SIZE, VIDEO_FRAMES, SEGMENT = 32, 16, 8


# -- the corpus and the KEY it is planned against --------------------------------------------------------

def make_videos(folder: Path, n_new: int, fps: float, seed: int) -> tuple[list[Path], Path]:
    """`n_new` distinct tiny videos and one more (the one the known files are hardlinks of)."""
    from subsume.sample_data import generate_videos

    if not (folder / "manifest.csv").exists():
        generate_videos(folder, n_new + 1, seed=seed, size=VIDEO_SIZE, frames=VIDEO_FRAMES, fps=fps)
    files = sorted((folder / "videos").glob("*.mp4"))
    return files[:n_new], files[n_new]


def build_corpus(root: Path, n: int, new: list[Path], known_from: Path) -> list[str]:
    """root/new/*.mp4 (copies) and root/known/DDDDD/kNNNNNNN.mp4 (hardlinks of ../base/*.mp4, copies of
    `known_from`); returns the known paths."""
    (root / "new").mkdir(parents=True, exist_ok=True)
    for p in new:
        shutil.copyfile(p, root / "new" / p.name)
    known = []
    for i in range(n - len(new)):
        if i % LINKS_PER_INODE == 0:  # a file system caps the links to one inode (ext4: 65,000)
            base = root.parent / "base" / f"b{i // LINKS_PER_INODE:03d}.mp4"  # outside the listed folder
            base.parent.mkdir(exist_ok=True)
            shutil.copyfile(known_from, base)
        d = root / "known" / f"{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            d.mkdir(parents=True, exist_ok=True)
        path = d / f"k{i:08d}.mp4"
        os.link(base, path)
        known.append(str(path))
    return known


def seed_index(store_root: str, spec: Any, known: list[str]) -> str:
    """The KEY with one complete one-segment video per known file (a content hash of its own, the size and
    mtime the listing reports), in Delta data files of 512 rows and a checkpoint, as a long history leaves."""
    from deltalake import DeltaTable, write_deltalake

    from feature_store.records import INDEX_SCHEMA, SHARDS_SCHEMA
    from feature_store.store import FeatureStore
    from pipeline.sources import stat_video

    store = FeatureStore(store_root)
    key = store.ensure_key(spec)
    t = store.tables(key)
    stats = {}  # per inode: the links of one base file share its size and mtime
    for start in range(0, len(known), 50_000):
        part = known[start:start + 50_000]
        n = len(part)
        i = np.arange(start, start + n)
        sha = [hashlib.sha256(b"seed-%d" % k).hexdigest() for k in i]  # stand-ins, spread like real hashes
        shard = [f"shards/seed-{k // SAMPLES_PER_SHARD:08d}.tar" for k in i]
        st = [stats.setdefault(os.stat(p).st_ino, stat_video(p)) for p in part]
        rows = pa.table({
            "sample_key": [f"{s[:32]}-s00000" for s in sha], "video_sha256": sha,
            "video_id": [Path(p).relative_to(Path(p).parents[2]).with_suffix("").as_posix() for p in part],
            "source": part, "source_raw": pa.nulls(n, pa.binary()), "segment": np.zeros(n, np.int32),
            "segments_total": np.ones(n, np.int32),
            "frame_indices": pa.array([list(range(SEGMENT))] * n, pa.list_(pa.int64())),
            "timestamps": pa.array([[x / 12 for x in range(SEGMENT)]] * n, pa.list_(pa.float64())),
            "labels": pa.array([[]] * n, pa.map_(pa.string(), pa.string())), "shard": shard,
            "num_frames": np.full(n, VIDEO_FRAMES, np.int32), "decoder": ["decord"] * n,
            "video_size": [x.size for x in st], "video_mtime": [x.mtime for x in st]}, schema=INDEX_SCHEMA)
        write_deltalake(t.index.uri, rows.to_batches(max_chunksize=512), mode="append",
                        storage_options=t.index.options)
        names = sorted(set(shard))
        m = len(names)
        write_deltalake(t.shards.uri, pa.table({
            "name": names, "count": np.full(m, SAMPLES_PER_SHARD, np.int64), "bytes": np.full(m, 1000, np.int64),
            "sha256": ["0" * 64] * m, "run_id": ["seed"] * m, "stats_n": np.zeros(m, np.int64),
            "stats_sum": pa.array([[]] * m, pa.list_(pa.float64())),
            "stats_sumsq": pa.array([[]] * m, pa.list_(pa.float64())), "fid_n": np.zeros(m, np.int64),
            "fid_sum": np.zeros(m), "fid_min": np.ones(m)}, schema=SHARDS_SCHEMA), mode="append",
            storage_options=t.shards.options)
    for loc in (t.index, t.shards):
        DeltaTable(loc.uri, storage_options=loc.options).create_checkpoint()
    return key


# -- one driver, in a fresh process --------------------------------------------------------------------

def child(args: dict[str, Any]) -> dict[str, Any]:
    """One `run_extract` (dry run or real) in this process: wall, plan_run's wall, this process's peak RSS."""
    import threading

    import psutil

    me = psutil.Process()
    peak, stop = [me.memory_info().rss], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], me.memory_info().rss)

    import ray

    import pipeline.extract as ex

    base = me.memory_info().rss
    threading.Thread(target=sample, daemon=True).start()
    cfg = extract_config(args)
    t0 = time.perf_counter()
    out = ex.run_extract(cfg, connect=lambda: ray.init(address=args["address"], log_to_driver=False))
    wall = time.perf_counter() - t0
    stop.set()
    peak[0] = max(peak[0], me.memory_info().rss)
    keep = ("to_compute", "reused", "videos_total", "videos_ok", "videos_reused", "videos_failed", "frames_computed",
            "videos_duplicate", "versions_committed")
    steps = out["planning_s"]  # run_extract's own step times: key (teacher fingerprint), listing, joining, planning
    plan_s = sum(v for k, v in steps.items() if k != "key_s")
    return {"wall_s": wall, "plan_s": plan_s, "planning_steps_s": steps, "peak_rss": peak[0], "base_rss": base, "vmhwm": _vmhwm(),
            **{k: out[k] for k in keep if k in out}}


def extract_config(args: dict[str, Any]):
    """The settings of every run of this benchmark (the seeded KEY is the KEY they resolve to)."""
    from feature_store.spec import SamplingSpec, TeacherSpec
    from pipeline.extract import ExtractConfig

    return ExtractConfig(videos=args["videos"], store=args["store"], teacher=TeacherSpec(model=args["teacher"]),
                         sampling=SamplingSpec(fps=args["fps"], segment_frames=SEGMENT),
                         dry_run=bool(args.get("dry_run")), progress=False, samples_per_shard=SAMPLES_PER_SHARD,
                         batch_size=32)


def _vmhwm() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _run_child(args: dict[str, Any]) -> dict[str, Any]:
    code = "import json,sys; from benchmarks.ingest_scale import child; print(json.dumps(child(json.loads(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parent.parent), timeout=3600, env={**os.environ, **RAY_ENV})
    if out.returncode:
        raise RuntimeError(f"driver failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- a separate Ray cluster ------------------------------------------------------------------------------

def start_cluster(cpus: int = 4) -> tuple[str, str]:
    """`ray start --head` in a temp dir of its own; (address, temp dir)."""
    import socket

    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp = tempfile.mkdtemp(prefix="ray-ingest-", dir="/tmp")
    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free_port()
    for attempt in range(3):  # a loaded machine can time a node's start-up out: try again
        # the dashboard agent's fixed default port (52365) is taken by any other Ray on the machine
        done = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--num-cpus={cpus}",
                               f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=false",
                               "--disable-usage-stats", f"--temp-dir={temp}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=300, env={**os.environ, **RAY_ENV})
        if done.returncode == 0:
            return f"127.0.0.1:{port}", temp
        stop_cluster(temp, remove=False)
    raise RuntimeError(f"ray start failed 3 times: {done.stderr[-2000:]}")


def stop_cluster(temp: str, remove: bool = True) -> None:
    """Stop only this cluster's processes (found by its temp dir), never every Ray on the machine."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if remove:
        shutil.rmtree(temp, ignore_errors=True)


# -- the benchmark ---------------------------------------------------------------------------------------

def _size(session: Any, n: int, videos: tuple[list[Path], Path], address: str) -> dict[str, Any]:
    from pipeline.extract import resolve_feature_spec

    cfg = session.cfg
    root = session.workdir / f"ingest-{n}"
    shutil.rmtree(root, ignore_errors=True)  # a fresh corpus and KEY (a kept workdir may hold an earlier run's)
    t0 = time.perf_counter()
    known = build_corpus(root / "corpus", n, *videos)
    args = {"videos": str(root / "corpus"), "store": str(root / "store"), "teacher": str(session.teacher_dir("tiny")),
            "fps": cfg.fps, "address": address}
    seed_index(args["store"], resolve_feature_spec(extract_config(args)), known)
    session.log(f"{NAME}: corpus of {n} videos and its KEY built in {time.perf_counter() - t0:.1f} s")
    dry = _run_child({**args, "dry_run": True})
    session.log(f"{NAME}: {n}: dry run planned in {dry['plan_s']:.1f} s, driver peak {dry['peak_rss'] / 2**20:.0f} MiB")
    real = _run_child({**args, "dry_run": False})
    session.log(f"{NAME}: {n}: real run {real['wall_s']:.1f} s, driver peak {real['peak_rss'] / 2**20:.0f} MiB")
    shutil.rmtree(root / "corpus", ignore_errors=True)  # 10^5 links: not kept
    return {"dry_run": _figures(dry), "real": _figures(real)}


def _figures(r: dict[str, Any]) -> dict[str, Any]:
    mib = {k: sig(r[k] / 2**20) for k in ("peak_rss", "base_rss", "vmhwm")}
    rest = {k: v for k, v in r.items() if k not in ("peak_rss", "base_rss", "vmhwm")}
    return {"peak_rss_mib": mib["peak_rss"], "rss_at_start_mib": mib["base_rss"], "vmhwm_mib": mib["vmhwm"],
            **{k: sig(v) if isinstance(v, float) else v for k, v in rest.items()}}


def run(session: Any, address: str | None = None) -> BenchResult:
    """`address`: a running cluster to use (the tests' shared one); by default one is started and stopped."""
    cfg = session.cfg
    sizes = tuple(sorted(cfg.ingest_sizes))
    lo, hi = str(sizes[0]), str(sizes[-1])
    videos = make_videos(session.workdir / "ingest-videos", cfg.ingest_new, cfg.fps, cfg.seed)
    address, temp = (address, "") if address else start_cluster()
    try:
        out = {str(n): _size(session, n, videos, address) for n in sizes}
    finally:
        if temp:
            stop_cluster(temp)
    ratios = {mode: sig(out[hi][mode]["peak_rss_mib"] / out[lo][mode]["peak_rss_mib"]) for mode in ("dry_run", "real")}
    plan_ratio = sig(out[hi]["dry_run"]["plan_s"] / out[lo]["dry_run"]["plan_s"])
    notes = []
    for n in sizes:
        dry, real = out[str(n)]["dry_run"], out[str(n)]["real"]
        if (dry["to_compute"], dry["reused"], real["videos_ok"], real["videos_reused"]) != (
                cfg.ingest_new, n - cfg.ingest_new, n, n - cfg.ingest_new):
            notes.append(f"{n}: the runs did not plan and compute exactly the {cfg.ingest_new} new videos and reuse "
                         f"the rest (dry run {dry}, real {real})")
    summary = (f"driver peak RSS {lo} -> {hi} videos: dry run x{ratios['dry_run']}, real run x{ratios['real']}; "
               f"planning {out[lo]['dry_run']['plan_s']:.1f} -> {out[hi]['dry_run']['plan_s']:.1f} s")
    figures = {"sizes": list(sizes), "new_videos": cfg.ingest_new,
               "corpus": "N real files: ingest_new distinct tiny H.264 videos + hardlinks of one more, which a "
                         "synthetic index lists as extracted (the real run computes only the new ones)",
               "runs": out, "peak_rss_ratio": ratios, "plan_time_ratio": plan_ratio}
    return BenchResult(NAME, max(ratios.values()), TARGET, summary, figures, notes)
