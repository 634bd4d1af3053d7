"""`subsume embed`: a trained student's clip embeddings for new videos, written to Parquet.

Videos are decoded and sampled the way the student's training KEY was (fps, segment length, frame size
from the checkpoint's lineage), one row per segment; a video that cannot be decoded gets a row with its
error and no embedding, so the output accounts for every input.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from feature_store.spec import PreprocessSpec, SamplingSpec
from feature_store.store import FeatureStore
from pipeline.decode import DecodeError, decode_video
from pipeline.sampling import cut_segments
from pipeline.sources import list_videos
from training.evaluate import embed_clips
from training.models import load_student


def _lineage(checkpoint: str) -> dict[str, Any]:
    path = os.path.join(checkpoint, "train_state.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no train_state.json)")
    with open(path) as f:
        return json.load(f)


def run_embed(checkpoint: str, videos: str, out: str, *, fps: float | None = None, root: str | None = None) -> dict[str, Any]:
    from feature_store.preprocess import resize_crop

    state = _lineage(checkpoint)
    student, cfg = load_student(os.path.join(checkpoint, "student"))
    spec = FeatureStore(root or state.get("store", ""), {}).spec(state["key"]) if (root or state.get("store")) else None
    if spec is None:
        raise ValueError("the checkpoint does not name its store; pass the store root")
    sampling = spec.sampling if fps is None else SamplingSpec(fps=fps, segment_frames=spec.sampling.segment_frames)
    pre: PreprocessSpec = spec.preprocess
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
        clips = []
        for pos in segments:
            frames = video.frames[pos]
            start = max((len(frames) - cfg.frames) // 2, 0)
            clips.append(frames[start:start + cfg.frames])
        embs = embed_clips(student, cfg, clips) if clips else np.zeros((0, student.embed_dim), np.float32)
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
            "failed": sum(1 for r in rows if r["error"]), "dim": int(student.embed_dim)}
