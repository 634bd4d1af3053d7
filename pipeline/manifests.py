"""Labelled manifests with a train/test `split` column, for downstream evaluation (training/downstream.py).

The output is the CSV manifest `subsume extract --videos` reads (pipeline/sources.py): a `path` column, a
`video_id`, and label columns; here one class label (default column name `action`) and `split` (`train` or
`test`). Three sources:

- UCF101's official split files (`ucfTrainTestlist/`): `classInd.txt` ("1 ApplyEyeMakeup"),
  `trainlist0N.txt` ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and `testlist0N.txt`
  ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi": the class is the folder), N = 1..3; videos at
  VIDEOS/<Class>/<file>.avi (the `UCF-101/` folder of the official archive).
- HMDB51's official split files (`testTrainMulti_7030_splits/`): one `<class>_test_split<N>.txt` per class,
  lines "<file>.avi <0|1|2>" (1 train, 2 test, 0 in neither: left out); videos at VIDEOS/<class>/<file>.avi.
- An existing manifest (e.g. the demo's): `holdout` adds a deterministic `split` column, by a hash of each
  video_id (stratified per class when asked), so a rerun gives the same split.
"""

from __future__ import annotations

import csv
import hashlib
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "test")
HMDB_CODES = {"1": "train", "2": "test"}  # "0": in neither split
_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d)\.txt$")


class ManifestError(ValueError):
    """A split file or manifest that cannot be read as documented; the message names the file and line."""


@dataclass(frozen=True)
class ManifestRow:
    path: str  # absolute local path or URL of the video
    video_id: str
    label: str
    split: str  # "train" | "test"


@dataclass
class ManifestSummary:
    dataset: str
    out: str
    videos: int
    train: int
    test: int
    classes: int
    left_out: int = 0  # HMDB51 rows marked 0 (in neither split)
    missing: int = 0  # local videos the manifest names that do not exist (the extractor records them as failed)
    missing_examples: list[str] = field(default_factory=list)


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise ManifestError(f"{path}: no such split file")
    with open(path, encoding="utf-8", errors="replace") as f:  # the official files end lines with CRLF
        return [(i, ln.strip()) for i, ln in enumerate(f, start=1) if ln.strip()]


def _video_path(videos: str, rel: str) -> str:
    if "://" in videos:
        return posixpath.join(videos.rstrip("/"), rel)
    return os.path.join(os.path.abspath(videos), *rel.split("/"))


def _check_split_number(split: int) -> None:
    if split not in (1, 2, 3):
        raise ManifestError(f"split must be 1, 2 or 3 (the official splits), got {split}")


def ucf101_classes(splits_dir: Path) -> dict[str, str]:
    """classInd.txt -> {class index: class name}."""
    path = splits_dir / "classInd.txt"
    out: dict[str, str] = {}
    for n, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ManifestError(f"{path}:{n}: expected '<index> <ClassName>', got {line!r}")
        out[parts[0]] = parts[1]
    return out


def ucf101_rows(splits_dir: str | Path, videos: str, split: int) -> list[ManifestRow]:
    """The videos of UCF101's official split `split`, labelled with their class name."""
    _check_split_number(split)
    splits_dir = Path(splits_dir)
    classes = ucf101_classes(splits_dir)
    by_name = {name.lower(): name for name in classes.values()}
    rows: list[ManifestRow] = []
    for which in SPLITS:
        path = splits_dir / f"{which}list{split:02d}.txt"
        for n, line in _lines(path):
            parts = line.split()
            rel, index = parts[0], parts[1] if len(parts) > 1 else None
            folder = rel.split("/")[0] if "/" in rel else None
            if index is not None and index not in classes:
                raise ManifestError(f"{path}:{n}: class index {index} is not in classInd.txt")
            label = classes[index] if index is not None else by_name.get((folder or "").lower())
            if label is None:
                raise ManifestError(f"{path}:{n}: cannot tell the class of {rel!r} (its folder is not a class "
                                    "of classInd.txt)")
            rows.append(ManifestRow(_video_path(videos, rel), _video_id(rel), label, which))
    return _unique(rows)


def hmdb51_rows(splits_dir: str | Path, videos: str, split: int) -> tuple[list[ManifestRow], int]:
    """The videos of HMDB51's official split `split` and the number marked 0 (in neither split)."""
    _check_split_number(split)
    splits_dir = Path(splits_dir)
    files = sorted(p for p in splits_dir.glob(f"*_test_split{split}.txt") if _HMDB_FILE.match(p.name))
    if not files:
        raise ManifestError(f"{splits_dir}: no '<class>_test_split{split}.txt' files")
    rows: list[ManifestRow] = []
    left_out = 0
    for path in files:
        label = _HMDB_FILE.match(path.name)["cls"]
        for n, line in _lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ManifestError(f"{path}:{n}: expected '<video>.avi <0|1|2>', got {line!r}")
            if parts[1] == "0":
                left_out += 1
                continue
            rel = f"{label}/{parts[0]}"
            rows.append(ManifestRow(_video_path(videos, rel), _video_id(rel), label, HMDB_CODES[parts[1]]))
    return _unique(rows), left_out


