"""The held-out split, decided by a video's content hash so a video's segments never straddle train and eval."""

from __future__ import annotations

import hashlib


def split_score(video_sha256: str) -> float:
    """A number in [0, 1) that depends only on the video's bytes (re-hashed so it is not the raw prefix)."""
    h = hashlib.sha256(f"split:{video_sha256}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_heldout(video_sha256: str, fraction: float = 0.2) -> bool:
    return split_score(video_sha256) < fraction
