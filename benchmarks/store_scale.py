"""store_scale: what one commit costs as a KEY grows. A 512-row batch is committed (a real `FeatureStore.commit`:
shard records, index append) to KEYs holding 10^4, 10^5 and 10^6 synthetic samples, on the local disk and on
S3 (moto's server in a child process). The committing process is a fresh child, so its peak RSS is its own.

Value: median commit time on the largest KEY over the smallest (the worse of the two backends; the median of
a committing process's commits after its first, which also loads the tables' state, reported apart), target
<= 1.5. Also: the committing process's peak RSS ratio (<= 1.3), the time to open the largest KEY's latest
version (handles; then its manifest, an aggregation over its index), and the time to plan 10^4 new videos
against it. The KEYs are built fast but realistically: the index as one data file per 512 rows (what a run of
512-row commits leaves behind, within 2x: about 1,000 rows per file came out), then a Delta checkpoint, as
delta-rs writes every 100 commits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.report import BenchResult, Target, sig

NAME = "store_scale"
TARGET = Target(1.5, higher_is_better=False)
RSS_TARGET = 1.3
SEGMENTS_PER_VIDEO = 2
SAMPLES_PER_SHARD = 64


def synthetic_spec():
    from feature_store.spec import FeatureSpec, PreprocessSpec, SamplingSpec, StorageSpec, TeacherSpec

    return FeatureSpec(teacher=TeacherSpec(model="synthetic"), teacher_fingerprint="0" * 64,
                       teacher_class="Synthetic", embed_dim=16, output_used="cls",
                       preprocess=PreprocessSpec(resize=64, crop=64, mean=(0.5,) * 3, std=(0.5,) * 3),
                       sampling=SamplingSpec(fps=2.0, segment_frames=8), storage=StorageSpec())


def synthetic_rows(start: int, n: int, run: str) -> pa.Table:
    """n index rows (INDEX_SCHEMA) of videos start/2.., two segments each, 64 samples per shard name."""
    from feature_store.records import INDEX_SCHEMA

    i = np.arange(start, start + n)
    vid = i // SEGMENTS_PER_VIDEO
    sha = [f"{v:032x}"[::-1] * 2 for v in vid]  # unique in the first 32 hex digits, as content hashes are
    seg = (i % SEGMENTS_PER_VIDEO).astype(np.int32)
    t = 8
    return pa.table({
        "sample_key": [f"{s[:32]}-s{g:05d}" for s, g in zip(sha, seg)],
        "video_sha256": sha,
        "video_id": [f"v{v}" for v in vid],
        "source": [f"s3://corpus/videos/{v // 1000:05d}/v{v}.mp4" for v in vid],
        "source_raw": pa.nulls(n, pa.binary()),
        "segment": seg, "segments_total": np.full(n, SEGMENTS_PER_VIDEO, np.int32),
        "frame_indices": pa.array([list(range(k * t, k * t + t)) for k in seg], pa.list_(pa.int64())),
        "timestamps": pa.array([[x / 2 for x in range(t)]] * n, pa.list_(pa.float64())),
        "labels": pa.array([[("class", f"c{v % 400}")] for v in vid], pa.map_(pa.string(), pa.string())),
        "shard": [f"shards/{run}-{k // SAMPLES_PER_SHARD:08d}.tar" for k in i],
        "num_frames": np.full(n, 300, np.int32), "decoder": ["decord"] * n,
        "video_size": np.full(n, 10_000_000, np.int64), "video_mtime": np.full(n, 1.7e9),
    }, schema=INDEX_SCHEMA)


def shard_rows(start: int, n: int, run: str) -> pa.Table:
    from feature_store.records import SHARDS_SCHEMA

    first, last = start // SAMPLES_PER_SHARD, (start + n - 1) // SAMPLES_PER_SHARD
    k = np.arange(first, last + 1)
    m = len(k)
    return pa.table({
        "name": [f"shards/{run}-{x:08d}.tar" for x in k], "count": np.full(m, SAMPLES_PER_SHARD, np.int64),
        "bytes": np.full(m, 2_000_000, np.int64), "sha256": ["0" * 64] * m, "run_id": [run] * m,
        "stats_n": np.full(m, SAMPLES_PER_SHARD * 8, np.int64),
        "stats_sum": pa.array([[0.0] * 16] * m, pa.list_(pa.float64())),
        "stats_sumsq": pa.array([[float(SAMPLES_PER_SHARD * 8)] * 16] * m, pa.list_(pa.float64())),
        "fid_n": np.zeros(m, np.int64), "fid_sum": np.zeros(m), "fid_min": np.ones(m),
    }, schema=SHARDS_SCHEMA)


def build_key(root: str, n: int, batch: int) -> str:
    """A KEY of n samples: Delta data files of `batch` rows each, shard records, a checkpoint."""
    from deltalake import DeltaTable, write_deltalake

    from feature_store.store import FeatureStore

    store = FeatureStore(root)
    key = store.ensure_key(synthetic_spec())
    t = store.tables(key)
    run = "20250101000000-bulk0000"
    chunk = 50_000
    for start in range(0, n, chunk):
        rows = synthetic_rows(start, min(chunk, n - start), run)
        write_deltalake(t.index.uri, rows.to_batches(max_chunksize=batch), mode="append", storage_options=t.index.options,
                        target_file_size=_bytes_per_rows(rows, batch))
        write_deltalake(t.shards.uri, shard_rows(start, rows.num_rows, run), mode="append",
                        storage_options=t.shards.options)
    for loc in (t.index, t.shards):
        DeltaTable(loc.uri, storage_options=loc.options).create_checkpoint()
    return key


def _bytes_per_rows(rows: pa.Table, batch: int) -> int:
    """A target file size that gives files of about `batch` rows (compressed Parquet is ~1/6 of Arrow here)."""
    return max(16_384, int(rows.nbytes / rows.num_rows * batch / 6))


def child(root: str, key: str, start: int, batch: int, commits: int) -> dict[str, Any]:
    """In a fresh process: `commits` real commits of `batch` rows; their times and this process's peak RSS."""
    from feature_store.records import CommitBatch, ShardRecord, table_rows
    from feature_store.store import FeatureStore

    store = FeatureStore(root)
    rss0 = _peak_rss_kib()
    times = []
    for c in range(commits):
        run = f"20260101000000-bench{c:03d}"
        rows = table_rows(synthetic_rows(start + c * batch, batch, run))
        shards = [ShardRecord(name=r["name"], count=r["count"], bytes=r["bytes"], sha256=r["sha256"])
                  for r in shard_rows(0, batch, run).to_pylist()]
        t0 = time.perf_counter()
        store.commit(key, CommitBatch(shards=shards, rows=rows, run_id=run))
        times.append(time.perf_counter() - t0)
    return {"commit_s": times, "rss_before_kib": rss0, "peak_rss_kib": _peak_rss_kib()}