def _video_id(rel: str) -> str:
    """<class folder>/<file stem>: unique in both datasets, and readable."""
    return posixpath.splitext(rel)[0]


def _unique(rows: list[ManifestRow]) -> list[ManifestRow]:
    seen: dict[str, ManifestRow] = {}
    for r in rows:
        if r.video_id in seen:
            raise ManifestError(f"video {r.video_id} is listed twice (in {seen[r.video_id].split} and {r.split})")
        seen[r.video_id] = r
    return rows


def n_test_videos(n: int, fraction: float) -> int:
    """Videos of one class (of n) that go to test: round(fraction * n), but at least one and never all."""
    return 0 if n < 2 else min(max(round(fraction * n), 1), n - 1)


def _hash01(text: str, seed: int) -> float:
    h = hashlib.sha256(f"holdout:{seed}:{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def holdout_rows(manifest: str | Path, test_fraction: float, *, stratify: str | None = None,
                 seed: int = 0) -> tuple[list[dict[str, str]], list[str]]:
    """An existing CSV manifest's rows with a `split` column added: per class of `stratify` (or over all rows)
    the round(test_fraction * n) videos with the smallest hash of their video_id go to test. Relative paths
    are made absolute (the new manifest may live elsewhere). Returns (rows, column names)."""
    if not 0 < test_fraction < 1:
        raise ManifestError(f"test fraction must be in (0, 1), got {test_fraction}")
    rows, columns = _read_csv(Path(manifest))
    if stratify and stratify not in columns:
        raise ManifestError(f"{manifest} has no column {stratify!r} to stratify by (columns: {', '.join(columns)})")
    groups: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault(r.get(stratify, "") if stratify else "", []).append(r)
    for group in groups.values():
        group.sort(key=lambda r: _hash01(r["video_id"], seed))
        n_test = n_test_videos(len(group), test_fraction)
        for i, r in enumerate(group):
            r["split"] = "test" if i < n_test else "train"
    return rows, [c for c in columns if c != "split"] + ["split"]


def _read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    if path.suffix.lower() != ".csv" or not path.is_file():
        raise ManifestError(f"{path}: not a CSV manifest")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "path" not in columns:
        raise ManifestError(f"{path} has no 'path' column (columns: {', '.join(columns)})")
    base = path.resolve().parent
    for r in rows:
        p = r["path"]
        if "://" not in p and not os.path.isabs(p):
            r["path"] = str(base / p)
        r["video_id"] = r.get("video_id") or posixpath.splitext(posixpath.basename(p))[0]
    return rows, columns if "video_id" in columns else ["path", "video_id", *columns[1:]]


def write_rows(rows: list[ManifestRow], out: str | Path, label_column: str = "action") -> None:
    if label_column in ("path", "video_id", "split"):
        raise ManifestError(f"label column {label_column!r} would clash with a manifest column")
    write_dicts([{"path": r.path, "video_id": r.video_id, label_column: r.label, "split": r.split} for r in rows],
                ["path", "video_id", label_column, "split"], out)


def write_dicts(rows: list[dict[str, str]], columns: list[str], out: str | Path) -> None:
    """Written whole to a temp file, then renamed: a half-written manifest is never left behind."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise ManifestError(f"{out}: the manifest is written as CSV (name it .csv)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)


def summarize(dataset: str, out: str | Path, rows: list[dict[str, str]], label_column: str | None,
              left_out: int = 0) -> ManifestSummary:
    """Counts, and the local videos that do not exist (first few named)."""
    missing = [r["path"] for r in rows if "://" not in r["path"] and not os.path.exists(r["path"])]
    return ManifestSummary(dataset=dataset, out=str(out), videos=len(rows),
                           train=sum(r["split"] == "train" for r in rows),
                           test=sum(r["split"] == "test" for r in rows),
                           classes=len({r[label_column] for r in rows}) if label_column else 0, left_out=left_out,
                           missing=len(missing), missing_examples=missing[:5])


def official_manifest(dataset: str, splits_dir: str, videos: str, split: int, out: str,
                      label_column: str = "action") -> ManifestSummary:
    """UCF101 / HMDB51 official split `split` -> manifest CSV at `out`."""
    if dataset == "ucf101":
        rows, left_out = ucf101_rows(splits_dir, videos, split), 0
    elif dataset == "hmdb51":
        rows, left_out = hmdb51_rows(splits_dir, videos, split)
    else:
        raise ManifestError(f"unknown dataset {dataset!r} (ucf101 | hmdb51)")
    write_rows(rows, out, label_column)
    dicts = [{"path": r.path, label_column: r.label, "split": r.split} for r in rows]
    return summarize(dataset, out, dicts, label_column, left_out)


def holdout_manifest(manifest: str, test_fraction: float, out: str, *, stratify: str | None = None,
                     seed: int = 0) -> ManifestSummary:
    rows, columns = holdout_rows(manifest, test_fraction, stratify=stratify, seed=seed)
    write_dicts(rows, columns, out)
    return summarize("holdout", out, rows, stratify)
