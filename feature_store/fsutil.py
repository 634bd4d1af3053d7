"""The few filesystem operations the store's guarantees rest on, for local disks and object storage.

- `atomic_write`: readers see the old bytes or the new bytes, never a part. Local: a temp file in the same
  folder, fsync, rename. Object storage: one PUT (an object appears only when its upload completes).
- `create_exclusive`: write only if the path does not exist yet, atomically. Local: temp file + hard link
  (link fails if the target exists). S3: a conditional PUT with If-None-Match: * (s3fs mode="create").
  This is what makes concurrent commits safe: two writers cannot both create snapshot N.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def _durable_temp_beside(path: str, data: bytes) -> str:
    """Write `data` to a fresh temp file in `path`'s folder (same filesystem, so a rename is atomic), synced."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if is_local(fs):
        os.replace(_durable_temp_beside(path, data), path)
    else:
        fs.pipe_file(path, data)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` with `data` unless it exists. Returns False if someone else created it first."""
    if is_local(fs):
        tmp = _durable_temp_beside(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except (FileExistsError, OSError) as e:
        if isinstance(e, FileExistsError) or "PreconditionFailed" in repr(e) or "412" in str(e):
            return False
        raise


def put_file_atomic(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Publish a finished local file at `path` (rename locally, upload on object storage)."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local_path, path)
    else:
        fs.put_file(local_path, path)
        os.unlink(local_path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        return fs.exists(path)
    except FileNotFoundError:
        return False


def listdir(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """Entries of a folder (empty when it does not exist), fresh from the backend (no listing cache)."""
    fs.invalidate_cache(path)
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def entry_mtime(entry: dict[str, Any]) -> float:
    """Modification time of a listing entry, in seconds (local mtime, S3 LastModified, ...)."""
    m = entry.get("mtime") or entry.get("LastModified") or entry.get("last_modified") or entry.get("created")
    if hasattr(m, "timestamp"):
        m = m.timestamp()
    return float(m) if m is not None else 0.0


def mtime(fs: fsspec.AbstractFileSystem, path: str) -> float:
    fs.invalidate_cache(path)
    return entry_mtime(fs.info(path))


class NotExclusive(OSError):
    pass


def probe_exclusive_create(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Refuse a backend whose exclusive create is not exclusive (fsspec's default create is exists-then-write,
    so two writers could both create spec.json or a lease): create one probe object twice; the second must fail."""
    from fsspec.asyn import AsyncFileSystem
    from fsspec.spec import AbstractFileSystem

    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    backend = f"{type(fs).__module__}.{type(fs).__name__} ({proto}://)"
    # async backends (s3fs, gcsfs...) implement _pipe_file themselves; the probe below tests what they do
    inherits_default = not isinstance(fs, AsyncFileSystem) and type(fs).pipe_file is AbstractFileSystem.pipe_file
    if not is_local(fs) and inherits_default:
        raise NotExclusive(f"the storage backend {backend} creates files with fsspec's default exists-then-write, "
                           f"which two writers can both pass; the store needs an atomic exclusive create "
                           f"(local disks, S3 conditional PUT) and refuses to write there")
    path = join(folder, uuid.uuid4().hex)
    try:
        first = create_exclusive(fs, path, b"probe")
        second = create_exclusive(fs, path, b"probe")
    finally:
        try:
            fs.rm_file(path)
        except OSError:
            pass
    if not first or second:
        raise NotExclusive(f"the storage backend {backend} does not "
                           f"create files exclusively (a second create of {path} succeeded); concurrent writers "
                           f"could overwrite each other's spec and leases, so the store refuses to write there")
