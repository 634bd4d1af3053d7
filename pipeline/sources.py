"""Turn the user's SRC (folder, glob or manifest) into a list of videos with ids and labels."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

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
    table = _manifest_table(fs, path)
    return list(_manifest_refs(fs, path, table.to_pylist(), set()))


def _manifest_table(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        table = pq.read_table(f) if _ext(path) == ".parquet" else pacsv.read_csv(
            f, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    if "path" not in table.column_names:
        raise SourceError(f"manifest {path} has no 'path' column (columns: {', '.join(table.column_names)})")
    return table


def _manifest_refs(fs: fsspec.AbstractFileSystem, path: str, rows: list[dict[str, Any]],
                   seen_ids: set[str]) -> Iterator[VideoRef]:
    """VideoRefs of some rows of a CSV/Parquet manifest (`seen_ids` carries the ids of earlier rows)."""
    base = posixpath.dirname(path)
    for row in rows:
        p = str(row["path"])
        vid = str(row["video_id"]) if row.get("video_id") not in (None, "") else posixpath.splitext(posixpath.basename(p))[0]
        if vid in seen_ids:
            raise SourceError(f"manifest {path}: video_id {vid!r} appears twice")
        seen_ids.add(vid)
        labels = {c: str(v) for c, v in row.items() if c not in ("path", "video_id") and v is not None and str(v) != ""}
        yield VideoRef(source=_resolve(fs, base, p), video_id=vid, labels=labels)


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


# --- the listing as Arrow (what extraction plans with) ---------------------------------------------------

LISTING_SCHEMA = pa.schema([
    ("source", pa.string()), ("source_raw", pa.binary()),  # feature_store.names: a non-UTF-8 name as its bytes
    ("video_id", pa.string()), ("labels", pa.map_(pa.string(), pa.string())),
    ("size", pa.int64()), ("mtime", pa.float64()),  # from the listing (mtime, or an ETag stand-in)
    ("error", pa.string()),  # "" when listed readable; else why not ("missing", "unreadable: ...")
])
LIST_BATCH = 8192  # videos turned into Python objects at a time while listing


def listing_table(src: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Folder (recursive), glob, or manifest -> one row per video (LISTING_SCHEMA), sorted by source (a
    manifest: in its order).

    A folder is walked one directory at a time and a glob listed once, each with sizes and mtimes/ETags from
    the listing itself; a manifest's videos are stat'ed in parallel, one bounded batch at a time (but
    a text manifest's lines are read whole). Only one batch of videos is ever Python objects."""
    fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    if _ext(path) in MANIFEST_EXTENSIONS and fs.isfile(path):
        batches = list(_manifest_batches(fs, path, storage_options))
    elif any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
        batches = list(_entry_batches(fs, None, ((p, found[p]) for p in sorted(found))))
    elif fs.isdir(path):
        batches = list(_entry_batches(fs, path, _walk(fs, path)))
    elif fs.isfile(path):
        batches = list(_entry_batches(fs, None, [(path, fs.info(path))]))
    else:
        raise SourceError(f"--videos {src!r}: no such folder, file or manifest")
    table = pa.Table.from_batches(batches, LISTING_SCHEMA) if batches else LISTING_SCHEMA.empty_table()
    if table.num_rows == 0:
        raise SourceError(f"--videos {src!r}: no video files found "
                          f"(looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    return table if _ext(path) in MANIFEST_EXTENSIONS else table.sort_by("source")  # a manifest keeps its order


def _walk(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, listing entry) of every video under `root`, one directory's listing at a time."""
    for folder, _dirs, files in fs.walk(root, detail=True):
        for name in sorted(files):
            info = files[name]
            yield info.get("name") or posixpath.join(folder, name), info


def _entry_batches(fs: fsspec.AbstractFileSystem, root: str | None,
                   entries: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[pa.RecordBatch]:
    rows: list[dict[str, Any]] = []
    for p, info in entries:
        if _ext(p) not in VIDEO_EXTENSIONS or info.get("type") == "directory":
            continue
        ref = _ref_from_path(fs, p, root, info)
        rows.append(_listing_row(ref.source, ref.video_id, {}, ref.stat or FileStat(0, 0.0)))
        if len(rows) >= LIST_BATCH:
            yield pa.RecordBatch.from_pylist(rows, LISTING_SCHEMA)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, LISTING_SCHEMA)


def _listing_row(source: str, video_id: str, labels: dict[str, str], st: FileStat) -> dict[str, Any]:
    from feature_store.names import encode_name

    shown, raw = encode_name(source)
    return {"source": shown, "source_raw": raw, "video_id": video_id, "labels": list(labels.items()),
            "size": st.size, "mtime": st.mtime, "error": st.error}


def _manifest_batches(fs: fsspec.AbstractFileSystem, path: str,
                      storage_options: dict[str, Any] | None) -> Iterator[pa.RecordBatch]:
    """A manifest's rows in batches of LIST_BATCH, each batch stat'ed in parallel (threads)."""
    from concurrent.futures import ThreadPoolExecutor

    if _ext(path) == ".txt":
        chunks: Iterable[list[VideoRef]] = _chunks(_from_manifest(fs, path))
    else:
        table, seen = _manifest_table(fs, path), set()
        chunks = (list(_manifest_refs(fs, path, b.to_pylist(), seen)) for b in table.to_batches(LIST_BATCH))
    with ThreadPoolExecutor(max_workers=16) as pool:
        for chunk in chunks:
            stats = list(pool.map(lambda r: stat_video(r.source, storage_options), chunk))
            yield pa.RecordBatch.from_pylist([_listing_row(r.source, r.video_id, r.labels, st)
                                              for r, st in zip(chunk, stats)], LISTING_SCHEMA)


def _chunks(refs: list[VideoRef]) -> Iterator[list[VideoRef]]:
    for start in range(0, len(refs), LIST_BATCH):
        yield refs[start:start + LIST_BATCH]
