"""The checkpoint carries the run: eval and embed need only a checkpoint (or a run folder), use the run's own
held-out fraction and snapshot, and refuse a snapshot whose manifest changed."""

import json
import os

import pytest

from feature_store.store import FeatureStore
from tests.storehelpers import S, add_video, small_spec
from training.config import DataConfig, LoaderConfig, OptimConfig, TrainConfig
from training.evaluate import evaluate
from training.locate import find_checkpoint
from training.models import StudentConfig
from training.train import run_train


@pytest.fixture(scope="module")
def store_key(tmp_path_factory):
    store = FeatureStore(str(tmp_path_factory.mktemp("ckstore") / "store"))
    key = store.ensure_key(small_spec())
    for i in range(16):
        add_video(store, key, f"v{i}", 2, labels={"kind": "ab"[i % 2]})
    return store.root, key


def _cfg(fraction, **student):
    return TrainConfig(steps=2, checkpoint_every=1, log_every=1,
                       student=StudentConfig(arch="r2plus1d", size="tiny", **{"frames": 0, "image_size": 0, **student}),
                       data=DataConfig(batch_size=2, shuffle_buffer=4, heldout_fraction=fraction),
                       loader=LoaderConfig(num_workers=0), optim=OptimConfig(warmup_steps=1))


@pytest.fixture(scope="module")
def runs(store_key, tmp_path_factory):
    root, key = store_key
    base = tmp_path_factory.mktemp("ckruns")
    return {f: run_train(_cfg(f), root, key, str(base / f"run{f}")) for f in (0.25, 0.5)}


def test_eval_with_only_a_checkpoint_uses_the_runs_heldout_fraction(runs):
    for fraction, res in runs.items():
        ev = evaluate(res["checkpoint"])
        assert ev["heldout_fraction"] == fraction and ev["version"] == res["version"]
    quarter, half = evaluate(runs[0.25]["checkpoint"]), evaluate(runs[0.5]["checkpoint"])
    assert quarter["n"] < half["n"] and quarter["n"] + quarter["n_train"] == half["n"] + half["n_train"]
    assert evaluate(runs[0.25]["checkpoint"], heldout_fraction=0.5)["n"] == half["n"]  # an explicit override


def test_a_run_folder_means_its_latest_checkpoint(runs):
    res = runs[0.25]
    assert find_checkpoint(res["out"]) == res["checkpoint"] and res["checkpoint"].endswith("step_00000002")
    lineage = json.loads(open(os.path.join(res["checkpoint"], "train_state.json")).read())
    assert lineage["heldout_fraction"] == 0.25 and lineage["seed"] == 0 and len(lineage["manifest_sha256"]) == 64
    assert lineage["sampling"]["segment_frames"] == small_spec().sampling.segment_frames
    assert lineage["preprocess"]["crop"] == S and lineage["student"]["image_size"] == S  # the KEY's crop by default


def test_a_student_at_another_resolution_and_clip_length_trains_and_evaluates(store_key, tmp_path):
    root, key = store_key
    res = run_train(_cfg(0.25, image_size=S // 2, frames=1), root, key, str(tmp_path / "small"))
    ev = evaluate(str(tmp_path / "small"))
    assert res["student"] == {"frames": 1, "image_size": S // 2} and ev["n"] > 0


def test_a_changed_snapshot_is_refused(store_key, runs, tmp_path):
    import shutil

    root, key = store_key
    res = runs[0.5]
    ck = tmp_path / "ck"
    shutil.copytree(res["checkpoint"], ck)
    lineage = json.loads((ck / "train_state.json").read_text())
    lineage["manifest_sha256"] = "0" * 64
    (ck / "train_state.json").write_text(json.dumps(lineage))
    with pytest.raises(ValueError, match="manifest hash changed"):
        evaluate(str(ck))


def test_the_cli_evaluates_from_a_run_folder_alone_and_saves_eval_json(runs):
    from tests.conftest import run_cli

    res = runs[0.5]
    rc, ev, _ = run_cli(["eval", "--checkpoint", res["out"], "--json"])
    assert ev["heldout_fraction"] == 0.5 and ev["checkpoint"] == res["checkpoint"]
    assert json.loads(open(os.path.join(res["out"], "eval.json")).read())["n"] == ev["n"]
    assert json.loads(open(os.path.join(res["out"], "summary.json")).read())["checkpoint"] == res["checkpoint"]
