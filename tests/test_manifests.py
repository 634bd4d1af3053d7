"""Official split files (UCF101, HMDB51) and holdout splits -> the manifest CSV the extractor reads.

The split files here are hand-written in the official formats (CRLF line ends, trailing spaces, the UCF101
test lists without a class index, HMDB51's 0/1/2 codes), small enough to check every row.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.manifests import (ManifestError, holdout_manifest, holdout_rows, hmdb51_rows, official_manifest,
                                ucf101_rows)
from pipeline.sources import list_videos


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", "\r\n").encode())  # the official files end lines with CRLF
    return path


@pytest.fixture
def ucf(tmp_path) -> Path:
    d = tmp_path / "ucfTrainTestlist"
    _write(d / "classInd.txt", "1 ApplyEyeMakeup\n2 Archery\n37 HandstandPushups\n")
    _write(d / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
                                  "Archery/v_Archery_g08_c02.avi 2\n"
                                  "HandstandPushups/v_HandStandPushups_g08_c01.avi 37\n")
    _write(d / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n"
                                 "Archery/v_Archery_g01_c01.avi\n\n"
                                 "handstandpushups/v_HandStandPushups_g01_c01.avi\n")
    _write(d / "trainlist02.txt", "Archery/v_Archery_g01_c01.avi 2\n")
    _write(d / "testlist02.txt", "Archery/v_Archery_g08_c02.avi\n")
    return d


def test_ucf101_rows_follow_the_official_lists(ucf, tmp_path):
    rows = ucf101_rows(ucf, str(tmp_path / "UCF-101"), 1)
    got = {(r.video_id, r.label, r.split) for r in rows}
    assert got == {("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "ApplyEyeMakeup", "train"),
                   ("Archery/v_Archery_g08_c02", "Archery", "train"),
                   ("HandstandPushups/v_HandStandPushups_g08_c01", "HandstandPushups", "train"),
                   ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", "ApplyEyeMakeup", "test"),
                   ("Archery/v_Archery_g01_c01", "Archery", "test"),
                   # the class of a test row is its folder, matched to classInd.txt without regard to case
                   ("handstandpushups/v_HandStandPushups_g01_c01", "HandstandPushups", "test")}
    assert rows[0].path == str(tmp_path / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi")
    split2 = {(r.video_id, r.split) for r in ucf101_rows(ucf, str(tmp_path), 2)}
    assert split2 == {("Archery/v_Archery_g01_c01", "train"), ("Archery/v_Archery_g08_c02", "test")}


def test_ucf101_errors_name_the_file_and_line(ucf, tmp_path):
    with pytest.raises(ManifestError, match="must be 1, 2 or 3"):
        ucf101_rows(ucf, str(tmp_path), 4)
    with pytest.raises(ManifestError, match="trainlist03.txt: no such split file"):
        ucf101_rows(ucf, str(tmp_path), 3)
    _write(ucf / "trainlist02.txt", "Archery/v_Archery_g01_c01.avi 2\nArchery/v_Archery_g02_c01.avi 99\n")
    with pytest.raises(ManifestError, match=r"trainlist02.txt:2: class index 99"):
        ucf101_rows(ucf, str(tmp_path), 2)
    _write(ucf / "trainlist02.txt", "Archery/v_Archery_g01_c01.avi 2\n")
    _write(ucf / "testlist02.txt", "Bowling/v_Bowling_g01_c01.avi\n")
    with pytest.raises(ManifestError, match=r"testlist02.txt:1: cannot tell the class"):
        ucf101_rows(ucf, str(tmp_path), 2)
    _write(ucf / "testlist02.txt", "Archery/v_Archery_g01_c01.avi\n")
    with pytest.raises(ManifestError, match="listed twice"):
        ucf101_rows(ucf, str(tmp_path), 2)


@pytest.fixture
def hmdb(tmp_path) -> Path:
    d = tmp_path / "testTrainMulti_7030_splits"
    _write(d / "brush_hair_test_split1.txt", "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
                                             "Aussie_Brush_hair_u_nm_np1_fr_med_0.avi 2 \n"
                                             "Blonde_being_brushed_u_nm_np1_ba_med_2.avi 0 \n")
    _write(d / "shoot_ball_test_split1.txt", "#122_Cleaning_Up_The_Beach_shoot_ball_f_cm_np1_ba_med_1.avi 2 \n"
                                             "3-pointers_shoot_ball_u_cm_np1_ba_med_0.avi 1 \n")
    _write(d / "brush_hair_test_split2.txt", "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 \n")
    return d


def test_hmdb51_rows_follow_the_official_codes(hmdb, tmp_path):
    rows, left_out = hmdb51_rows(hmdb, str(tmp_path / "hmdb51_org"), 1)
    assert left_out == 1  # code 0: in neither split
    assert {(r.video_id, r.label, r.split) for r in rows} == {
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0", "brush_hair", "train"),
        ("brush_hair/Aussie_Brush_hair_u_nm_np1_fr_med_0", "brush_hair", "test"),
        ("shoot_ball/#122_Cleaning_Up_The_Beach_shoot_ball_f_cm_np1_ba_med_1", "shoot_ball", "test"),
        ("shoot_ball/3-pointers_shoot_ball_u_cm_np1_ba_med_0", "shoot_ball", "train")}
    assert str(tmp_path / "hmdb51_org" / "shoot_ball" / "3-pointers_shoot_ball_u_cm_np1_ba_med_0.avi") in {
        r.path for r in rows}
    rows2, _ = hmdb51_rows(hmdb, "s3://bucket/hmdb51/", 2)
    assert [(r.path, r.split) for r in rows2] == [
        ("s3://bucket/hmdb51/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "test")]


def test_hmdb51_errors(hmdb):
    with pytest.raises(ManifestError, match="no '<class>_test_split3.txt' files"):
        hmdb51_rows(hmdb, "/v", 3)
    _write(hmdb / "brush_hair_test_split2.txt", "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 3\n")
    with pytest.raises(ManifestError, match=r"brush_hair_test_split2.txt:1: expected"):
        hmdb51_rows(hmdb, "/v", 2)


def test_the_written_manifest_is_what_the_extractor_reads(ucf, tmp_path):
    """Round trip through pipeline.sources: the labels the extractor records are the class and the split."""
    videos = tmp_path / "UCF-101"
    (videos / "Archery").mkdir(parents=True)
    (videos / "Archery" / "v_Archery_g08_c02.avi").write_bytes(b"x")
    out = tmp_path / "m" / "ucf101_split1.csv"
    summary = official_manifest("ucf101", str(ucf), str(videos), 1, str(out))
    assert (summary.videos, summary.train, summary.test, summary.classes) == (6, 3, 3, 3)
    assert summary.missing == 5 and len(summary.missing_examples) == 5  # only one video exists here
    refs = {r.video_id: r for r in list_videos(str(out))}
    assert refs["Archery/v_Archery_g08_c02"].labels == {"action": "Archery", "split": "train"}
    assert refs["Archery/v_Archery_g08_c02"].source == str(videos / "Archery" / "v_Archery_g08_c02.avi")
    assert not list(out.parent.glob("*.tmp"))
    with pytest.raises(ManifestError, match="clash"):
        official_manifest("ucf101", str(ucf), str(videos), 1, str(out), label_column="split")


def _demo_manifest(tmp_path: Path, n_per_class: int = 10) -> Path:
    path = tmp_path / "data" / "manifest.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "video_id", "shape", "colour"])
        for shape in ("circle", "square", "triangle"):
            for i in range(n_per_class):
                w.writerow([f"videos/{shape}_{i}.mp4", f"{shape}_{i}", shape, "red"])
    return path


def test_holdout_adds_a_deterministic_stratified_split(tmp_path):
    src = _demo_manifest(tmp_path)
    rows, cols = holdout_rows(src, 0.3, stratify="shape")
    assert cols == ["path", "video_id", "shape", "colour", "split"]
    for shape in ("circle", "square", "triangle"):
        assert sum(r["split"] == "test" for r in rows if r["shape"] == shape) == 3  # 0.3 of 10, per class
    assert rows[0]["path"] == str(tmp_path / "data" / "videos" / rows[0]["video_id"]) + ".mp4"  # made absolute
    again, _ = holdout_rows(src, 0.3, stratify="shape")
    assert [r["split"] for r in again] == [r["split"] for r in rows]  # a rerun gives the same split
    other, _ = holdout_rows(src, 0.3, stratify="shape", seed=1)
    assert [r["split"] for r in other] != [r["split"] for r in rows]
    summary = holdout_manifest(str(src), 0.3, str(tmp_path / "split.csv"), stratify="shape")
    assert (summary.train, summary.test, summary.classes) == (21, 9, 3)
    with pytest.raises(ManifestError, match="no column 'action'"):
        holdout_rows(src, 0.3, stratify="action")
    with pytest.raises(ManifestError, match=r"in \(0, 1\)"):
        holdout_rows(src, 1.0)
