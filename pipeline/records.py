"""The typed rows that travel between the extraction stages (decode -> teacher -> write), and failures.

One `SegmentRow` per sample, or per failed video (then `error` names the failure class and the sample
fields keep their defaults). A batch is Ray Data's dict of numpy columns: scalars as 1-D columns, pixels,
frame indices, timestamps and targets as fixed-shape tensor columns (every row of a batch has the same
shapes; a failure row carries zeros), so no stage parses text another stage wrote. Labels stay JSON text
(`labels_json`): user metadata of any shape, read once, by the writer.

Failure classes (`Failure.error`): a decode reason (pipeline.decode.REASONS: not_a_video, empty_file,
corrupt, too_long, too_large, bad_aspect, timeout, crashed, io, ...), "too_short" (sampling), "oom" (a teacher
batch that did not fit even at half size), "teacher_error", "write_error". TRANSIENT ones may pass on a
retry; the others are properties of the file (`Failure.transient`). The ledger's `retryable` keeps its
meaning (false only for what no retry can change under the same settings, a video too short to sample);
the retry policy per class belongs to the planner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from feature_store.store import failure_id, utcnow
from pipeline.decode import TRANSIENT as DECODE_TRANSIENT

TRANSIENT = DECODE_TRANSIENT | {"write_error", "teacher_error", "oom"}


@dataclass(frozen=True)
class Failure:
    """One failed video in this run: becomes one row of the KEY's failure ledger."""

    video_sha256: str
    source: str
    stage: str  # read, decode, sampling, teacher, write
    error: str  # a short failure class (see the module docstring)
    message: str
    retryable: bool = True

    @property
    def transient(self) -> bool:
        """A cause that may go away on a retry (timeout, crash, I/O, memory), not a property of the file."""
        return self.error in TRANSIENT

    def to_record(self) -> dict[str, Any]:
        """The failure schema of feature_store.store (FAILURES_SCHEMA)."""
        return {"failure_id": failure_id(self.video_sha256, self.source), "video_sha256": self.video_sha256,
                "source": self.source, "stage": self.stage, "error": self.error, "message": self.message[:2000],
                "attempts": 1, "retryable": self.retryable, "last_attempt": utcnow()}


@dataclass
class WorkRow:
    """One video of the work list (pipeline.plan.WORK_SCHEMA) as the decode stage reads it. `sha256` is ""
    for a new file until the decode stage has hashed the bytes it read (`identify`)."""

    source: str  # Arrow-safe form of the name
    video_id: str
    labels: dict[str, str]
    size: int
    mtime: float
    sha256: str = ""
    have_segments: frozenset[int] = frozenset()
    attempts: int = 0
    source_raw: bytes = b""  # the name's bytes when it is not UTF-8

    @property
    def path(self) -> str:
        """The name to open (a non-UTF-8 name travels as its bytes)."""
        from feature_store.names import decode_name

        return decode_name(self.source, self.source_raw or None)

    def identify(self, sha256: str) -> None:
        """The hash of the bytes read. A file that changed since it was planned is a new video: nothing of it
        is stored yet."""
        if self.sha256 and sha256 != self.sha256:
            self.have_segments = frozenset()
        self.sha256 = sha256

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkRow:
        labels = row.get("labels") or {}
        return cls(source=row["source"], video_id=row["video_id"], labels=dict(labels), size=int(row["size"]),
                   mtime=float(row["mtime"]), sha256=row.get("sha256") or "",
                   have_segments=frozenset(row.get("have_segments") or ()), attempts=int(row.get("attempts") or 0),
                   source_raw=row.get("source_raw") or b"")

    def to_row(self) -> dict[str, Any]:
        return {"source": self.source, "source_raw": self.source_raw or None, "video_id": self.video_id,
                "labels": list(self.labels.items()), "size": self.size, "mtime": self.mtime, "sha256": self.sha256,
                "have_segments": sorted(self.have_segments), "attempts": self.attempts}


# Tensor columns and the shape of one row's value; the stage that makes a batch knows them.
ARRAY_FIELDS = ("frame_indices", "timestamps", "frames", "targets", "patches")


