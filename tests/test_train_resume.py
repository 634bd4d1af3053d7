"""Exact resume on N workers: two Ray Train workers with uneven data, one of them killed after an epoch
wrapped; the restarted run ends with bitwise the same weights as an unbroken one (CPU)."""

import os

import pytest
import torch

from feature_store.store import FeatureStore
from tests.storehelpers import add_video, small_spec
from training.checkpoint import rank_file
from training.config import DataConfig, LoaderConfig, OptimConfig, TrainConfig
from training.models import StudentConfig
from training.train import run_train

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def uneven_store(tmp_path):
    """5 shards of 3, 1, 2, 2 and 1 samples: 2 workers x 2 loader streams get different amounts each epoch."""
    store = FeatureStore(str(tmp_path / "store"))
    key = store.ensure_key(small_spec())
    for i, n in enumerate((3, 1, 2, 2, 1)):
        add_video(store, key, f"u{i}", n, labels={"kind": "ab"[i % 2]})
    return store.root, key


def _cfg(callbacks=()):
    return TrainConfig(steps=6, workers=2, checkpoint_every=3, log_every=1, max_failures=1, callbacks=list(callbacks),
                       report_to=[], student=StudentConfig(arch="r2plus1d", size="tiny", frames=2, image_size=8),
                       data=DataConfig(batch_size=2, shuffle_buffer=3, heldout_fraction=0.0),
                       loader=LoaderConfig(num_workers=2, prefetch_factor=2), optim=OptimConfig(warmup_steps=1))


def _state(ckpt, name="state.pt"):
    return torch.load(os.path.join(ckpt, name), weights_only=True)


def test_two_workers_killed_after_an_epoch_wrap_resume_to_bitwise_the_same_weights(uneven_store, ray_session,
                                                                                      tmp_path):
    root, key = uneven_store
    straight = run_train(_cfg(), root, key, str(tmp_path / "a"), in_process=False)
    crashed = run_train(_cfg(["tests.train_hooks:crash_after_step_3"]), root, key, str(tmp_path / "b"),
                        in_process=False)
    assert (tmp_path / "b" / ".test-crash-done").exists()  # rank 0 really died once
    # The checkpoint the restart resumed from: each rank's own position, past an epoch wrap, not the same.
    # (Ray Train also writes a file checkpoint_manager_snapshot.json beside the checkpoint folders.)
    saved = [c for c in (tmp_path / "b" / "ray").glob("*/checkpoint_*") if (c / "state.pt").is_file()]
    step3 = next(c for c in saved if _state(c)["step"] == 3)
    positions = [_state(step3, rank_file(r))["position"] for r in (0, 1)]
    assert positions[0] != positions[1]
    assert max(e for p in positions for e, _ in p["streams"]) >= 1, positions
    assert crashed["steps"] == straight["steps"] == 6 and crashed["resumed_at"] == 3 and straight["resumed_at"] is None
    assert crashed["loss_history"] == straight["loss_history"]
    a, b = _state(straight["checkpoint"])["model"], _state(crashed["checkpoint"])["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
