"""Ingest end to end on a real cluster: a folder with a copy of a video and, on a second run, a renamed file
and a new one. New files are hashed by the decode stage (nothing before planning); same bytes under two names
end as one video's rows in the KEY's index, the other counted as a duplicate; the work list is Parquet in the
run's scratch folder and gone after the run."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from feature_store.spec import SamplingSpec, TeacherSpec
from feature_store.store import FeatureStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def extract(videos: Path, store: Path, teacher: Path, **kw):
    from pipeline.extract import ExtractConfig, run_extract

    cfg = ExtractConfig(videos=str(videos), store=str(store), teacher=TeacherSpec(model=str(teacher)),
                        sampling=SamplingSpec(fps=12, segment_frames=8), samples_per_shard=4, progress=False, **kw)
    return run_extract(cfg)


def test_copies_are_decoded_once_each_and_indexed_once(sample_videos, tiny_teacher, ray_session, tmp_path,
                                                       monkeypatch):
    import pipeline.sources as sources

    src = sorted((sample_videos.parent / "videos").glob("*.mp4"))[:3]
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    for p in src[:2]:
        shutil.copy(p, folder / p.name)
    shutil.copy(src[0], folder / "sub" / "copy.mp4")  # the same bytes as src[0], another name
    store = tmp_path / "store"

    def no_hash(*a, **kw):
        raise AssertionError("a new file was hashed before planning")

    monkeypatch.setattr("pipeline.extract.hash_video", no_hash)
    monkeypatch.setattr(sources, "hash_video", no_hash)
    dry = extract(folder, store, tiny_teacher, dry_run=True)
    assert dry["to_compute"] == 3 and dry["duplicates"] == 0  # the copy is not known yet: found at commit
    first = extract(folder, store, tiny_teacher)
    assert first["videos_failed"] == 0 and first["videos_duplicate"] == 1 and first["videos_ok"] == 2
    key = first["key"]
    snap = FeatureStore(str(store)).open(key)
    index = snap.index.to_pylist()
    by_sha = {}
    for r in index:
        by_sha.setdefault(r["video_sha256"], set()).add(Path(r["source"]).name)
    sha0 = hashlib.sha256(src[0].read_bytes()).hexdigest()
    assert set(by_sha) == {sha0, hashlib.sha256(src[1].read_bytes()).hexdigest()}
    assert len(by_sha[sha0]) == 1  # one name's rows only
    assert snap.duplicates.num_rows == 0 and first["samples_duplicate"] > 0
    assert not list((store / key / "_tmp").glob("*/worklist"))  # the run's work list is removed

    # a rename of a stored file and a new file: the renamed bytes are indexed under their first name
    shutil.move(folder / src[1].name, folder / "renamed.mp4")
    shutil.copy(src[2], folder / src[2].name)
    second = extract(folder, store, tiny_teacher)
    assert second["videos_reused"] == 1  # src[0]; its copy is a recorded copy: not decoded again
    assert second["videos_duplicate"] == 2 and second["videos_failed"] == 0  # the copy, and the renamed bytes
    after = FeatureStore(str(store)).open(key)
    assert after.manifest["counts"]["videos"] == 3
    names = {Path(r["source"]).name for r in after.index.to_pylist()}
    assert "renamed.mp4" not in names and src[2].name in names
    # the old name is gone from the listing: the next run reuses the content under its new name
    third = extract(folder, store, tiny_teacher, dry_run=True)
    assert third["to_compute"] == 0 and third["reused"] == 3 and third["duplicates"] == 1
    assert third["metadata_updates"] == 1