@dataclass
class SegmentRow:
    video_sha256: str
    source: str  # Arrow-safe form of the name (feature_store.names.encode_name)
    source_raw: bytes = b""  # the name's bytes when it is not UTF-8
    error: str = ""  # "" for a sample; else this row is the video's failure
    stage: str = ""
    message: str = ""
    sample_key: str = ""
    video_id: str = ""
    labels_json: str = "{}"
    segment: int = -1
    segments_total: int = 0
    decoder: str = ""
    fps: float = 0.0
    num_frames: int = 0
    rotation: int = 0
    padded: bool = False
    video_size: int = 0
    video_mtime: float = 0.0
    decode_s: float = 0.0  # this segment's share of its video's decode time
    teacher_s: float = 0.0  # this segment's share of its teacher batch's time
    teacher_t0: float = 0.0  # wall clock of its teacher batch's start and end
    teacher_t1: float = 0.0
    decode_node: str = ""  # Ray node ids of the actors that decoded and embedded it ("" outside Ray)
    teacher_node: str = ""
    fid_n: int = 0  # fidelity of the stored targets: frames, sum and min of centred cosines
    fid_sum: float = 0.0
    fid_min: float = 1.0
    frames_blob: bytes = b""  # the stored frames, in the KEY's frame encoding
    frame_indices: np.ndarray | None = None  # int64 [T]
    timestamps: np.ndarray | None = None  # float64 [T]
    frames: np.ndarray | None = None  # uint8 [T, S, S, 3]: the stored frames decoded, what the teacher sees
    targets: np.ndarray | None = None  # [T, D] in the KEY's target dtype
    patches: np.ndarray | None = None  # [T, g, g, Dp], only when the KEY keeps patch tokens

    @property
    def failed(self) -> bool:
        return bool(self.error)

    @classmethod
    def failure(cls, f: Failure) -> SegmentRow:
        return cls(video_sha256=f.video_sha256, source=f.source, error=f.error, stage=f.stage, message=f.message)

    def as_failure(self) -> Failure:
        return Failure(self.video_sha256, self.source, self.stage, self.error, self.message,
                       retryable=self.error != "too_short")

    def sample_meta(self) -> dict[str, Any]:
        """The sample's metadata as stored in its shard (`<key>.json`) and, in part, the KEY's index."""
        import json

        assert self.frame_indices is not None and self.timestamps is not None
        return {"sample_key": self.sample_key, "video_sha256": self.video_sha256, "source": self.source,
                "video_id": self.video_id, "labels": json.loads(self.labels_json), "segment": self.segment,
                "segments_total": self.segments_total, "frame_indices": [int(x) for x in self.frame_indices],
                "timestamps": [float(x) for x in self.timestamps], "padded": self.padded, "decoder": self.decoder,
                "fps": self.fps, "num_frames": self.num_frames, "rotation": self.rotation,
                "video_size": self.video_size, "video_mtime": self.video_mtime}


_FIELDS = [f for f in dataclasses.fields(SegmentRow)]
_SCALARS = [f.name for f in _FIELDS if f.name not in ARRAY_FIELDS]
_DTYPES = {"frame_indices": np.int64, "timestamps": np.float64, "frames": np.uint8}


def to_batch(rows: list[SegmentRow], shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, np.ndarray]:
    """Rows -> Ray Data columns. `shapes`: tensor field -> (one row's shape, dtype); only these fields become
    columns, and a row without one (a failure) gets zeros."""
    out: dict[str, np.ndarray] = {}
    for name in _SCALARS:
        values = [getattr(r, name) for r in rows]
        out[name] = np.array(values, dtype=object) if isinstance(values[0] if values else "", (str, bytes)) \
            else np.asarray(values)
    for name, (shape, dtype) in shapes.items():
        col = np.zeros((len(rows), *shape), dtype=dtype)
        for i, r in enumerate(rows):
            value = getattr(r, name)
            if value is not None:
                col[i] = value
        out[name] = col
    return out


def from_batch(batch: dict[str, np.ndarray]) -> list[SegmentRow]:
    """Ray Data columns -> rows (tensor fields that the batch lacks stay None; failures get None arrays)."""
    n = len(batch["video_sha256"])
    rows = []
    for i in range(n):
        kw = {name: _scalar(batch[name][i]) for name in _SCALARS if name in batch}
        failed = bool(kw.get("error"))
        for name in ARRAY_FIELDS:
            if name in batch and not failed:
                kw[name] = batch[name][i]
        rows.append(SegmentRow(**kw))
    return rows


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


def failure_rows(rows: list[SegmentRow]) -> list[Failure]:
    """One failure per video (the first seen), whatever the number of its failed segments."""
    seen: dict[str, Failure] = {}
    for r in rows:
        if r.failed:
            seen.setdefault(r.video_sha256 or r.source, r.as_failure())
    return list(seen.values())

