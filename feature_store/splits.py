"""The held-out split, decided by a video's content hash so a video's segments never straddle train and eval."""

from __future__ import annotations

import hashlib


def split_score(video_sha256: str) -> float:
    """A number in [0, 1) that depends only on the video's bytes (re-hashed so it is not the raw prefix)."""
    h = hashlib.sha256(f"split:{video_sha256}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_heldout(video_sha256: str, fraction: float = 0.2) -> bool:
    return split_score(video_sha256) < fraction


SPLITS = ("train", "val", "test")


def split_of(video_sha256: str, heldout_fraction: float = 0.2, val_fraction: float = 0.0) -> str:
    """"test" (the held-out split, exactly `is_heldout`), "val" (the next `val_fraction` of the hash range:
    for design choices, never for reported numbers) or "train"; deterministic in the video's bytes."""
    if not (0.0 <= heldout_fraction and 0.0 <= val_fraction and heldout_fraction + val_fraction < 1.0):
        raise ValueError(f"need fractions >= 0 summing to < 1, got {heldout_fraction} + {val_fraction}")
    score = split_score(video_sha256)
    if score < heldout_fraction:
        return "test"
    return "val" if score < heldout_fraction + val_fraction else "train"
