"""The three Ray Data stages of extraction, as plain callables (no Ray import): decode, teacher, write.

Rows between stages carry only bytes, strings and scalars, so every row has the same schema whether it
is a sample or a failure: `failure` is "" for a sample, else a JSON failure record.
- decode (actor pool, CPU): video → segments of frames resized/cropped for the teacher, encoded as stored
- teacher (actor pool, GPU if any): decoded stored frames → targets; one model load per actor
- write (actor pool): a batch of samples → one shard, published atomically; returns the shard's record
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np

from feature_store.shards import build_sample, decode_frames, encode_frames, npy_bytes, sample_key
from feature_store.spec import PreprocessSpec, SamplingSpec, StorageSpec, TeacherSpec
from feature_store.store import FeatureStore, Fidelity, TargetStats, failure_id, utcnow

ROW_COLUMNS = ("sample_key", "frames_blob", "meta", "failure", "targets_blob", "patches_blob")


def failure_record(*, sha256: str, source: str, stage: str, error: str, message: str,
                   retryable: bool = True) -> str:
    return json.dumps({"failure_id": failure_id(sha256, source), "video_sha256": sha256, "source": source,
                       "stage": stage, "error": error, "message": message[:2000], "attempts": 1,
                       "retryable": retryable, "last_attempt": utcnow()})


def _empty_rows() -> dict[str, list]:
    return {c: [] for c in ROW_COLUMNS}


def _append(rows: dict[str, list], **kw: Any) -> None:
    for c in ROW_COLUMNS:
        rows[c].append(kw.get(c, b"" if c.endswith("_blob") else ""))


class DecodeStage:
    """Decode one video per call in a killable child process; emit one row per new segment."""

    def __init__(self, sampling: dict, preprocess: dict, storage: dict, *, timeout_s: float,
                 storage_options: dict | None = None, decoder: str = "auto"):
        from pipeline.decoder_process import DecoderProcess

        self.sampling = SamplingSpec(**sampling)
        self.preprocess = PreprocessSpec(**{**preprocess, "mean": tuple(preprocess["mean"]),
                                            "std": tuple(preprocess["std"])})
        self.storage = StorageSpec(**storage)
        self.timeout_s = timeout_s
        self.decoder = decoder
        self.storage_options = storage_options
        self.proc = DecoderProcess(timeout_s=timeout_s, decoder=decoder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from pipeline.decode import DecodeError
        from pipeline.sampling import cut_segments

        rows = _empty_rows()
        for i in range(len(batch["source"])):
            source, sha = str(batch["source"][i]), str(batch["sha256"][i])
            have = set(json.loads(str(batch["have_segments"][i])))
            t0 = time.perf_counter()
            try:
                video = self.proc.decode(source, self.sampling, resize_crop=self.preprocess,
                                         storage_options=self.storage_options)
            except DecodeError as e:
                _append(rows, failure=failure_record(sha256=sha, source=source, stage="decode", error=e.reason,
                                                     message=str(e)))
                continue
            except Exception as e:  # a decoder bug must cost one video, not the job
                _append(rows, failure=failure_record(sha256=sha, source=source, stage="decode",
                                                     error=type(e).__name__, message=str(e)))
                continue
            segments = cut_segments(len(video.indices), self.sampling)
            if not segments:
                _append(rows, failure=failure_record(
                    sha256=sha, source=source, stage="sampling", error="too_short", retryable=False,
                    message=f"{len(video.indices)} sampled frames < one segment of "
                            f"{self.sampling.segment_frames}, and short videos are dropped"))
                continue
            decode_s = (time.perf_counter() - t0) / len(segments)
            for seg_no, pos in enumerate(segments):
                if seg_no in have:
                    continue
                frames = np.ascontiguousarray(video.frames[pos])
                blob = encode_frames(frames, self.storage.frame_encoding, self.storage.jpeg_quality)
                meta = {
                    "sample_key": sample_key(sha, seg_no), "video_sha256": sha, "source": source,
                    "video_id": str(batch["video_id"][i]), "labels": json.loads(str(batch["labels"][i])),
                    "segment": seg_no, "segments_total": len(segments),
                    "frame_indices": [int(x) for x in video.indices[pos]],
                    "timestamps": [float(x) for x in video.timestamps[pos]],
                    "padded": bool(len(set(pos.tolist())) < len(pos)),
                    "decoder": video.decoder, "fps": float(video.fps), "num_frames": int(video.num_frames),
                    "rotation": int(video.rotation or 0), "video_size": int(batch["size"][i]),
                    "video_mtime": float(batch["mtime"][i]), "decode_s": decode_s,
                }
                _append(rows, sample_key=meta["sample_key"], frames_blob=blob, meta=json.dumps(meta))
        return rows

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.close()


class TeacherStage:
    """Run the teacher on the stored (decoded) frames of a batch of segments. The model loads once."""

    def __init__(self, teacher: dict, *, size: int | None, device: str, precision: str, batch_size: int,
                 storage: dict, segment_frames: int, cpu_threads: int = 0):
        import torch

        from feature_store.teacher import load_teacher

        if cpu_threads > 0:  # a CPU teacher: Ray pins actors to one thread unless told otherwise
            torch.set_num_threads(cpu_threads)

        self.teacher = load_teacher(TeacherSpec(**teacher), size=size, device=device, precision=precision)
        self.batch_size = batch_size
        self.storage = StorageSpec(**storage)
        self.t = segment_frames

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["sample_key"])
        out = {c: [batch[c][i] for i in range(n)] for c in ROW_COLUMNS if c in batch}
        out.setdefault("targets_blob", [b""] * n)
        out.setdefault("patches_blob", [b""] * n)
        out["targets_blob"], out["patches_blob"] = [b""] * n, [b""] * n
        ok = [i for i in range(n) if not batch["failure"][i]]
        if not ok:
            return out
        t0, wall0 = time.perf_counter(), time.time()
        try:
            frames = np.concatenate([decode_frames(bytes(batch["frames_blob"][i]), self.storage.frame_encoding,
                                                   self.t) for i in ok])
            embeds, patches = [], []
            for s in range(0, len(frames), self.batch_size):
                res = self.teacher.embed(frames[s:s + self.batch_size])
                embeds.append(res.embeds.numpy())
                if res.patch_grid is not None:
                    patches.append(res.patch_grid.numpy())
        except Exception as e:  # a teacher failure on a batch fails its videos, recorded, not the job
            for i in ok:
                meta = json.loads(str(batch["meta"][i]))
                out["failure"][i] = failure_record(sha256=meta["video_sha256"], source=meta["source"],
                                                   stage="teacher", error=type(e).__name__, message=str(e))
            return out
        emb32 = np.concatenate(embeds).astype(np.float32)
        stored = emb32.astype(self.storage.target_dtype)
        centred = emb32 - emb32.mean(0, keepdims=True)
        cos = _cos(stored.astype(np.float32) - emb32.mean(0, keepdims=True), centred)
        grid = np.concatenate(patches).astype(self.storage.target_dtype) if patches else None
        teacher_s = (time.perf_counter() - t0) / len(ok)
        for j, i in enumerate(ok):
            sl = slice(j * self.t, (j + 1) * self.t)
            out["targets_blob"][i] = npy_bytes(stored[sl])
            if grid is not None:
                out["patches_blob"][i] = npy_bytes(grid[sl])
            meta = json.loads(str(batch["meta"][i]))
            meta.update(teacher_s=teacher_s, fid_n=self.t, fid_sum=float(cos[sl].sum()), fid_min=float(cos[sl].min()),
                        teacher_span=[wall0, time.time()])
            out["meta"][i] = json.dumps(meta)
        return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)


INDEX_FIELDS = ("sample_key", "video_sha256", "video_id", "source", "segment", "segments_total", "frame_indices",
                "timestamps", "labels", "num_frames", "decoder", "video_size", "video_mtime")


def write_shard_batch(batch: dict[str, np.ndarray], *, root: str, storage_options: dict, key: str, run_id: str,
                      storage: dict) -> dict[str, list]:
    """Write the samples of a batch as one shard; return one payload row for the shard and one per failure."""
    store_spec = StorageSpec(**storage)
    payloads: list[str] = []
    samples, rows = [], []
    stats, fidelity = TargetStats(), Fidelity()
    timing = {"decode_s": 0.0, "teacher_s": 0.0, "write_s": 0.0}
    span: list[float] | None = None  # wall-clock start of the first and end of the last teacher call
    for i in range(len(batch["sample_key"])):
        if batch["failure"][i]:
            payloads.append(json.dumps({"failure": json.loads(str(batch["failure"][i]))}))
            continue
        meta = json.loads(str(batch["meta"][i]))
        targets = np.load(io.BytesIO(bytes(batch["targets_blob"][i])), allow_pickle=False)
        patches_blob = bytes(batch["patches_blob"][i])
        patches = np.load(io.BytesIO(patches_blob), allow_pickle=False) if patches_blob else None
        timing["decode_s"] += meta.pop("decode_s", 0.0)
        timing["teacher_s"] += meta.pop("teacher_s", 0.0)
        t0, t1 = meta.pop("teacher_span", (None, None))
        if t0 is not None:
            span = [min(span[0], t0), max(span[1], t1)] if span else [t0, t1]
        fidelity = fidelity.merge(Fidelity(meta.pop("fid_n"), meta.pop("fid_sum"), meta.pop("fid_min")))
        stats = stats.merge(TargetStats.of(targets))
        samples.append(build_sample(meta["sample_key"], bytes(batch["frames_blob"][i]), store_spec.frame_encoding,
                                    targets, meta, patches))
        rows.append({k: meta[k] for k in INDEX_FIELDS})
    if samples:
        t0 = time.perf_counter()
        record = FeatureStore(root, storage_options).write_shard(key, run_id, samples)
        timing["write_s"] = time.perf_counter() - t0
        for r in rows:
            r["shard"] = record.name
        payloads.append(json.dumps({"shard": record.__dict__, "rows": rows, "stats": stats.__dict__,
                                    "fidelity": fidelity.__dict__, "timing": timing, "teacher_span": span}))
    return {"payload": payloads}


class WriteStage:
    """`write_shard_batch` in a long-lived actor: the tar writer's imports (webdataset pulls in torch, ~2 s)
    are paid once per actor, not once per shard in a fresh task worker."""

    def __init__(self, **kwargs: Any):
        import webdataset  # noqa: F401  (imported now, while the first videos decode)

        self.kwargs = kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return write_shard_batch(batch, **self.kwargs)
