"""Extraction on a simulated multi-node cluster: a 0-CPU head and worker raylets on this machine
(ray.cluster_utils.Cluster), driven through the real CLI in a subprocess.

This module's cluster is its own (its own temp folder and GCS), apart from the shared session cluster of
tests/conftest.py: the CLI joins it through RAY_ADDRESS, and this test process never calls ray.init on it.
Kept small (tiny videos, one CPU per worker node): 2 cores run the whole cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from feature_store.store import FeatureStore
from tests.conftest import VENV_BIN, cli_env, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ARGS = ["--fps", "12", "--segment-frames", "8", "--samples-per-shard", "2", "--commit-every", "1",
        "--json", "--quiet"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, temp_dir=temp)
    c.wait_for_nodes()
    yield c
    c.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def extract(videos: Path, teacher: Path, store: Path, address: str) -> dict:
    rc, out, err = run_cli(["extract", "--videos", str(videos), "--teacher", str(teacher), "--store", str(store),
                            *ARGS], address)
    return out


def test_stages_run_on_worker_nodes_never_on_the_head(cluster, sample_videos, tiny_teacher, tmp_path):
    head = cluster.head_node.node_id
    workers = {n.node_id for n in cluster.worker_nodes}
    out = extract(sample_videos, tiny_teacher, tmp_path / "store", cluster.address)
    assert out["videos_ok"] == 12 and out["videos_failed"] == 0
    assert set(out["stage_nodes"]) == {"decode", "teacher", "write"}
    for stage, nodes in out["stage_nodes"].items():
        assert nodes and set(nodes) <= workers and head not in nodes, (stage, nodes)
    assert {n["node_id"] for n in out["nodes"]} == workers | {head}
    again = extract(sample_videos, tiny_teacher, tmp_path / "store", cluster.address)
    assert again["frames_computed"] == 0 and again["videos_reused"] == 12 and not again["used_ray"]
    rc, runs, _ = run_cli(["store", "runs", str(tmp_path / "store"), out["key"], "--json"])
    assert [r["run_id"] for r in runs["runs"]] == [out["run_id"], again["run_id"]]
    assert runs["runs"][0]["stage_nodes"] == out["stage_nodes"] and runs["runs"][0]["versions_committed"] >= 1


def test_a_lost_worker_node_and_a_fresh_one_do_not_fail_the_job(cluster, sample_videos, tiny_teacher, tmp_path):
    store = tmp_path / "store"
    args = ["extract", "--videos", str(sample_videos), "--teacher", str(tiny_teacher), "--store", str(store), *ARGS]
    proc = subprocess.Popen([str(VENV_BIN / "subsume"), *args], env=cli_env(cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # the first commit: the pipeline is running on both worker nodes
    while time.time() < deadline and proc.poll() is None and \
            not list(store.glob("*/tables/index/_delta_log/00000000000000000001.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before a node could be lost"
    lost = next(iter(cluster.worker_nodes))
    cluster.remove_node(lost, allow_graceful=False)
    cluster.add_node(num_cpus=1, temp_dir=cluster.head_node.get_temp_dir_path())
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    out = __import__("json").loads(stdout.strip().splitlines()[-1])
    assert out["videos_ok"] == 12 and out["videos_failed"] == 0
    # the lost node had done part of this run's committed work before it went
    assert lost.node_id in {n for nodes in out["stage_nodes"].values() for n in nodes}
    key = out["key"]
    snap = FeatureStore(str(store)).open(key)
    keys = snap.index.column("sample_key").to_pylist()
    assert len(keys) == len(set(keys)) == out["samples"]  # every video extracted exactly once
    again = extract(sample_videos, tiny_teacher, store, cluster.address)
    assert again["frames_computed"] == 0 and again["videos_reused"] == 12
    rc, verify, _ = run_cli(["store", "verify", str(store), key, "--json"])
    assert verify["ok"]
