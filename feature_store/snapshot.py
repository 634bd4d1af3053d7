"""One immutable version of a KEY, read lazily: nothing is loaded until asked, and everything asked is an Arrow
operation over what this version's index references (no history replay, no Python object per row)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import scan
from .ledger import FAILURES_SCHEMA, LEDGER_SCHEMA, ledger_state
from .records import COPIES_SCHEMA, INDEX_SCHEMA, SHARDS_SCHEMA, Fidelity, ShardRecord, TargetStats
from .scan import Match
from .spec import FeatureSpec, to_dict

if TYPE_CHECKING:
    from .store import FeatureStore

STORE_FORMAT = 2


def first_per_key(table: pa.Table, key: str = "sample_key", tie: str = "shard") -> tuple[pa.Table, pa.Table]:
    """(kept, dropped): one row per `key`, the one whose `tie` sorts first. A sample two concurrent writers
    both committed is indexed twice; every reader and count takes the same one copy."""
    if table.num_rows == 0 or pc.count_distinct(table.column(key)).as_py() == table.num_rows:
        return table, table.slice(0, 0)
    order = pc.sort_indices(table, sort_keys=[(key, "ascending"), (tie, "ascending")]).to_numpy()
    keys = table.column(key).take(order).to_numpy(zero_copy_only=False)
    first = np.ones(len(order), bool)
    first[1:] = keys[1:] != keys[:-1]
    return table.take(order[first]), table.take(order[~first])


class Snapshot:
    """A KEY at one version. `index`, `failures`, `manifest`, `shards` are computed on first use."""

    def __init__(self, store: "FeatureStore", key: str, version: int, spec: FeatureSpec, commit: dict[str, Any]):
        self.store, self.key, self.version, self._spec, self._commit = store, key, version, spec, commit

    @property
    def commit(self) -> dict[str, Any]:
        """The version's commit info (time, token, our metadata), read from its log entry when not at hand."""
        if self.version and "timestamp" not in self._commit:
            from .tables import commit_metadata

            self._commit = commit_metadata(self.store.tables(self.key).index, self.version)
        return self._commit

    def __getstate__(self) -> dict[str, Any]:  # loader workers get the small part; they read their own rows
        keep = ("store", "key", "version", "_spec", "_commit", "_duplicates", "_shard_names")
        return {k: v for k, v in self.__dict__.items() if k in keep}

    @property
    def spec(self) -> FeatureSpec:
        return self._spec

    # -- the index -------------------------------------------------------------------------------------------
    def _dataset(self):
        if self.version == 0:
            return None
        if self.__dict__.get("_ds") is None:  # building it costs O(files): once per snapshot
            self._ds = scan.dataset(self.store.tables(self.key).index.open(self.version), INDEX_SCHEMA)
        return self._ds

    def index_columns(self, columns: list[str] | None = None, where: Match | None = None) -> pa.Table:
        """Raw index rows of this version (duplicates included), only `columns`, only rows matching `where`."""
        ds = self._dataset()
        schema = INDEX_SCHEMA if columns is None else pa.schema([INDEX_SCHEMA.field(c) for c in columns])
        if ds is None:
            return schema.empty_table()
        return scan.read(ds, columns, where)

    def index_matching(self, columns: list[str], column: str, values: pa.Array) -> pa.Table:
        """Raw index rows whose `column` is in `values` (many values: the listing's names or hashes), one
        record batch at a time, so memory holds the matches and one batch, not a scan-wide filter."""
        ds = self._dataset()
        schema = pa.schema([INDEX_SCHEMA.field(c) for c in columns])
        if ds is None or not len(values):
            return schema.empty_table()
        keep = [b.filter(pc.is_in(b.column(column), value_set=values)) for b in ds.to_batches(columns=columns)]
        return pa.Table.from_batches([b for b in keep if b.num_rows], schema=None).cast(schema) \
            if any(b.num_rows for b in keep) else schema.empty_table()

    def copies(self, columns: list[str] | None = None, where: Match | None = None) -> pa.Table:
        """Files recorded as copies of indexed content (COPIES_SCHEMA; the table's latest version, like the
        ledger's state a run plans with), only `columns`, only rows matching `where`."""
        loc = self.store.tables(self.key).copies
        schema = COPIES_SCHEMA if columns is None else pa.schema([COPIES_SCHEMA.field(c) for c in columns])
        if self.version == 0 or not loc.exists():
            return schema.empty_table()
        return scan.read(scan.dataset(loc.open(fresh=True), COPIES_SCHEMA), columns, where)

    @cached_property
    def _keys(self) -> pa.Table:
        kept, dropped = first_per_key(self.index_columns(["sample_key", "shard", "video_sha256"]))
        self._duplicates = dropped.select(["sample_key", "shard"])
        return kept

    @property
    def duplicates(self) -> pa.Table:
        """(sample_key, shard) of the copies readers skip."""
        if "_duplicates" not in self.__dict__:
            _ = self._keys
        return self._duplicates

    @cached_property
    def index(self) -> pa.Table:
        """The whole index of this version as one Arrow table (one row per sample). O(index): for tools."""
        return first_per_key(self.index_columns())[0]

    def rows_for_shards(self, shards: list[str], columns: list[str] | None = None) -> pa.Table:
        """This version's index rows of a few shards (a reader's own part), duplicates left out."""
        rows = self.index_columns(columns and sorted(set(columns) | {"sample_key", "shard"}),
                                  Match("shard", shards))
        dup = self.duplicates
        if dup.num_rows:
            lost = pc.is_in(pc.binary_join_element_wise(rows.column("sample_key"), rows.column("shard"), "\0"),
                            value_set=pc.binary_join_element_wise(dup.column("sample_key"), dup.column("shard"), "\0"))
            rows = rows.filter(pc.invert(lost))
        return rows

    @cached_property
    def _shard_names(self) -> list[str]:
        return sorted(pc.unique(self._keys.column("shard")).to_pylist())

    def shard_names(self) -> list[str]:
        """The shards this version's index references, sorted (also a plain list for `webdataset`)."""
        return self._shard_names

    def shard_urls(self) -> list[str]:
        return [self.store.url(self.key, name) for name in self.shard_names()]

    # -- shards and statistics -------------------------------------------------------------------------------
    @cached_property
    def shard_table(self) -> pa.Table:
        """The shard records this version references (one row per shard, SHARDS_SCHEMA)."""
        if self.version == 0:
            return SHARDS_SCHEMA.empty_table()
        loc = self.store.tables(self.key).shards
        names = pa.array(self.shard_names(), pa.string())
        recs = scan.read(scan.dataset(loc.open(), SHARDS_SCHEMA), where=Match("name", names))
        return first_per_key(recs, "name", "sha256")[0].sort_by("name")

    @property
    def shards(self) -> list[ShardRecord]:
        t = self.shard_table.select(["name", "count", "bytes", "sha256"])
        return [ShardRecord(**r) for r in t.to_pylist()]

    def _stats(self) -> TargetStats:
        t = self.shard_table.filter(pc.greater(self.shard_table.column("stats_n"), 0))
        if t.num_rows == 0:
            return TargetStats()
        sums = np.stack(t.column("stats_sum").to_numpy(zero_copy_only=False)).sum(0)
        sumsq = np.stack(t.column("stats_sumsq").to_numpy(zero_copy_only=False)).sum(0)
        return TargetStats(int(pc.sum(t.column("stats_n")).as_py()), sums.tolist(), sumsq.tolist())

    def _fidelity(self) -> Fidelity:
        t = self.shard_table.filter(pc.greater(self.shard_table.column("fid_n"), 0))
        if t.num_rows == 0:
            return Fidelity()
        return Fidelity(int(pc.sum(t.column("fid_n")).as_py()), float(pc.sum(t.column("fid_sum")).as_py()),
                        float(pc.min(t.column("fid_min")).as_py()))

    # -- the failure ledger ------------------------------------------------------------------------------------
    @cached_property
    def ledger(self) -> pa.Table:
        """The raw attempts this version sees (the ledger at the version its index commit recorded)."""
        lv = int(self.commit.get("ledger_version", -1))
        if self.version == 0 or lv < 0:
            return LEDGER_SCHEMA.empty_table()
        return scan.read(scan.dataset(self.store.tables(self.key).failures.open(lv), LEDGER_SCHEMA))

    @cached_property
    def failures(self) -> pa.Table:
        """One row per failing video (FAILURES_SCHEMA): attempts since its last success, latest cause."""
        return ledger_state(self.ledger) if self.ledger.num_rows else FAILURES_SCHEMA.empty_table()

    # -- the manifest ------------------------------------------------------------------------------------------
    @cached_property
    def manifest(self) -> dict[str, Any]:
        spec = self.spec
        keys, shards = self._keys, self.shard_table
        stats, fidelity = self._stats(), self._fidelity()
        return {
            "format_version": STORE_FORMAT,
            "key": self.key,
            "version": self.version,
            "created_at": self.commit.get("timestamp"),
            "run_id": self.commit.get("run_id", ""),
            "max_attempts": int(self.commit["max_attempts"]) if self.commit.get("max_attempts") else None,
            "status": "ok",
            "spec": to_dict(spec),
            "teacher": {
                "model": spec.teacher.model, "revision": spec.teacher.revision, "class": spec.teacher_class,
                "weights_sha256": spec.teacher_fingerprint, "output_used": spec.output_used,
                "embed_dim": spec.embed_dim, "dtype": spec.storage.target_dtype, "patch_grid": spec.teacher.patch_grid,
            },
            "preprocessing": to_dict(spec.preprocess),
            "sampling": to_dict(spec.sampling),
            "counts": {
                "samples": keys.num_rows,
                "frames": keys.num_rows * spec.sampling.segment_frames,
                "videos": pc.count_distinct(keys.column("video_sha256")).as_py() if keys.num_rows else 0,
                "shards": shards.num_rows,
                "bytes": int(pc.sum(shards.column("bytes")).as_py() or 0),
                "failed_videos": self.failures.num_rows,
                "duplicate_copies": self.duplicates.num_rows,
            },
            "target_stats": asdict(stats),
            "fidelity_sums": asdict(fidelity),
            "fidelity": fidelity.summary(),
            "checksums": {k: self.commit[k] for k in ("index_digest", "ledger_digest") if k in self.commit},
        }

    @property
    def manifest_sha256(self) -> str:
        """Identifies the version's content: the KEY, version and the digests its commits recorded."""
        ident = {"key": self.key, "version": self.version, "commit": {k: str(v) for k, v in self.commit.items()
                                                                     if k in ("subsume_token", "timestamp")}}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def target_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        return self._stats().mean_std()
