"""How one sample (one segment of one video) is laid out inside a WebDataset shard.

Members of a sample `<sample_key>`:
  <sample_key>.teacher.npy   T x D targets (float16 by default), npy without pickle
  <sample_key>.patches.npy   T x g x g x Dp pooled patch tokens (only when the KEY keeps them)
  <sample_key>.frames.jpg    the T frames the teacher saw, stacked vertically into one (T*S) x S image
  (or .frames.png / .frames.npy, by the KEY's frame encoding)
  <sample_key>.json          metadata (source, video hash, segment, frame indices, timestamps, labels, ...)

A vertical strip keeps one member per sample and stays readable by any image tool. With JPEG and S a
multiple of 16, every 16x16 coding unit lies inside one frame, so frames do not bleed into each other.
Everything here is pure bytes in, bytes out; no pickle anywhere.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

FRAMES_EXT = {"jpeg": "frames.jpg", "png": "frames.png", "npy": "frames.npy"}
TARGETS_EXT = "teacher.npy"
PATCHES_EXT = "patches.npy"
META_EXT = "json"
_SAMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def sample_key(video_sha256: str, segment: int) -> str:
    """A sample's identity: its video's content hash plus its segment index. No dots (WebDataset splits there)."""
    return f"{video_sha256[:32]}-s{segment:05d}"


def check_sample_key(key: str) -> None:
    if not _SAMPLE_KEY.match(key):
        raise ValueError(f"invalid sample key {key!r}: only letters, digits, '_' and '-' are allowed")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_frames(frames: np.ndarray, encoding: str, jpeg_quality: int = 90) -> bytes:
    """uint8 [T, S, S, 3] → bytes in the KEY's frame encoding."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if encoding == "npy":
        return npy_bytes(frames)
    t, h, w, _ = frames.shape
    strip = Image.fromarray(frames.reshape(t * h, w, 3))
    buf = io.BytesIO()
    if encoding == "jpeg":
        strip.save(buf, format="JPEG", quality=jpeg_quality, subsampling="4:2:0")
    elif encoding == "png":
        strip.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown frame encoding {encoding!r}")
    return buf.getvalue()


def decode_frames(data: bytes, encoding: str, num_frames: int) -> np.ndarray:
    """Inverse of encode_frames: bytes → uint8 [T, S, S, 3]."""
    if encoding == "npy":
        return npy_load(data)
    with Image.open(io.BytesIO(data)) as img:
        strip = np.array(img.convert("RGB"))
    h = strip.shape[0] // num_frames
    if h * num_frames != strip.shape[0]:
        raise ValueError(f"frame strip of height {strip.shape[0]} does not split into {num_frames} frames")
    return strip.reshape(num_frames, h, strip.shape[1], 3)


@dataclass
class EncodedSample:
    """A sample ready to be written: member suffix → bytes, plus its metadata."""

    key: str
    members: dict[str, bytes]
    meta: dict[str, Any]

    def tar_dict(self) -> dict[str, Any]:
        return {"__key__": self.key, **self.members, META_EXT: json.dumps(self.meta, sort_keys=True).encode()}


def build_sample(key: str, frames_blob: bytes, frame_encoding: str, targets: np.ndarray,
                 meta: dict[str, Any], patches: np.ndarray | None = None) -> EncodedSample:
    check_sample_key(key)
    members = {FRAMES_EXT[frame_encoding]: frames_blob, TARGETS_EXT: npy_bytes(targets)}
    if patches is not None:
        members[PATCHES_EXT] = npy_bytes(patches)
    return EncodedSample(key=key, members=members, meta=meta)


def parse_sample(raw: dict[str, Any], frame_encoding: str) -> dict[str, Any]:
    """A raw WebDataset sample (suffix → bytes) → decoded fields: frames, targets, patches, meta."""
    meta = json.loads(raw[META_EXT])
    frames_ext = FRAMES_EXT[frame_encoding]
    targets = npy_load(raw[TARGETS_EXT])
    out = {
        "sample_key": raw["__key__"],
        "frames": decode_frames(raw[frames_ext], frame_encoding, targets.shape[0]),
        "targets": targets,
        "meta": meta,
    }
    if PATCHES_EXT in raw:
        out["patches"] = npy_load(raw[PATCHES_EXT])
    return out