def _peak_rss_kib() -> int:
    """This process's peak RSS. Linux: VmHWM of its own address space (getrusage's ru_maxrss would include
    the parent's RSS at fork, before exec)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _run_child(root: str, key: str, start: int, batch: int, commits: int, env: dict[str, str]) -> dict[str, Any]:
    code = ("import json,sys; from benchmarks.store_scale import child; "
            f"print(json.dumps(child({root!r}, {key!r}, {start}, {batch}, {commits})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    return json.loads(out.stdout.strip().splitlines()[-1])


def open_and_plan(root: str, key: str, new_videos: int) -> dict[str, Any]:
    """Open the latest version (handles, then the manifest), and plan `new_videos` new inputs against it."""
    from feature_store.store import FeatureStore
    from pipeline.plan import VideoInput, index_for_inputs, index_for_listing, known_hashes, make_plan

    t0 = time.perf_counter()
    snap = FeatureStore(root).open(key)
    t_open = time.perf_counter() - t0
    counts = snap.manifest["counts"]
    t_manifest = time.perf_counter() - t0 - t_open
    inputs = [VideoInput(f"s3://corpus/new/n{i}.mp4", f"n{i}", {"class": "c1"}, size=5, mtime=1.0)
              for i in range(new_videos)]
    t1 = time.perf_counter()
    stats = [(v.source, v.size, v.mtime) for v in inputs]  # what pipeline.extract does, less the hashing
    known = known_hashes(stats, index_for_listing(snap, stats))
    for v, sha in zip(inputs, known):
        v.sha256 = sha or f"{abs(hash(v.source)):032x}" * 2
    plan = make_plan(inputs, index_for_inputs(snap, inputs), snap.failures, max_attempts=3, segment_frames=8)
    t_plan = time.perf_counter() - t1
    return {"open_s": sig(t_open), "manifest_s": sig(t_manifest), "samples": counts["samples"],
            "plan_s": sig(t_plan), "planned_to_compute": len(plan.compute)}


def _list_log_s(root: str, key: str) -> float:
    """One listing of the index table's log (delta-rs lists it after each commit to move its handle on):
    moto answers a prefix listing by scanning every object of the bucket, S3 by its index."""
    from feature_store import fsutil
    from feature_store.store import FeatureStore

    store = FeatureStore(root)
    path = fsutil.join(store.tables(key).index.path, "_delta_log")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fsutil.listdir(store.fs, path)
        times.append(time.perf_counter() - t0)
    return sig(float(np.median(times)))


def moto_server() -> tuple[str, subprocess.Popen]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return endpoint, proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _backend(name: str, workdir: Path, sizes: tuple[int, ...], batch: int, commits: int, plan_videos: int,
             log) -> dict[str, Any]:
    env = dict(os.environ)
    proc = None
    if name == "s3":
        import boto3

        endpoint, proc = moto_server()
        creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint}
        os.environ.update(creds)
        env.update(creds)
        for n in sizes:  # a bucket per KEY: moto lists a prefix by scanning its whole bucket, S3 does not
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=f"bench-{n}")
    try:
        out: dict[str, Any] = {}
        for n in sizes:
            root = f"s3://bench-{n}/store" if name == "s3" else str(workdir / f"store-{n}")
            t0 = time.perf_counter()
            key = build_key(root, n, batch)
            log(f"{NAME}: {name} KEY of {n} samples built in {time.perf_counter() - t0:.1f} s; committing")
            res = _run_child(root, key, n, batch, commits, env)
            steady = res["commit_s"][1:] or res["commit_s"]  # the first also loads the tables' state
            out[str(n)] = {"commit_s_median": sig(float(np.median(steady))),
                           "first_commit_s": sig(res["commit_s"][0]),
                           "commit_s": [sig(x) for x in res["commit_s"]],
                           "peak_rss_mib": sig(res["peak_rss_kib"] / 1024), "list_log_s": _list_log_s(root, key)}
            if n == max(sizes):
                out["largest_key"] = open_and_plan(root, key, plan_videos)
        return out
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
            for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.pop(k, None)


def run(session) -> BenchResult:
    cfg = session.cfg
    sizes = tuple(sorted(cfg.store_sizes))
    lo, hi = str(sizes[0]), str(sizes[-1])
    backends, notes = {}, []
    for name in cfg.store_backends:
        backends[name] = _backend(name, session.workdir, sizes, cfg.store_batch, cfg.store_commits,
                                  cfg.store_plan_videos, session.log)
    opened = {b: r.pop("largest_key") for b, r in backends.items()}
    ratios = {b: sig(r[hi]["commit_s_median"] / r[lo]["commit_s_median"]) for b, r in backends.items()}
    rss = {b: sig(r[hi]["peak_rss_mib"] / r[lo]["peak_rss_mib"]) for b, r in backends.items()}
    value = max(ratios.values())
    if max(rss.values()) > RSS_TARGET:
        notes.append(f"peak RSS of the committing process grew {max(rss.values())}x (target <= {RSS_TARGET})")
    summary = "; ".join(f"{b}: {r[lo]['commit_s_median'] * 1000:.0f} -> {r[hi]['commit_s_median'] * 1000:.0f} ms "
                        f"per commit, RSS x{rss[b]}" for b, r in backends.items())
    summary += "; " + "; ".join(f"{b} {hi}: open {o['open_s']:.2f} s (+{o['manifest_s']:.1f} s manifest), plan "
                                f"{cfg.store_plan_videos} videos {o['plan_s']:.1f} s" for b, o in opened.items())
    figures = {"sizes": list(sizes), "batch": cfg.store_batch, "backends": backends, "commit_ratio": ratios,
               "peak_rss_ratio": rss, "rss_target": RSS_TARGET, "largest_key": opened}
    return BenchResult(NAME, value, TARGET, summary, figures, notes)
