"""The in-process executor: when `auto` picks it, and its plumbing (errors surface, the teacher is checked).
Its end-to-end equality with the Ray pipeline is in tests/test_e2e.py."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline.extract import LOCAL_MAX_BYTES, LOCAL_MAX_VIDEOS, choose_executor
from pipeline.plan import WORK_SCHEMA


def test_auto_runs_a_small_job_in_process_only_when_no_cluster_is_in_use():
    assert choose_executor("auto", 10, 10_000, ray_in_use=False) == "local"
    assert choose_executor("auto", LOCAL_MAX_VIDEOS, LOCAL_MAX_BYTES, ray_in_use=False) == "local"
    assert choose_executor("auto", 10, 10_000, ray_in_use=True) == "ray"
    assert choose_executor("auto", LOCAL_MAX_VIDEOS + 1, 10_000, ray_in_use=False) == "ray"
    assert choose_executor("auto", 10, LOCAL_MAX_BYTES + 1, ray_in_use=False) == "ray"


def test_an_explicit_executor_is_kept_and_an_unknown_one_refused():
    assert choose_executor("ray", 1, 1, ray_in_use=False) == "ray"
    assert choose_executor("local", 10**6, 10**12, ray_in_use=True) == "local"
    with pytest.raises(ValueError, match="executor must be one of"):
        choose_executor("dask", 1, 1, ray_in_use=False)


def test_the_cli_help_states_the_auto_limits():
    import argparse

    from subsume.cli import _add_extract

    sub = argparse.ArgumentParser().add_subparsers()
    _add_extract(sub)
    text = sub.choices["extract"].format_help()
    assert f"at most {LOCAL_MAX_VIDEOS} videos and {LOCAL_MAX_BYTES // 2**20} MiB" in " ".join(text.split())


def _work(n: int) -> pa.Table:
    return pa.Table.from_pylist([{"source": f"/v/{i}.mp4", "source_raw": None, "video_id": str(i), "labels": [],
                                  "size": 1, "mtime": 0.0, "sha256": "", "have_segments": [], "attempts": 0}
                                 for i in range(n)], schema=WORK_SCHEMA)


class _BrokenStage:
    """A decode stage whose second video raises an error its own handler does not catch (a bug)."""

    def __init__(self):
        self.proc = SimpleNamespace(close=lambda: None)
        self.seen = 0

    def video_rows(self, work):
        self.seen += 1
        if self.seen == 2:
            raise RuntimeError("decode stage bug")
        yield [SimpleNamespace(source=work.source)]


def test_an_error_of_the_decode_thread_reaches_the_caller_after_the_rows_before_it():
    from pipeline.local import _DecodeThread

    thread = _DecodeThread(_work(3), _BrokenStage(), size=2)
    got = []
    with pytest.raises(RuntimeError, match="decode stage bug"):
        for batch in thread.batches(10):
            got += batch
    thread.close()
    assert got == []  # the partial batch is not handed on as if the work list had ended


def test_a_teacher_that_is_not_the_keys_is_refused_before_anything_is_decoded(tiny_teacher):
    import psutil
    import torch

    from feature_store.spec import TeacherSpec
    from pipeline.local import LocalStages, run_local
    from pipeline.stages import TeacherMismatch
    from tests.storehelpers import small_spec

    spec = small_spec()
    decode = dict(sampling=asdict(spec.sampling), preprocess=asdict(spec.preprocess), storage=asdict(spec.storage),
                  timeout_s=60.0)
    teacher = dict(teacher=asdict(TeacherSpec(model=str(tiny_teacher))), size=None, device="cpu", precision="fp32",
                   batch_size=8, storage={}, segment_frames=8, cpu_threads=1, expect={"fingerprint": "not-this-one"})
    stages = LocalStages(decode=decode, teacher=teacher, write={}, teacher_batch=1, shard_size=4)
    threads = torch.get_num_threads()
    with pytest.raises(TeacherMismatch, match="not the KEY's teacher"):
        next(run_local(_work(1), stages))  # /v/0.mp4 does not exist: decoding it would fail otherwise
    # the decoder child started while the teacher loaded is gone, and the caller's torch threads are back
    children = [p for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not [p for p in children if "spawn_main" in " ".join(p.cmdline())]  # (not multiprocessing's tracker)
    assert torch.get_num_threads() == threads


def test_the_decoder_starts_before_planning_only_when_the_run_may_decode_in_process(monkeypatch):
    from dataclasses import replace

    from feature_store.spec import TeacherSpec
    from pipeline.extract import ExtractConfig, early_decoder

    cfg = ExtractConfig(videos="videos.csv", store="store", teacher=TeacherSpec(model="teacher"))
    assert early_decoder(replace(cfg, dry_run=True)) is None
    assert early_decoder(replace(cfg, executor="ray")) is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster is addressed: auto will run on Ray
    assert early_decoder(replace(cfg, executor="auto")) is None
    proc = early_decoder(replace(cfg, executor="local", decode_timeout=7.0))
    try:
        assert proc.pid is not None and proc.timeout_s == 7.0 and proc.limits == cfg.decode_limits
    finally:
        proc.close()
    assert proc.pid is None
