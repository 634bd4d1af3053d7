"""Multi-node: what losing a worker node mid-run costs, on a simulated cluster on this machine.

A `ray.cluster_utils.Cluster` with a 0-CPU head and two 1-CPU worker raylets (150 MiB object stores); the
1x sample set extracted twice by the real CLI (`subsume extract` in a subprocess, joined through
RAY_ADDRESS), each into a fresh store: once undisturbed, once with a worker node removed (not gracefully)
right after the run's first commit and a fresh one added. The ratio is the second run's wall time over the
first's; beside it, where each stage ran (head, the lost worker, the kept one, the added one), and whether
every video was extracted exactly once.

On 2 cores a simulated cluster shares the cores the nodes pretend to own, and the runs are short, so the
ratio is dominated by the fixed costs a lost node adds (its in-flight blocks redone, a new node and new
actors with their model loads): it bounds the cost, it does not predict it on a real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession

NAME = "multinode"
TARGET = Target(1.5, higher_is_better=False)  # wall time with a lost node over without
NODE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
OBJECT_STORE_BYTES = 150 * 2**20


def _start_cluster(temp: str):
    from ray.cluster_utils import Cluster

    os.environ.update(NODE_ENV)  # the raylets inherit it: no token auth between them and the CLI
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp, "include_dashboard": False,
                                                      "object_store_memory": OBJECT_STORE_BYTES})
    for _ in range(2):
        c.add_node(num_cpus=1, temp_dir=temp, object_store_memory=OBJECT_STORE_BYTES)
    c.wait_for_nodes()
    return c


def _cli(session: BenchSession, store: Path) -> list[str]:
    cfg = session.cfg
    exe = shutil.which("subsume", path=str(Path(sys.executable).parent)) or "subsume"
    return [exe, "extract", "--videos", session.manifest(1), "--teacher", str(session.teacher_dir(cfg.extract_teacher)),
            "--store", str(store), "--fps", str(cfg.fps), "--segment-frames", str(cfg.segment_frames),
            "--batch-size", str(cfg.extract_batch), "--samples-per-shard", "8", "--commit-every", "1",
            "--json", "--quiet"]


def _run(session: BenchSession, cluster, store: Path, *, lose_node: bool) -> dict[str, Any]:
    """One CLI extraction on the cluster; with `lose_node`, a worker is removed after the first commit."""
    env = {**os.environ, **NODE_ENV, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    roles = {cluster.head_node.node_id: "head"}
    roles.update({n.node_id: f"worker-{i + 1}" for i, n in enumerate(cluster.worker_nodes)})
    cmd = _cli(session, store)  # before the clock: it may generate the videos and build the teacher
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lost_at = None
    if lose_node:
        first = "*/tables/index/_delta_log/00000000000000000001.json"
        while proc.poll() is None and not list(store.glob(first)):
            time.sleep(0.05)
        if proc.poll() is None:
            lost = next(iter(cluster.worker_nodes))
            lost_at = time.perf_counter() - t0
            cluster.remove_node(lost, allow_graceful=False)
            roles[lost.node_id] += " (lost)"
            added = cluster.add_node(num_cpus=1, temp_dir=cluster.head_node.get_temp_dir_path(),
                                     object_store_memory=OBJECT_STORE_BYTES)
            roles[added.node_id] = "added"
    out, err = proc.communicate(timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"subsume extract exited {proc.returncode}: {err[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": sig(wall), "frames": summary["frames_computed"], "videos_ok": summary["videos_ok"],
            "videos_failed": summary["videos_failed"], "samples": summary["samples"],
            "samples_unique": _unique_samples(store, summary["key"]), "node_lost_at_s": sig(lost_at),
            "stage_nodes": {s: sorted(roles.get(n, n) for n in ids) for s, ids in summary["stage_nodes"].items()}}


def _unique_samples(store: Path, key: str) -> int:
    from feature_store.store import FeatureStore

    return len(set(FeatureStore(str(store)).open(key).index.column("sample_key").to_pylist()))


def run(session: BenchSession) -> BenchResult:
    temp = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    session.log(f"{NAME}: starting a 0-CPU head and two 1-CPU worker raylets")
    cluster = _start_cluster(temp)
    try:
        session.log(f"{NAME}: the 1x set, undisturbed")
        calm = _run(session, cluster, session.workdir / "stores" / "multinode-calm", lose_node=False)
        session.log(f"{NAME}: the 1x set, a worker node lost after the first commit and a fresh one added")
        lossy = _run(session, cluster, session.workdir / "stores" / "multinode-loss", lose_node=True)
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    value = lossy["wall_s"] / calm["wall_s"]
    notes = []
    if lossy["node_lost_at_s"] is None:
        notes.append("the run finished before its first commit could be seen: no node was lost")
    for name, r in (("undisturbed", calm), ("with the lost node", lossy)):
        if r["videos_failed"] or r["samples_unique"] != r["samples"] or "head" in sum(r["stage_nodes"].values(), []):
            notes.append(f"{name}: {r['videos_failed']} videos failed, {r['samples']} samples of which "
                         f"{r['samples_unique']} unique, stages on {r['stage_nodes']}")
    summary = (f"{calm['frames']} frames: {calm['wall_s']:.1f} s undisturbed vs {lossy['wall_s']:.1f} s with a worker "
               f"node lost at {lossy['node_lost_at_s'] or 0:.1f} s; {lossy['videos_ok']} videos ok, "
               f"{lossy['samples_unique']}/{lossy['samples']} samples unique")
    return BenchResult(NAME, value, TARGET, summary, {"undisturbed": calm, "node_lost": lossy,
                                                      "nodes": "0-CPU head + 2 x 1-CPU workers"}, notes)
