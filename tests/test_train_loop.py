"""The training loop in-process (one worker, no Ray): it learns, checkpoints, resumes to identical weights."""

import json
import os

import pytest
import torch

from feature_store.store import FeatureStore
from tests.storehelpers import S, add_video, small_spec
from training.config import ConfigError, DataConfig, LoaderConfig, OptimConfig, TrainConfig, apply_overrides, config_from_dict, load_config
from training.export import load_exported
from training.models import StudentConfig
from training.train import run_train


@pytest.fixture
def store_key(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    key = store.ensure_key(small_spec())
    for i in range(6):
        add_video(store, key, f"v{i}", 2, labels={"kind": "ab"[i % 2]})
    return store.root, key


def tiny_cfg(steps=6, **kw):
    return TrainConfig(steps=steps, checkpoint_every=3, log_every=1, seed=0,
                       student=StudentConfig(arch="r2plus1d", size="tiny", frames=2, image_size=S),
                       data=DataConfig(batch_size=2, shuffle_buffer=4, heldout_fraction=0.0),
                       loader=LoaderConfig(num_workers=0),
                       optim=OptimConfig(lr=1e-3, warmup_steps=1), **kw)


def _weights(ckpt):
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    return state["model"]


def test_train_writes_metrics_checkpoints_and_an_exported_student(store_key, tmp_path, capsys):
    root, key = store_key
    out = tmp_path / "run"
    res = run_train(tiny_cfg(), root, key, str(out))
    assert res["steps"] == 6 and res["loss_first"] is not None and res["loss_last"] is not None
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "cross", "frame", "lr", "samples_per_s", "data_wait_frac"} <= set(lines[-1])
    capsys.readouterr()
    model = load_exported(os.path.join(res["checkpoint"], "student"))  # stands alone: no store, one call
    assert capsys.readouterr().out == ""  # stdout carries the commands' JSON summaries
    assert model.student_config.image_size == S and model.sampling["segment_frames"] == small_spec().sampling.segment_frames
    assert model.embed(torch.zeros(1, 2, 40, 40, 3, dtype=torch.uint8)).shape == (1, model.embed_dim)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert (out / "curves.png").exists() and (out / "run.json").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["key"] == key and len(run["manifest_sha256"]) == 64


TINY = ["--set", "student.frames=2", "--set", f"student.image_size={S}", "--set", "data.batch_size=2", "--set", "data.shuffle_buffer=4", "--set", "data.heldout_fraction=0.0",
        "--set", "optim.warmup_steps=1", "--set", "checkpoint_every=4", "--set", "log_every=1"]


