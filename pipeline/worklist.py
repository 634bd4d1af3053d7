"""The work list on storage: Parquet files in the run's scratch folder of the KEY, read by Ray Data.

The planner's work table (pipeline.plan.WORK_SCHEMA) is shuffled (seeded by the run, so shards do not
cluster by folder) and cut into files of at most VIDEOS_PER_BLOCK videos, written to
`ROOT/KEY/_tmp/<run_id>/worklist/part-NNNNN.parquet`: the KEY's storage is the one every node already reads
and writes, so a work list on S3 needs nothing else. Ray Data reads one file per block, so a lost node
loses at most a few hundred videos to a retry. The folder is removed when the run ends; `store gc` removes
a crashed run's after its lease expired, like the rest of `_tmp/<run_id>/`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store import fsutil

# Videos per block of the work list at most: a lost node loses at most its blocks' videos to a retry.
VIDEOS_PER_BLOCK = 200


def work_blocks(n_videos: int, n_decode: int) -> int:
    """Enough blocks to feed every decoder several times, and none over VIDEOS_PER_BLOCK videos."""
    return max(1, min(n_videos, max(4 * n_decode, math.ceil(n_videos / VIDEOS_PER_BLOCK))))


def shuffled(work: pa.Table, seed: str) -> pa.Table:
    """The rows in an order fixed by `seed` (the run id): a rerun of the same run id reads the same order."""
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))
    return work.take(pa.array(rng.permutation(work.num_rows)))


class WorkList:
    """The work list of one run in the KEY's scratch folder (see the module docstring)."""

    def __init__(self, store: Any, key: str, run_id: str):
        self.store, self.rel = store, f"_tmp/{run_id}/worklist"
        self.path = fsutil.join(store.key_path(key), self.rel)
        self.url = store.url(key, self.rel)
        self.files: list[str] = []

    def write(self, work: pa.Table, seed: str, blocks: int) -> int:
        """Shuffle and write `work` as `blocks` files (each at most VIDEOS_PER_BLOCK rows); returns the count."""
        work = shuffled(work, seed)
        per = max(1, min(VIDEOS_PER_BLOCK, math.ceil(work.num_rows / max(1, blocks))))
        self.store.fs.makedirs(self.path, exist_ok=True)
        for n, start in enumerate(range(0, work.num_rows, per)):
            name = fsutil.join(self.path, f"part-{n:05d}.parquet")
            with self.store.fs.open(name, "wb") as f:
                pq.write_table(work.slice(start, per), f)
            self.files.append(name)
        return len(self.files)

    def dataset(self):
        """A Ray dataset over the files: one block per file, rows as written."""
        import ray

        fs = None
        if not fsutil.is_local(self.store.fs):
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs = PyFileSystem(FSSpecHandler(self.store.fs))
        # The store's own paths (no protocol), through its fsspec filesystem with its storage options. Reading
        # reserves no CPU, and goes through the datasource that lists files in the driver: Ray Data 2.60's
        # default (V2) lists them in a 1-CPU task, which never runs once the stages' actors hold every CPU.
        ctx = ray.data.DataContext.get_current()
        v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            return ray.data.read_parquet(self.files, filesystem=fs, override_num_blocks=len(self.files), num_cpus=0)
        finally:
            ctx.use_datasource_v2 = v2

    def remove(self) -> None:
        if fsutil.exists(self.store.fs, self.path):
            self.store.fs.rm(self.path, recursive=True)
