"""The downstream protocol: linear probe and finetune of a trained student on a labelled KEY with a split
column, multi-clip testing checked by hand.

Fast part: a small real store (synthetic frames and targets, real shards and commits) and a tiny student
trained in-process. End to end (slow): real H.264 videos (the demo generator) with a split from
`subsume manifest holdout`, the real extractor on the shared Ray cluster, a real tiny CLIP, the real CLI.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tests.conftest import run_cli


EXTRACT = ["--fps", "12", "--segment-frames", "8", "--samples-per-shard", "6", "--json", "--quiet"]
SEGMENTS_PER_VIDEO = 3  # 24 frames at 12 fps, segments of 8
CLIPS = 2  # --clips-per-segment


# ---------------------------------------------------------------------------------------------------------
# Fast: a small store (8 videos x 2 segments of 4 frames, label kind a/b, videos 6 and 7 are the test split).


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from feature_store.store import FeatureStore
    from tests.storehelpers import S, add_video, small_spec
    from training.config import DataConfig, LoaderConfig, OptimConfig, TrainConfig
    from training.models import StudentConfig
    from training.train import run_train

    tmp = tmp_path_factory.mktemp("small")
    store = FeatureStore(str(tmp / "store"))
    key = store.ensure_key(small_spec())
    for i in range(8):
        add_video(store, key, f"v{i}", 2, labels={"kind": "ab"[i % 2], "split": "test" if i >= 6 else "train"})
    add_video(store, key, "unlabelled", 1)
    cfg = TrainConfig(steps=2, checkpoint_every=2, log_every=1, report_to=[],
                      student=StudentConfig(frames=2, image_size=S),
                      data=DataConfig(batch_size=2, shuffle_buffer=4, heldout_fraction=0.0),
                      loader=LoaderConfig(num_workers=0), optim=OptimConfig(warmup_steps=1))
    ck = run_train(cfg, store.root, key, str(tmp / "run"), log=lambda m: None)["checkpoint"]
    return store.root, key, ck


def test_window_starts_and_video_logits():
    from training.downstream import video_logits, window_starts

    assert window_starts(8, 4, 2) == [0, 4] and window_starts(8, 4, 3) == [0, 2, 4] and window_starts(8, 4, 1) == [2]
    assert window_starts(4, 4, 3) == [0] and window_starts(3, 4, 2) == [0]  # one window fits: it is taken once
    ids, logits = video_logits(np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]]), ["b", "a", "b"])
    assert ids == ["a", "b"]
    np.testing.assert_allclose(logits, [[3.0, 2.0], [0.5, 2.5]])


def test_linear_multi_clip_is_the_mean_of_clip_logits(small):
    from training.downstream import downstream_config, run_downstream

    root, key, ck = small
    res = run_downstream(ck, key, downstream_config(label="kind", clips_per_segment=2), root=root)
    r, s = res.summary, res.scores["student"]
    assert (r["train_samples"], r["test_samples"], r["test_videos"], r["test_clips"]) == (12, 4, 2, 8)
    assert r["class_names"] == ["a", "b"] and res.model is None
    for i, v in enumerate(s.videos):  # by hand: a video's clips (2 segments x 2 windows), logits averaged
        mine = s.clip_logits[[j for j, w in enumerate(s.clip_videos) if w == v]]
        assert len(mine) == 4
        np.testing.assert_allclose(s.video_logits[i], mine.mean(0), rtol=1e-6)
    assert r["student"] == {"clip_accuracy": pytest.approx(np.mean(s.clip_logits.argmax(1) == s.clip_labels)),
                            "video_accuracy": pytest.approx(np.mean(s.video_logits.argmax(1) == s.video_labels))}
    assert sorted(s.video_labels.tolist()) == [0, 1]  # v6 is "a", v7 is "b"
    assert set(res.scores) == {"student", "teacher"} and res.scores["teacher"].clip_logits.shape == (8, 2)


def test_finetune_trains_the_student_and_is_reproducible(small):
    from training.downstream import downstream_config, run_downstream
    from training.export import load_exported

    root, key, ck = small
    cfg = downstream_config(label="kind", protocol="finetune", epochs=2, batch_size=4)
    a = run_downstream(ck, key, cfg, root=root)
    before = load_exported(f"{ck}/student").encoder.state_dict()
    after = a.model.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the encoder itself was trained
    b = run_downstream(ck, key, cfg, root=root)
    np.testing.assert_array_equal(a.scores["student"].clip_logits, b.scores["student"].clip_logits)
    assert a.summary["test_clips"] == 8


def test_bad_settings_and_keys_are_refused(small):
    from training.downstream import DownstreamError, downstream_config, run_downstream

    root, key, ck = small
    with pytest.raises(DownstreamError, match="no 'fold' label"):
        run_downstream(ck, key, downstream_config(label="kind", split_column="fold"), root=root)
    with pytest.raises(DownstreamError, match="needs >= 2 classes"):
        run_downstream(ck, key, downstream_config(label="genre"), root=root)
    with pytest.raises(DownstreamError, match="protocol"):
        downstream_config(protocol="knn")
    with pytest.raises(DownstreamError, match="epochs"):
        downstream_config(epochs="many")


# ---------------------------------------------------------------------------------------------------------
# End to end on real videos through the CLI.


@pytest.fixture(scope="module")
def labelled(sample_videos, tiny_teacher, ray_address, tmp_path_factory):
    """The sample videos with a train/test split column (stratified by colour), extracted into a KEY, and a
    tiny student trained for a few steps on that KEY (the protocol does not care where it was trained)."""
    from training.config import DataConfig, LoaderConfig, TrainConfig
    from training.models import StudentConfig
    from training.train import run_train

    tmp = tmp_path_factory.mktemp("downstream")
    manifest = tmp / "split.csv"
    _, summary, _ = run_cli(["manifest", "holdout", "--manifest", str(sample_videos), "--test-fraction", "0.34",
                             "--stratify", "colour", "--out", str(manifest), "--json"])
    assert summary["train"] + summary["test"] == 12 and summary["test"] >= 3
    _, out, _ = run_cli(["extract", "--videos", str(manifest), "--teacher", str(tiny_teacher), "--store",
                         str(tmp / "store"), *EXTRACT], ray_address)
    assert out["videos_ok"] == 12
    cfg = TrainConfig(steps=4, checkpoint_every=4, log_every=4, report_to=[],
                      student=StudentConfig(frames=4, image_size=32),
                      data=DataConfig(batch_size=4, heldout_fraction=0.0), loader=LoaderConfig(num_workers=0))
    ck = run_train(cfg, str(tmp / "store"), out["key"], str(tmp / "run"), in_process=True, log=lambda m: None)
    return str(tmp / "store"), out["key"], ck["checkpoint"], list(csv.DictReader(open(manifest)))


@pytest.mark.ray
@pytest.mark.slow
def test_linear_and_finetune_through_the_cli_on_real_videos(labelled, tmp_path):
    store, key, ck, rows = labelled
    n_test = sum(r["split"] == "test" for r in rows)
    out = tmp_path / "linear.json"
    base = ["downstream", "--checkpoint", ck, "--store", store, "--key", key, "--label", "colour", "--json"]
    _, r, _ = run_cli([*base, "--protocol", "linear", "--clips-per-segment", str(CLIPS), "--out", str(out)])
    assert r["protocol"] == "linear" and r["class_names"] == ["blue", "green", "red"]
    assert (r["test_videos"], r["test_samples"]) == (n_test, n_test * SEGMENTS_PER_VIDEO)
    assert r["train_samples"] == (12 - n_test) * SEGMENTS_PER_VIDEO
    assert r["test_clips"] == n_test * SEGMENTS_PER_VIDEO * CLIPS  # every window of every test segment
    for who in ("student", "teacher_linear"):
        assert 0.0 <= r[who]["clip_accuracy"] <= 1.0 and 0.0 <= r[who]["video_accuracy"] <= 1.0
    assert json.loads(out.read_text())["key"] == key
    preds = list(csv.DictReader(open(r["predictions_csv"])))
    assert len(preds) == n_test and {p["clips"] for p in preds} == {str(SEGMENTS_PER_VIDEO * CLIPS)}
    assert sorted(p["label"] for p in preds) == sorted(r0["colour"] for r0 in rows if r0["split"] == "test")
    assert np.mean([p["label"] == p["prediction"] for p in preds]) == pytest.approx(r["student"]["video_accuracy"])
    _, f, _ = run_cli([*base, "--protocol", "finetune", "--epochs", "2", "--quiet"])
    assert f["protocol"] == "finetune" and f["test_clips"] == r["test_clips"]
    assert f["teacher_linear"] == r["teacher_linear"]  # the same probe on the same teacher features


@pytest.mark.ray
@pytest.mark.slow
def test_bad_requests_exit_2_with_a_message(labelled):
    store, key, ck, _ = labelled
    base = ["downstream", "--checkpoint", ck, "--store", store]
    rc, _, err = run_cli([*base, "--key", key, "--label", "colour", "--split-column", "fold"], check=False)
    assert rc == 2 and "no 'fold' label" in err and "subsume manifest" in err
    rc, _, err = run_cli([*base, "--key", key, "--label", "colour", "--clips-per-segment", "0"], check=False)
    assert rc == 2 and "clips_per_segment" in err
    rc, _, err = run_cli([*base, "--key", "fk-nosuch", "--label", "colour"], check=False)
    assert rc == 2 and "fk-nosuch" in err
    rc, _, err = run_cli(["manifest", "ucf101", "--splits", store, "--videos", store, "--out",
                          f"{store}/../m.csv"], check=False)
    assert rc == 2 and "classInd.txt" in err
