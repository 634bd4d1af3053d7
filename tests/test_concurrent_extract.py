"""Two extractions started at once into one KEY, over overlapping halves of a real corpus, end with exactly
the samples of one extraction over everything, each once (issue 10's concurrency check, through the CLI)."""

import csv
import json
import subprocess
from pathlib import Path

import pytest

from feature_store.reader import iter_samples
from feature_store.store import FeatureStore
from tests.conftest import VENV_BIN, cli_env, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXTRACT = ["--fps", "12", "--segment-frames", "8", "--samples-per-shard", "2", "--commit-every", "1",
           "--json", "--quiet"]


def write_part(manifest: Path, rows: list[dict], name: str) -> Path:
    out = manifest.parent / name
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def extract_args(videos: Path, teacher: Path, store: Path) -> list[str]:
    return ["extract", "--videos", str(videos), "--teacher", str(teacher), "--store", str(store), *EXTRACT]


def sample_keys(store: Path, key: str) -> list[str]:
    st = FeatureStore(str(store))
    snap = st.open(key)
    return [s["sample_key"] for s in iter_samples(st, snap)]


def test_two_extractions_at_once_over_overlapping_halves_equal_one_over_everything(
        sample_videos, tiny_teacher, ray_address, tmp_path):
    rows = list(csv.DictReader(open(sample_videos)))
    first, second = rows[: 2 * len(rows) // 3], rows[len(rows) // 3:]  # the middle third is in both
    part_a = write_part(sample_videos, first, "part-a.csv")
    part_b = write_part(sample_videos, second, "part-b.csv")
    shared, alone = tmp_path / "shared", tmp_path / "alone"

    exe = str(VENV_BIN / "subsume")
    procs = [subprocess.Popen([exe, *extract_args(p, tiny_teacher, shared)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env(ray_address)) for p in (part_a, part_b)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    key = summaries[0]["key"]
    assert summaries[1]["key"] == key

    _, whole, _ = run_cli(extract_args(sample_videos, tiny_teacher, alone), ray_address)
    assert whole["key"] == key and whole["videos_failed"] == 0

    got, want = sample_keys(shared, key), sample_keys(alone, key)
    assert len(got) == len(set(got)), "a sample is read twice"
    assert sorted(got) == sorted(want)
    assert FeatureStore(str(shared)).open(key).manifest["counts"]["samples"] == len(want)
    rc, report, _ = run_cli(["store", "verify", str(shared), key, "--json"], check=False)
    assert rc == 0 and report["ok"], report
