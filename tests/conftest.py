"""Shared fixtures: one real local Ray cluster per test run, a tiny real CLIP teacher saved to disk, and
real encoded sample videos. Everything is built here; nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


# A throwaway cluster for this test run: no usage stats, and no token auth (Ray 2.60 turns it on by default;
# a token generated for one cluster then locks out the CLI subprocesses of another).
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


# Multi-minute cluster rehearsals. `make test` (kept under 15 minutes on 2 cores) leaves them to
# `make test-heavy`; .ci/run runs both. Listed here, in one place, rather than in each file.
HEAVY_TESTS = (
    "tests/test_k8s_rehearsal.py::test_overlay_runs_as_deployed",
    "tests/test_multinode.py::",
    "tests/test_train_resume.py::",
    "tests/test_concurrent_extract.py::",
    "tests/test_cached_online.py::",
    "tests/test_learning.py::test_quick_preset_end_to_end",
    "tests/test_downstream.py::test_linear_and_finetune_through_the_cli_on_real_videos",
    "tests/test_downstream.py::test_bad_requests_exit_2_with_a_message",
    "tests/test_benchmarks.py::test_ingest_scale_quick_preset",
)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.startswith(HEAVY_TESTS):
            item.add_marker(pytest.mark.heavy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray head started once for the whole run (about 6 s), shared by in-process tests and CLI
    subprocesses (through RAY_ADDRESS). 4 logical CPUs on 2 cores so decode, teacher and Train workers fit."""
    ray_bin = shutil.which("ray", path=str(VENV_BIN)) or shutil.which("ray")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    # The nodes hold the S3 test keys, as pods do from their secret: jobs no longer carry credentials.
    env = {**os.environ, **RAY_TEST_ENV, **S3_TEST_CREDENTIALS}
    # The dashboard agent on a free port too: another Ray on the machine (a user's, a second test run) holds
    # the default one, and `ray start` would then fail.
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=4",
                    f"--dashboard-agent-listen-port={_free_port()}",
                    "--disable-usage-stats", f"--temp-dir={temp}"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    address = f"127.0.0.1:{port}"
    try:
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        from benchmarks.ingest_scale import stop_cluster

        stop_cluster(temp)  # only this run's cluster: `ray stop` would kill every Ray on the machine


@pytest.fixture(scope="session")
def ray_session(ray_address):
    """This test process connected to the shared cluster."""
    import ray

    os.environ.update(RAY_TEST_ENV)
    if not ray.is_initialized():
        ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    return ray_address


def cli_env(ray_address: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **RAY_TEST_ENV}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def run_cli(args: list[str], ray_address: str | None = None, timeout: int = 600, check: bool = True,
            cwd: str | None = None):
    """Run the real `subsume` console script; returns (returncode, parsed last-line JSON or None, stderr)."""
    import json

    exe = shutil.which("subsume", path=str(VENV_BIN)) or "subsume"
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=cli_env(ray_address), timeout=timeout,
                          cwd=cwd)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        payload = json.loads(last) if last.startswith("{") else None
    except json.JSONDecodeError:
        payload = None
    if check and proc.returncode != 0:
        raise AssertionError(f"subsume {' '.join(args)} exited {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}")
    if check and "--json" in args and payload is None:  # the contract: the last stdout line is the summary
        raise AssertionError(f"subsume {' '.join(args)}: last stdout line is not JSON: {last[-500:]!r}\n"
                             f"STDOUT tail:\n{proc.stdout[-2000:]}")
    return proc.returncode, payload, proc.stderr


def save_tiny_clip(folder: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random CLIPVisionModelWithProjection + its image processor, as a hub checkpoint would be."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, projection_dim=16)
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> Path:
    """12 labelled H.264 videos (the demo generator) and their manifest.csv."""
    from subsume.sample_data import generate_videos

    out = tmp_path_factory.mktemp("videos")
    return Path(generate_videos(out, 12, seed=1, size=48, frames=24, fps=12.0))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint: moto's server on 127.0.0.1 (conditional writes included), in a child process:
    delta-rs holds the GIL while it waits on S3, so a server thread in this process could not answer it."""
    from tests.storehelpers import moto_server_process

    endpoint, proc = moto_server_process()
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The standard AWS environment pointing at the test endpoint, and a fresh bucket; returns its name."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for k, v in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket
