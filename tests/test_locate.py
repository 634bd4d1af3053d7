"""Finding a run's latest checkpoint among what Ray Train leaves in a run folder (pure file layout)."""

import json

import pytest

from training.checkpoint import LINEAGE_FILE
from training.locate import find_checkpoint


def _checkpoint(folder, step):
    folder.mkdir(parents=True)
    (folder / LINEAGE_FILE).write_text(json.dumps({"step": step}))


def test_ray_run_folder_means_the_highest_step_and_skips_ray_own_files(tmp_path):
    run = tmp_path / "out" / "ray" / "subsume-abc"
    _checkpoint(run / "checkpoint_2026-11-30_00-00-01.000001", 3)
    _checkpoint(run / "checkpoint_2026-11-30_00-00-02.000002", 6)
    (run / "checkpoint_2026-11-30_00-00-03.000003").mkdir()  # being written: no lineage yet
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own bookkeeping, a file
    assert find_checkpoint(str(tmp_path / "out")).endswith("checkpoint_2026-11-30_00-00-02.000002")
    assert find_checkpoint(str(run)).endswith("checkpoint_2026-11-30_00-00-02.000002")


def test_a_folder_without_checkpoints_says_what_it_looked_for(tmp_path):
    (tmp_path / "ray" / "r").mkdir(parents=True)
    (tmp_path / "ray" / "r" / "checkpoint_manager_snapshot.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="ray/\\*/checkpoint_\\*"):
        find_checkpoint(str(tmp_path))