def test_a_killed_run_resumes_to_the_same_weights(store_key, tmp_path):
    """SIGKILL the real CLI after its first checkpoint, rerun with the same --out: same final weights."""
    import signal
    import subprocess
    import time

    from tests.conftest import VENV_BIN, cli_env, run_cli

    root, key = store_key
    args = ["train", "--store", root, "--key", key, "--steps", "24", "--workers", "1", "--json", *TINY]
    _, straight, _ = run_cli([*args, "--out", str(tmp_path / "a")])
    out_b = tmp_path / "b"
    proc = subprocess.Popen([str(VENV_BIN / "subsume"), *args, "--out", str(out_b)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in (out_b / "checkpoints").glob("step_*") if p.name[5:].isdigit()]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p for p in (out_b / "checkpoints").glob("step_*") if p.name[5:].isdigit())
    assert done and not done[-1].name.endswith("00000024"), "the run finished before it could be killed"
    _, resumed, err = run_cli([*args, "--out", str(out_b)])
    assert "resumed at step" in err
    assert resumed["steps"] == straight["steps"] == 24
    a, b = _weights(straight["checkpoint"]), _weights(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_byol_baseline_trains_without_targets(store_key, tmp_path):
    root, key = store_key
    res = run_train(tiny_cfg(objective="byol"), root, key, str(tmp_path / "byol"))
    assert res["steps"] == 6


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 10\nstudent:\n  arch: vit\noptim:\n  lr: 0.01\n")
    cfg = load_config(str(p), ["student.size=small", "data.batch_size=4", "loss.frame=0.0"])
    assert (cfg.steps, cfg.student.arch, cfg.student.size, cfg.optim.lr, cfg.data.batch_size, cfg.loss.frame) == \
        (10, "vit", "small", 0.01, 4, 0.0)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        config_from_dict(apply_overrides({}, ["optim.lr_typo=1"]))


def test_overrides_are_typed_and_bad_ones_name_the_field():
    cfg = load_config(None, ["optim.lr=3e-4", "data.batch_size=8", "student.image_size=112"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert (cfg.data.batch_size, cfg.student.image_size, cfg.student.frames) == (8, 112, 0)
    for override, field in [("optim.lr_typo=1", "optim.lr_typo: unknown field"),
                            ("data.batch_size=many", "data.batch_size"), ("steps=1.5", "steps"),
                            ("student.size=huge", "student: size must be one of"),
                            ("report_to=[tensorboard,neptune]", "report_to: unknown sink")]:
        with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
            load_config(None, [override])


def test_a_bad_override_fails_the_cli_with_exit_code_2_before_any_worker(tmp_path):
    from tests.conftest import run_cli

    rc, _, err = run_cli(["train", "--store", str(tmp_path / "nostore"), "--key", "k", "--out", str(tmp_path / "o"),
                          "--set", "optim.lr=fast"], check=False)
    assert rc == 2 and "optim.lr" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["train-small.yaml", "train-vit-small.yaml", "byol-baseline.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / name))
    assert cfg.steps > 0 and cfg.student.image_size in (0, 224)  # 0: the KEY's crop


def test_demo_yaml_is_the_demo_config():
    from pathlib import Path

    from subsume.demo import demo_train_config

    shipped = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    assert shipped.to_dict() == demo_train_config().to_dict()


@pytest.fixture
def patch_store_key(tmp_path):
    store = FeatureStore(str(tmp_path / "pstore"))
    key = store.ensure_key(small_spec(patch_grid=2))
    for i in range(6):
        add_video(store, key, f"p{i}", 2, labels={"kind": "ab"[i % 2]})
    return store.root, key


def test_views_window_the_patch_grids_with_their_targets():
    from training.augment import grid_mean_targets
    from training.loop import make_views

    b, t, g = 3, 6, 2
    targets = torch.arange(b * t, dtype=torch.float32).view(b, t, 1).expand(b, t, 5).contiguous()
    patches = targets[:, :, None, None, :].expand(b, t, g, g, 5).contiguous()  # grid mean == the frame's target
    frames = torch.zeros(b, t, 4, 4, 3, dtype=torch.uint8)
    cfg = tiny_cfg()
    cfg.student.frames = 3
    views, _ = make_views(frames, targets, cfg, torch.Generator().manual_seed(1), patches)
    for _, y, p in views:
        assert p.shape == (b, 3, g, g, 5)
        assert torch.equal(grid_mean_targets(p), y)


def test_random_crops_train_on_targets_pooled_from_the_patch_grid(patch_store_key, tmp_path):
    root, key = patch_store_key
    cfg = tiny_cfg(steps=4)
    cfg.augment.random_crop_scale = 0.5
    res = run_train(cfg, root, key, str(tmp_path / "run"), in_process=True)
    assert res["steps"] == 4 and all(map(lambda x: x == x, [res["loss_first"], res["loss_last"]]))  # not NaN
    heads = {k: v for k, v in _weights(res["checkpoint"]).items() if k.startswith("head.frame_head")}
    out_dim = {v.shape[0] for k, v in heads.items() if k.endswith("weight") and v.ndim == 2}
    from tests.storehelpers import DP

    assert DP in out_dim  # the frame head predicts patch-token means (dim Dp), not the D-dim embeddings
    # the same run without crops trains on the embeddings
    plain = run_train(tiny_cfg(steps=1), root, key, str(tmp_path / "plain"), in_process=True)
    plain_heads = _weights(plain["checkpoint"])
    from tests.storehelpers import D

    assert any(v.shape[0] == D for k, v in plain_heads.items() if k.startswith("head.frame_head") and v.ndim == 2)


def test_random_crops_need_stored_patch_grids(store_key, tmp_path):
    root, key = store_key
    cfg = tiny_cfg(steps=1)
    cfg.augment.random_crop_scale = 0.5
    with pytest.raises(ValueError, match="patch grids"):
        run_train(cfg, root, key, str(tmp_path / "run"), in_process=True)
    cfg.targets = "online"
    with pytest.raises(ValueError, match="online"):
        run_train(cfg, root, key, str(tmp_path / "run2"), in_process=True)


def test_report_to_writes_tensorboard_beside_metrics_and_refuses_a_missing_extra(store_key, tmp_path):
    import importlib.util

    root, key = store_key
    cfg = tiny_cfg(steps=2)
    cfg.report_to = ["tensorboard"]
    run_train(cfg, root, key, str(tmp_path / "tb"))
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "tb" / "metrics.jsonl").exists() and (tmp_path / "tb" / "summary.json").exists()
    missing = [s for s in ("wandb", "mlflow") if importlib.util.find_spec(s) is None]
    if missing:  # optional extras: a clear error on the driver, before training starts
        cfg.report_to = missing
        with pytest.raises(ValueError, match=r"pip install 'subsume\["):
            run_train(cfg, root, key, str(tmp_path / "x"))
        assert not (tmp_path / "x" / "metrics.jsonl").exists()
