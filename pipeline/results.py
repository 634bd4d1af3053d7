"""What the shard writers hand the driver: one typed row per published shard or per failed video.

`WriterResult.to_row`/`from_row` travel as Arrow columns (RESULT_SCHEMA): the shard's record, its target
stats and fidelity, the stage timings and the teacher's window as their own fields, the shard's index rows
as a list of structs, and a failure's fields as columns. No JSON text is parsed on the way, except the
user's labels (any shape), kept as `labels_json` until the driver builds the KEY's index rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from feature_store.names import decode_name
from feature_store.records import Fidelity, ShardRecord, TargetStats
from pipeline.records import Failure

STAGES = ("decode", "teacher", "write")

INDEX_ROW = pa.struct([
    ("sample_key", pa.string()), ("video_sha256", pa.string()), ("video_id", pa.string()),
    ("source", pa.string()), ("source_raw", pa.binary()), ("segment", pa.int32()), ("segments_total", pa.int32()),
    ("frame_indices", pa.list_(pa.int64())), ("timestamps", pa.list_(pa.float64())), ("labels_json", pa.string()),
    ("shard", pa.string()), ("num_frames", pa.int32()), ("decoder", pa.string()), ("video_size", pa.int64()),
    ("video_mtime", pa.float64()),
])

RESULT_SCHEMA = pa.schema([
    ("shard_name", pa.string()), ("shard_count", pa.int64()), ("shard_bytes", pa.int64()),
    ("shard_sha256", pa.string()),
    ("stats_n", pa.int64()), ("stats_sum", pa.list_(pa.float64())), ("stats_sumsq", pa.list_(pa.float64())),
    ("fid_n", pa.int64()), ("fid_sum", pa.float64()), ("fid_min", pa.float64()),
    ("decode_s", pa.float64()), ("teacher_s", pa.float64()), ("write_s", pa.float64()),
    ("teacher_t0", pa.float64()), ("teacher_t1", pa.float64()),
    ("index_rows", pa.list_(INDEX_ROW)),
    ("decode_nodes", pa.list_(pa.string())), ("teacher_nodes", pa.list_(pa.string())),
    ("write_nodes", pa.list_(pa.string())),
    ("f_video_sha256", pa.string()), ("f_source", pa.string()), ("f_stage", pa.string()), ("f_error", pa.string()),
    ("f_message", pa.string()), ("f_retryable", pa.bool_()),
])


@dataclass
class WriterResult:
    """A published shard (`shard` set) or a failed video (`failure` set)."""

    shard: ShardRecord | None = None
    stats: TargetStats = field(default_factory=TargetStats)
    fidelity: Fidelity = field(default_factory=Fidelity)
    timing: dict[str, float] = field(default_factory=dict)  # decode_s, teacher_s, write_s (busy seconds)
    teacher_window: tuple[float, float] | None = None  # wall clock of the first teacher call's start, last end
    index_rows: list[dict[str, Any]] = field(default_factory=list)  # INDEX_ROW fields
    failure: Failure | None = None
    nodes: dict[str, list[str]] = field(default_factory=dict)  # stage (decode, teacher, write) -> Ray node ids

    def to_row(self) -> dict[str, Any]:
        s, f, t = self.shard, self.failure, self.timing
        return {"shard_name": s.name if s else "", "shard_count": s.count if s else 0,
                "shard_bytes": s.bytes if s else 0, "shard_sha256": s.sha256 if s else "",
                "stats_n": self.stats.n, "stats_sum": list(self.stats.sum), "stats_sumsq": list(self.stats.sumsq),
                "fid_n": self.fidelity.n, "fid_sum": self.fidelity.sum_cos, "fid_min": self.fidelity.min_cos,
                "decode_s": t.get("decode_s", 0.0), "teacher_s": t.get("teacher_s", 0.0),
                "write_s": t.get("write_s", 0.0),
                "teacher_t0": self.teacher_window[0] if self.teacher_window else 0.0,
                "teacher_t1": self.teacher_window[1] if self.teacher_window else 0.0,
                "index_rows": self.index_rows,
                **{f"{stage}_nodes": self.nodes.get(stage, []) for stage in STAGES},
                "f_video_sha256": f.video_sha256 if f else "", "f_source": f.source if f else "",
                "f_stage": f.stage if f else "", "f_error": f.error if f else "", "f_message": f.message if f else "",
                "f_retryable": f.retryable if f else True}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WriterResult:
        if row["f_error"]:
            return cls(failure=Failure(row["f_video_sha256"], row["f_source"], row["f_stage"], row["f_error"],
                                       row["f_message"], retryable=bool(row["f_retryable"])))
        window = (row["teacher_t0"], row["teacher_t1"]) if row["teacher_t1"] else None
        return cls(shard=ShardRecord(row["shard_name"], int(row["shard_count"]), int(row["shard_bytes"]),
                                     row["shard_sha256"]),
                   stats=TargetStats(int(row["stats_n"]), list(row["stats_sum"] or []), list(row["stats_sumsq"] or [])),
                   fidelity=Fidelity(int(row["fid_n"]), float(row["fid_sum"]), float(row["fid_min"])),
                   timing={k: float(row[k]) for k in ("decode_s", "teacher_s", "write_s")},
                   teacher_window=window, index_rows=list(row["index_rows"] or []),
                   nodes={stage: list(row[f"{stage}_nodes"] or []) for stage in STAGES})

    def store_rows(self) -> list[dict[str, Any]]:
        """The index rows as the store takes them (INDEX_SCHEMA): labels parsed, a non-UTF-8 name restored."""
        out = []
        for r in self.index_rows:
            r = dict(r)
            r["labels"] = json.loads(r.pop("labels_json") or "{}")
            r["source"] = decode_name(r["source"], r.pop("source_raw") or None)
            out.append(r)
        return out


def results_table(results: list[WriterResult]) -> pa.Table:
    """The writer's output batch: a fixed schema, so a batch of only failures has the same columns."""
    return pa.Table.from_pylist([r.to_row() for r in results], schema=RESULT_SCHEMA)
