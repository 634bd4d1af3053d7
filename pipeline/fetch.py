"""One read per video: the decode stage hashes the bytes it hands the decoder.

A remote file is downloaded once into a bounded temp folder, hashed as its chunks arrive, and the decoder
child opens that copy. A local file is hashed just before the child decodes it, so the decoder's read is
served by the page cache. Failures are `DecodeError`s with the decoder's reasons (missing, io, too_large...).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from pipeline.decode import TMP_HEADROOM_BYTES, DecodeError, DecodeLimits, remote_size

CHUNK = 1 << 20


@contextlib.contextmanager
def hashed_local(source: str, storage_options: dict[str, Any] | None, limits: DecodeLimits,
                 tmp_dir: str | None = None) -> Iterator[tuple[str, str]]:
    """(a local path with the video's bytes, their sha256). A remote copy is removed on exit."""
    if "://" not in source or source.startswith("file://"):
        path = source.removeprefix("file://")
        yield path, _hash_local(path, limits)
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(source, **(storage_options or {}))
    folder = tmp_dir or tempfile.gettempdir()
    fd, tmp = tempfile.mkstemp(prefix="subsume-video-", suffix=os.path.splitext(remote)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            sha = _download(fs, remote, source, out, limits, folder)
        yield tmp, sha
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _hash_local(path: str, limits: DecodeLimits) -> str:
    if not os.path.exists(path):
        raise DecodeError("missing", f"{path} does not exist")
    if not os.path.isfile(path):
        raise DecodeError("not_a_video", f"{path} is not a regular file")
    limits.check_file(os.path.getsize(path), path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    except OSError as e:
        raise DecodeError("io", f"{path}: {e}") from e
    return h.hexdigest()


def _download(fs: Any, remote: str, source: str, out: Any, limits: DecodeLimits, folder: str) -> str:
    """Copy `remote` into `out` and hash it on the way, after its size passed the cap and fits the folder."""
    size = remote_size(fs, remote, source)
    limits.check_file(size, source)
    free = shutil.disk_usage(folder).free
    if size + TMP_HEADROOM_BYTES > free:
        raise DecodeError("io", f"{source}: {size} bytes do not fit in {folder} ({free} bytes free)")
    h = hashlib.sha256()
    try:
        with fs.open(remote, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
    except FileNotFoundError as e:
        raise DecodeError("missing", f"{source} does not exist") from e
    except OSError as e:
        raise DecodeError("io", f"{source}: copy failed: {e}") from e
    return h.hexdigest()
