"""End to end through the real CLI on a real local Ray cluster: extract -> (rerun) -> train -> eval.

Real H.264 videos (the demo generator) plus hostile files, a real transformers teacher loaded with
from_pretrained from a folder, real shards. Kept small: these are the slow tests of the suite.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from feature_store.shards import decode_frames, npy_load
from feature_store.spec import TeacherSpec
from feature_store.store import FeatureStore, table_rows
from feature_store.teacher import load_teacher
from tests.conftest import VENV_BIN, cli_env, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXTRACT = ["--fps", "12", "--segment-frames", "8", "--samples-per-shard", "4", "--json", "--quiet"]


@pytest.fixture(scope="module")
def corpus(sample_videos, tmp_path_factory) -> Path:
    """The sample videos plus hostile inputs, in one manifest (paths relative to it)."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(sample_videos.parent / "videos", root / "videos")
    (root / "videos" / "empty.mp4").write_bytes(b"")
    (root / "videos" / "text.mp4").write_text("this is not a video\n" * 50)
    (root / "videos" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    from tests.videos import marked_frames, write_cut_mid_stream, write_header_truncated, write_video

    write_video(root / "videos" / "oneframe.mp4", marked_frames(1), fps=12)  # padded to one segment
    write_cut_mid_stream(root / "videos" / "cut.avi", n_frames=48)  # the frames that exist are extracted
    write_header_truncated(root / "videos" / "truncated.mp4")
    rows = list(csv.DictReader(open(sample_videos)))
    for name in ("oneframe", "cut"):
        rows.append({"path": f"videos/{name}.{'avi' if name == 'cut' else 'mp4'}", "video_id": name,
                     "shape": "", "colour": "", "direction": "", "speed": ""})
    for name in ("empty", "text", "random", "missing", "truncated"):
        rows.append({"path": f"videos/{name}.mp4", "video_id": name, "shape": "circle", "colour": "red",
                     "direction": "left", "speed": "slow"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def extracted(corpus, tiny_teacher, ray_address, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    rc, out, err = run_cli(["extract", "--videos", str(corpus), "--teacher", str(tiny_teacher), "--store",
                            str(store), *EXTRACT], ray_address)
    return store, out


def test_extract_records_every_video(extracted):
    store, out = extracted
    assert out["videos_total"] == 19
    assert out["videos_ok"] == 14 and out["videos_failed"] == 5
    assert set(out["failures_by_reason"]) <= {"empty_file", "not_a_video", "missing", "corrupt"}
    assert sum(out["failures_by_reason"].values()) == 5
    assert out["frames_computed"] == out["samples"] * 8 and out["frames_reused"] == 0
    key = out["key"]
    snap = FeatureStore(str(store)).open(key)
    fails = table_rows(snap.failures)
    assert {Path(f["source"]).stem for f in fails} == {"empty", "text", "random", "missing", "truncated"}
    assert all(f["message"] and f["stage"] and f["attempts"] == 1 for f in fails)
    index = table_rows(snap.index)
    per_video = {}
    for r in index:
        per_video.setdefault(r["video_id"], []).append(r)
    assert all(len(per_video[f"synth{i:05d}"]) == 3 for i in range(12))  # 24 frames at 12 fps: 3 x 8
    one = per_video["oneframe"]
    assert len(one) == 1 and one[0]["frame_indices"] == [0] * 8  # padded by repeating its only frame
    cut = per_video["cut"]  # 48 frames written, about half the bytes kept
    assert 1 <= len(cut) <= 2 and max(max(r["frame_indices"]) for r in cut) < 48


def test_store_follows_the_format(extracted):
    store, out = extracted
    snap = FeatureStore(str(store)).open(out["key"])
    manifest = snap.manifest
    assert manifest["teacher"]["class"] == "CLIPVisionModelWithProjection"
    assert manifest["teacher"]["output_used"] == "image_embeds" and len(manifest["teacher"]["weights_sha256"]) == 64
    index = table_rows(snap.index)
    assert len(index) == out["samples"] == manifest["counts"]["samples"]
    assert all(len(r["frame_indices"]) == 8 and len(r["timestamps"]) == 8 for r in index)
    assert {dict(r["labels"])["direction"] for r in index if r["labels"]} <= {"left", "right", "up", "down"}
    assert {dict(r["labels"])["speed"] for r in index if r["labels"]} <= {"slow", "fast"}
    from feature_store.reader import shard_urls

    urls = shard_urls(str(store), out["key"])  # plain webdataset over the version's shard list
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == out["samples"]
    targets = npy_load(samples[0]["teacher.npy"])
    assert targets.dtype == np.float16 and targets.shape == (8, 16)


def test_stored_targets_match_the_teacher_recomputed_on_stored_frames(extracted, tiny_teacher):
    store, out = extracted
    kdir = store / out["key"]
    shards = FeatureStore(str(store)).open(out["key"]).shards
    teacher = load_teacher(TeacherSpec(model=str(tiny_teacher)), device="cpu")
    stored, fresh = [], []
    for s in wds.WebDataset(sorted(str(kdir / x.name) for x in shards), shardshuffle=False):
        frames = decode_frames(s["frames.jpg"], "jpeg", 8)
        stored.append(npy_load(s["teacher.npy"]).astype(np.float32))
        fresh.append(teacher.embed(frames).embeds.numpy())
    stored, fresh = np.concatenate(stored), np.concatenate(fresh)
    mean = fresh.mean(0)
    a, b = stored - mean, fresh - mean
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999, cos.min()


def test_second_extract_reuses_everything(extracted, corpus, tiny_teacher, ray_address):
    store, first = extracted
    rc, out, _ = run_cli(["extract", "--videos", str(corpus), "--teacher", str(tiny_teacher), "--store", str(store),
                          *EXTRACT], ray_address)
    assert out["key"] == first["key"]
    assert out["frames_computed"] == 0 and out["frames_reused"] == first["frames_computed"]
    assert out["samples"] == first["samples"]
    # the broken files failed for deterministic causes: not decoded again, so Ray is not needed at all
    assert out["used_ray"] is False and out["videos_quarantined"] == 5
    rc, verify, _ = run_cli(["store", "verify", str(store), out["key"], "--json"])
    assert verify["ok"]


def test_a_split_column_relabels_stored_videos_in_place_and_training_reads_them(extracted, corpus, tiny_teacher,
                                                                             ray_address, tmp_path):
    """The downstream walk-through on a store that already holds the videos: a manifest that adds a `split`
    column reuses every video and relabels its index rows (a Delta MERGE, whose rewritten files deltalake 1.6.6
    writes with string_view columns); training, downstream and verify then read that version."""
    from training.data import StreamPosition, StreamSpec, epoch_stream
    from training.downstream import vocabulary

    store = tmp_path / "store"
    shutil.copytree(extracted[0], store)  # the module's store stays as the other tests expect it
    rows = list(csv.DictReader(open(corpus)))
    manifest = corpus.parent / "split.csv"  # beside the first manifest: the same relative paths
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "split"])
        w.writeheader()
        w.writerows({**r, "split": "test" if i % 3 == 0 else "train"} for i, r in enumerate(rows))
    rc, out, _ = run_cli(["extract", "--videos", str(manifest), "--teacher", str(tiny_teacher), "--store", str(store),
                          *EXTRACT], ray_address)
    assert out["key"] == extracted[1]["key"] and out["frames_computed"] == 0 and out["metadata_updates"] == 14
    snap = FeatureStore(str(store)).open(out["key"])
    want = {r["video_id"]: "test" if i % 3 == 0 else "train" for i, r in enumerate(rows)}
    spec = StreamSpec(str(store), snap.key, snap.version, {}, rank=0, world_size=1, seed=0, shuffle_buffer=0,
                      heldout_fraction=0.0, batch_size=1, image_size=16)
    stream = epoch_stream(spec, 0, 1, StreamPosition())
    seen = [next(stream)[0] for _ in range(out["samples"])]  # one epoch, as a training loader reads it
    video_of = dict(zip(snap.index.column("sample_key").to_pylist(), snap.index.column("video_id").to_pylist()))
    assert len({s["sample_key"] for s in seen}) == out["samples"]
    assert all(s["labels"]["split"] == want[video_of[s["sample_key"]]] for s in seen)
    voc = vocabulary(snap, "direction", "split")  # what `subsume downstream` reads first
    assert voc.train_samples > 0 and voc.test_samples > 0 and set(voc.classes) <= {"left", "right", "up", "down"}
    rc, report, _ = run_cli(["store", "verify", str(store), out["key"], "--json"])
    assert report["ok"], report["problems"]


def test_a_small_job_without_a_cluster_runs_in_process_and_stores_what_ray_stores(extracted, corpus, tiny_teacher,
                                                                                  tmp_path, monkeypatch):
    """`extract` from a fresh shell with no cluster addressed: the same stages in one process (no Ray), the
    same samples, failures and targets as the Ray pipeline's run of the module; a rerun computes nothing."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = tmp_path / "store"
    args = ["extract", "--videos", str(corpus), "--teacher", str(tiny_teacher), "--store", str(store), *EXTRACT]
    rc, out, _ = run_cli(args)
    ray_store, ray_out = extracted
    assert out["executor"] == "local" and out["used_ray"] is False and ray_out["executor"] == "ray"
    assert out["key"] == ray_out["key"]
    for field in ("videos_ok", "videos_failed", "failures_by_reason", "samples", "frames_computed"):
        assert out[field] == ray_out[field], field
    local, remote = _targets_by_sample(store, out["key"]), _targets_by_sample(ray_store, out["key"])
    assert set(local) == set(remote)
    # the teacher runs on other torch threads here than in a one-CPU actor: the same up to float16 rounding
    assert all(np.allclose(local[k], remote[k], rtol=1e-2, atol=1e-3) for k in local)
    rc, again, _ = run_cli(args)
    assert again["frames_computed"] == 0 and again["videos_reused"] == out["videos_ok"]


def _targets_by_sample(store: Path, key: str) -> dict[str, np.ndarray]:
    from feature_store.reader import shard_urls

    return {s["__key__"]: npy_load(s["teacher.npy"]).astype(np.float32)
            for s in wds.WebDataset(shard_urls(str(store), key), shardshuffle=False)}


def test_train_on_two_ray_workers_then_eval(extracted, ray_address, tmp_path):
    store, ex = extracted
    key = ex["key"]
    rc, train, err = run_cli(["train", "--store", str(store), "--key", key, "--out", str(tmp_path / "run"),
                              "--steps", "4", "--workers", "2", "--json", "--set", "student.image_size=24",
                              "--set", "data.batch_size=4", "--set", "checkpoint_every=2", "--set", "optim.lr=3e-4",
                              "--set", "data.heldout_fraction=0.25"], ray_address)
    assert train["steps"] == 4 and train["loss_first"] > 0 and train["loss_last"] > 0
    assert train["student"]["image_size"] == 24  # below the KEY's 32-px crop: frames are resized on the fly
    ckpt = train["checkpoint"]
    assert os.path.exists(os.path.join(ckpt, "student", "model.safetensors"))
    # Only the run folder: its latest checkpoint (Ray Train layout) names the store, KEY and held-out fraction.
    rc, ev, _ = run_cli(["eval", "--checkpoint", str(tmp_path / "run"), "--json"])
    assert ev["checkpoint"] == ckpt and ev["heldout_fraction"] == 0.25 and ev["key"] == key
    assert ev["n"] > 0 and set(ev["per_label"]) == {"shape", "colour", "direction", "speed"}
    for name in ("student_knn", "teacher_knn"):
        assert 0.0 <= ev[name] <= 1.0


def test_train_finds_the_key_from_teacher_and_sampling_or_says_what_to_run(extracted, tiny_teacher, tmp_path):
    store, ex = extracted
    rc, out, err = run_cli(["train", "--store", str(store), "--teacher", str(tiny_teacher), "--fps", "12",
                            "--segment-frames", "8", "--out", str(tmp_path / "r"), "--steps", "1", "--json",
                            "--set", "student.image_size=32", "--set", "data.batch_size=2"])
    assert out["key"] == ex["key"]
    rc, out, err = run_cli(["train", "--store", str(store), "--teacher", str(tiny_teacher), "--fps", "6",
                            "--out", str(tmp_path / "r2"), "--json"], check=False)
    assert rc != 0 and "subsume extract" in err and len(err.strip().splitlines()) == 1, err


def test_killed_extraction_resumes_without_loss_or_duplicates(extracted, corpus, tiny_teacher, ray_address, tmp_path):
    store = tmp_path / "store"
    args = ["extract", "--videos", str(corpus), "--teacher", str(tiny_teacher), "--store", str(store),
            "--fps", "12", "--segment-frames", "8", "--samples-per-shard", "2", "--commit-every", "1", "--json",
            "--quiet"]
    proc = subprocess.Popen([str(VENV_BIN / "subsume"), *args], env=cli_env(ray_address),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(store.glob("*/tables/index/_delta_log/00000000000000000001.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    key = next(store.glob("*/spec.json")).parent.name
    before = FeatureStore(str(store)).open(key)
    total = extracted[1]["samples"]  # what an unbroken run over the same corpus stored
    assert 0 < before.index.num_rows < total, "the run finished before it could be killed"
    rc, out, _ = run_cli(args, ray_address)
    snap = FeatureStore(str(store)).open(key)
    keys = snap.index.column("sample_key").to_pylist()
    assert len(keys) == len(set(keys)) == total
    assert out["frames_computed"] + out["frames_reused"] == total * 8
    rc, verify, _ = run_cli(["store", "verify", str(store), key, "--json"])
    assert verify["ok"]


def test_cached_and_online_targets_give_the_same_losses(extracted, tmp_path):
    """Same seed, same data order: the teacher in the loop reproduces the cached run to float16 error."""
    from training.config import DataConfig, TrainConfig
    from training.models import StudentConfig
    from training.train import run_train

    store, ex = extracted

    def cfg(targets):
        return TrainConfig(steps=5, checkpoint_every=5, log_every=1, targets=targets,
                           student=StudentConfig(frames=4, image_size=32),
                           data=DataConfig(batch_size=4, heldout_fraction=0.25))

    cached = run_train(cfg("cached"), str(store), ex["key"], str(tmp_path / "cached"), in_process=True)
    online = run_train(cfg("online"), str(store), ex["key"], str(tmp_path / "online"), in_process=True)
    a, b = np.array(cached["loss_history"]), np.array(online["loss_history"])
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(a, b, rtol=5e-3)
    assert not np.array_equal(a, b)  # float16 storage does leave a trace: the two paths really differ


def test_ray_dataset_and_torch_reader_yield_the_same_samples(extracted, ray_session):
    from feature_store.reader import iter_samples, ray_dataset

    store, ex = extracted
    st = FeatureStore(str(store))
    snap = st.open(ex["key"])
    torch_side = {s["sample_key"]: s for s in iter_samples(st, snap)}
    ray_side = {r["sample_key"]: r for r in ray_dataset(str(store), ex["key"]).take_all()}
    assert torch_side.keys() == ray_side.keys()
    k = next(iter(torch_side))
    assert np.array_equal(torch_side[k]["targets"], ray_side[k]["targets"])
    assert np.array_equal(torch_side[k]["frames"], ray_side[k]["frames"])
    assert json.loads(ray_side[k]["labels"]) == torch_side[k]["labels"]


def test_embed_writes_student_embeddings_for_new_videos(extracted, corpus, tmp_path):
    from training.config import DataConfig, TrainConfig
    from training.models import StudentConfig
    from training.train import run_train

    store, ex = extracted
    res = run_train(TrainConfig(steps=1, checkpoint_every=1, student=StudentConfig(frames=4, image_size=32),
                                data=DataConfig(batch_size=2, heldout_fraction=0.25)),
                    str(store), ex["key"], str(tmp_path / "run"), in_process=True)
    out = tmp_path / "emb.parquet"
    rc, res, _ = run_cli(["embed", "--checkpoint", res["checkpoint"], "--videos", str(corpus), "--out", str(out),
                          "--json"])
    table = pq.read_table(out).to_pylist()
    ok = [r for r in table if not r["error"]]
    assert res["videos"] == 19 and len(ok) == ex["samples"]
    assert all(len(r["embedding"]) == res["dim"] for r in ok)
    assert {r["video_id"] for r in table if r["error"]} == {"empty", "text", "random", "missing", "truncated"}


def test_ray_train_worker_death_resumes_to_the_same_weights(extracted, ray_address, tmp_path):
    """A Ray Train worker process dies after the first checkpoint (a test callback, tests/train_hooks.py);
    FailureConfig restarts the group from it and the run ends with the same weights as an unbroken one."""
    from tests.conftest import REPO

    store, ex = extracted
    # --store relative to the CLI's working directory: Ray Train's workers run elsewhere and must still find it.
    # The working directory is the repository, so the workers can import the test callback (Ray adds the
    # driver's working directory to their path).
    args = ["train", "--store", os.path.relpath(store, REPO), "--key", ex["key"], "--steps", "6", "--workers", "2",
            "--json", "--set", "student.image_size=32", "--set", "student.frames=4", "--set", "data.batch_size=2",
            "--set", "checkpoint_every=3", "--set", "data.heldout_fraction=0.25"]
    _, straight, _ = run_cli([*args, "--out", str(tmp_path / "a")], ray_address, cwd=str(REPO))
    crash = ["--set", "callbacks=[tests.train_hooks:crash_after_step_3]"]
    _, crashed, err = run_cli([*args, *crash, "--out", str(tmp_path / "b")], ray_address, cwd=str(REPO))
    assert (tmp_path / "b" / ".test-crash-done").exists()  # the worker really died once
    assert crashed["steps"] == straight["steps"] == 6 and crashed["resumed_at"] == 3  # resumed, not restarted
    a = torch.load(os.path.join(straight["checkpoint"], "state.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(crashed["checkpoint"], "state.pt"), weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_extraction_on_s3_survives_a_killed_writer_and_reuses(extracted, corpus, tiny_teacher, ray_address, s3_env):
    """The same path against a real S3 endpoint (moto on 127.0.0.1, from AWS_ENDPOINT_URL): SIGKILL part-way,
    rerun, nothing lost or duplicated; a third run computes nothing; verify passes."""
    root = f"s3://{s3_env}/store"
    args = ["extract", "--videos", str(corpus), "--teacher", str(tiny_teacher), "--store", root, "--fps", "12",
            "--segment-frames", "8", "--samples-per-shard", "2", "--commit-every", "1", "--json", "--quiet"]
    store = FeatureStore(root)
    proc = subprocess.Popen([str(VENV_BIN / "subsume"), *args], env=cli_env(ray_address),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    key = extracted[1]["key"]
    while time.time() < deadline and not (key in store.keys() and store.latest_version(key) >= 1):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    total = extracted[1]["samples"]
    assert 0 < store.open(key).index.num_rows < total, "the run finished before it could be killed"
    run_cli(args, ray_address)
    rc, again, _ = run_cli(args, ray_address)
    snap = store.open(key)
    keys = snap.index.column("sample_key").to_pylist()
    assert len(keys) == len(set(keys)) == total
    assert again["frames_computed"] == 0 and again["frames_reused"] == total * 8
    rc, verify, _ = run_cli(["store", "verify", root, key, "--json"])
    assert verify["ok"]
