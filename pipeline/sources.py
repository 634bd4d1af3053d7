"""Turn the user's SRC (folder, glob or manifest) into a list of videos with ids and labels."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

from feature_store.fsutil import is_local

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                    ".ts", ".mts", ".ogv"}
MANIFEST_EXTENSIONS = {".txt", ".csv", ".parquet"}


class SourceError(Exception):
    pass


@dataclass
class FileStat:
    size: int
    mtime: float  # or a stand-in derived from the ETag on object storage
    error: str = ""


@dataclass(frozen=True)
class VideoRef:
    source: str  # a local absolute path or a full fsspec URL
    video_id: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    stat: FileStat | None = field(default=None, hash=False, compare=False)  # from the listing, when it had one


def _full(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def list_videos(src: str, storage_options: dict[str, Any] | None = None) -> list[VideoRef]:
    """Folder (recursive), glob, or manifest (.txt / .csv / .parquet) → videos, in a stable order."""
    fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    if _ext(path) in MANIFEST_EXTENSIONS and fs.isfile(path):
        refs = _from_manifest(fs, path)
    elif any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)  # size and mtime/ETag come with the listing: no stat per video
        refs = [_ref_from_path(fs, p, None, found[p]) for p in sorted(found) if _ext(p) in VIDEO_EXTENSIONS]
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
        refs = [_ref_from_path(fs, p, path, found[p]) for p in sorted(found) if _ext(p) in VIDEO_EXTENSIONS]
    elif fs.isfile(path):
        refs = [_ref_from_path(fs, path, root=None)]
    else:
        raise SourceError(f"--videos {src!r}: no such folder, file or manifest")
    if not refs:
        raise SourceError(f"--videos {src!r}: no video files found "
                          f"(looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    return refs


def _ref_from_path(fs: fsspec.AbstractFileSystem, path: str, root: str | None,
                   info: dict[str, Any] | None = None) -> VideoRef:
    rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
    return VideoRef(source=_full(fs, path), video_id=posixpath.splitext(rel)[0],
                    stat=stat_from_info(info) if info else None)


def _resolve(fs: fsspec.AbstractFileSystem, base: str, p: str) -> str:
    """Manifest paths: URLs and absolute paths as they are; relative ones against the manifest's folder."""
    if "://" in p:
        return p
    if p.startswith("/"):
        return _full(fs, p)
    return _full(fs, posixpath.normpath(posixpath.join(base, p)))


def _from_manifest(fs: fsspec.AbstractFileSystem, path: str) -> list[VideoRef]:
    base = posixpath.dirname(path)
    ext = _ext(path)
    if ext == ".txt":
        with fs.open(path, "rt") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        out = []
        for p in lines:
            full = _resolve(fs, base, p)
            out.append(VideoRef(source=full, video_id=posixpath.splitext(posixpath.basename(p))[0]))
        return out
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        table = pq.read_table(f) if ext == ".parquet" else pacsv.read_csv(
            f, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    if "path" not in table.column_names:
        raise SourceError(f"manifest {path} has no 'path' column (columns: {', '.join(table.column_names)})")
    label_cols = [c for c in table.column_names if c not in ("path", "video_id")]
    out = []
    seen_ids: set[str] = set()
    for row in table.to_pylist():
        p = str(row["path"])
        vid = str(row["video_id"]) if row.get("video_id") not in (None, "") else posixpath.splitext(posixpath.basename(p))[0]
        if vid in seen_ids:
            raise SourceError(f"manifest {path}: video_id {vid!r} appears twice")
        seen_ids.add(vid)
        labels = {c: str(row[c]) for c in label_cols if row[c] is not None and str(row[c]) != ""}
        out.append(VideoRef(source=_resolve(fs, base, p), video_id=vid, labels=labels))
    return out


def stat_video(source: str, storage_options: dict[str, Any] | None = None) -> FileStat:
    """Cheap identity pre-check (size + mtime, or ETag on object storage) before hashing the bytes."""
    try:
        fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
        info = fs.info(path)
    except FileNotFoundError:
        return FileStat(0, 0.0, "missing")
    except OSError as e:
        return FileStat(0, 0.0, f"unreadable: {e}")
    return stat_from_info(info)


def stat_from_info(info: dict[str, Any]) -> FileStat:
    """A listing's (or stat's) entry -> size and mtime, or a stand-in derived from the ETag."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    etag = info.get("ETag") or info.get("etag")
    if etag:  # an ETag changes whenever the object's bytes do: fold it into the stand-in
        mtime = float(int(hashlib.sha256(str(etag).encode()).hexdigest()[:12], 16))
    return FileStat(int(info.get("size") or 0), float(mtime))


def hash_video(source: str, storage_options: dict[str, Any] | None = None) -> str:
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
