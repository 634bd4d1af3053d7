"""`subsume embed`: a trained student's clip embeddings for new videos, written to Parquet.

Videos are decoded and sampled the way the student's training KEY was (fps, segment length and the KEY's
resize/crop, recorded in the exported student; no store is needed), resized to the student's input size,
one row per segment; a video that cannot be decoded gets a row with its
error and no embedding, so the output accounts for every input.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from feature_store.spec import PreprocessSpec, SamplingSpec
from pipeline.decode import DecodeError, decode_video
from pipeline.sampling import cut_segments
from pipeline.sources import list_videos
from training.checkpoint import EXPORT_DIR
from training.export import load_exported
from training.locate import open_checkpoint


def run_embed(checkpoint: str, videos: str, out: str, *, fps: float | None = None,
              storage_options: dict[str, Any] | None = None, batch_size: int = 32) -> dict[str, Any]:
    from feature_store.preprocess import resize_crop

    with open_checkpoint(checkpoint, storage_options) as (folder, _):
        model = load_exported(os.path.join(folder, EXPORT_DIR))
    cfg = model.student_config
    if not model.sampling or not model.preprocess:
        raise ValueError(f"{checkpoint}: the exported student does not record its sampling and preprocessing")
    sampling = SamplingSpec(**model.sampling)
    if fps is not None:
        sampling = SamplingSpec(fps=fps, segment_frames=sampling.segment_frames)
    pre = PreprocessSpec(**model.preprocess)
    rows: list[dict[str, Any]] = []
    for ref in list_videos(videos):
        try:
            video = decode_video(ref.source, sampling,
                                 transform=lambda f: resize_crop(torch.from_numpy(f), pre).numpy())
        except DecodeError as e:
            rows.append({"video_id": ref.video_id, "source": ref.source, "segment": -1, "start_s": None,
                         "embedding": None, "error": f"{e.reason}: {e}"})
            continue
        segments = cut_segments(len(video.indices), sampling)
        clips = [_window(video.frames[pos], cfg.frames) for pos in segments]
        embs = np.concatenate([model.embed(torch.from_numpy(np.stack(clips[i:i + batch_size]))).numpy()
                               for i in range(0, len(clips), batch_size)]) if clips else np.zeros((0, model.embed_dim))
        for seg, (pos, e) in enumerate(zip(segments, embs)):
            rows.append({"video_id": ref.video_id, "source": ref.source, "segment": seg,
                         "start_s": float(video.timestamps[pos[0]]), "embedding": e.astype(np.float32).tolist(),
                         "error": ""})
    table = pa.table({
        "video_id": [r["video_id"] for r in rows], "source": [r["source"] for r in rows],
        "segment": pa.array([r["segment"] for r in rows], pa.int32()),
        "start_s": pa.array([r["start_s"] for r in rows], pa.float64()),
        "embedding": pa.array([r["embedding"] for r in rows], pa.list_(pa.float32())),
        "error": [r["error"] for r in rows]})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    pq.write_table(table, out)
    ok = sum(1 for r in rows if not r["error"])
    return {"out": out, "segments": ok, "videos": len({r["source"] for r in rows}),
            "failed": sum(1 for r in rows if r["error"]), "dim": model.embed_dim}


def _window(frames: np.ndarray, length: int) -> np.ndarray:
    start = max((len(frames) - length) // 2, 0)
    return frames[start:start + length]
