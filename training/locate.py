"""Finding and opening a checkpoint: a checkpoint folder, or a run folder meaning its latest checkpoint
(OUT/checkpoints/step_N from an in-process run, OUT/ray/<run>/checkpoint_* or a Ray Train run folder),
local or on object storage (s3://...)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec

from training.checkpoint import EXPORT_DIR, LINEAGE_FILE

PATTERNS = ("checkpoints/step_*", "ray/*/checkpoint_*", "checkpoint_*")


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def find_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """The checkpoint `path` names: itself, or the one with the highest step under a run folder."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.exists(f"{root}/{LINEAGE_FILE}"):
        return _url(fs, root)
    found: list[tuple[int, str]] = []
    for pattern in PATTERNS:
        for folder in fs.glob(f"{root}/{pattern}"):
            lineage = f"{folder}/{LINEAGE_FILE}"
            if not folder.endswith(".tmp") and fs.exists(lineage):
                found.append((int(json.loads(fs.cat_file(lineage)).get("step", 0)), folder))
    if not found:
        raise FileNotFoundError(f"{path}: neither a training checkpoint (no {LINEAGE_FILE}) nor a run folder "
                                f"holding one ({', '.join(PATTERNS)})")
    return _url(fs, max(found)[1])


@contextmanager
def open_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """(local folder with the lineage and the exported student, the checkpoint's own address). Remote
    checkpoints are copied to a temp folder, without the optimiser state eval and embed do not need."""
    where = find_checkpoint(path, storage_options)
    if "://" not in where:
        yield where, where
        return
    fs, root = fsspec.core.url_to_fs(where, **(storage_options or {}))
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(f"{root}/{LINEAGE_FILE}", os.path.join(tmp, LINEAGE_FILE))
        fs.get(f"{root}/{EXPORT_DIR}/", os.path.join(tmp, EXPORT_DIR) + "/", recursive=True)
        yield tmp, where


def run_folder_of(checkpoint: str, run_file: str = "run.json", levels: int = 3) -> str | None:
    """The local run folder (the one holding run.json) a checkpoint lies in, if any."""
    if "://" in checkpoint:
        return None
    folder = os.path.abspath(checkpoint)
    for _ in range(levels + 1):
        if os.path.exists(os.path.join(folder, run_file)):
            return folder
        folder = os.path.dirname(folder)
    return None


def save_eval(result: dict[str, Any]) -> str | None:
    """Write eval.json into the checkpoint's run folder (beside summary.json), when it has one."""
    folder = run_folder_of(result["checkpoint"])
    if folder is None:
        return None
    path = os.path.join(folder, "eval.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
