"""Real test videos written with PyAV, including hostile ones.

Every frame carries its own index as a row of 8 black/white blocks along the top (bit 7 first), big and
flat enough to survive lossy codecs and 4:2:0 chroma, so a test can read back WHICH frame it got.
A red block marks the top-left corner, so a test can tell an upright frame from a rotated one.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

W, H = 64, 48  # landscape by default; small keeps encoding and decoding fast
BITS = 8
BAR_H = 12  # height of the index bar, in pixels
RED_BLOCK = 10  # side of the red top-left corner block, drawn below the index bar

CONTAINER_FORMATS = {".mp4": "mp4", ".avi": "avi", ".mkv": "matroska"}
PIX_FMTS = {"libx264": "yuv420p", "mpeg4": "yuv420p", "mjpeg": "yuvj420p"}


def marked_frames(n: int, width: int = W, height: int = H, start: int = 0) -> np.ndarray:
    """uint8 [n, height, width, 3]: frame i shows (start + i) in binary in the top bar."""
    if width % BITS:
        raise ValueError(f"width must be a multiple of {BITS}")
    frames = np.empty((n, height, width, 3), np.uint8)
    block = width // BITS
    for i in range(n):
        f = frames[i]
        # A smooth background that differs per frame, so encoders see real content and motion.
        yy, xx = np.mgrid[0:height, 0:width]
        f[..., 0] = (xx * 3 + i * 5) % 256 // 2 + 40
        f[..., 1] = (yy * 3 + i * 7) % 256 // 2 + 40
        f[..., 2] = 110
        value = start + i
        for b in range(BITS):
            bit = (value >> (BITS - 1 - b)) & 1
            f[:BAR_H, b * block:(b + 1) * block] = 255 if bit else 0
        f[BAR_H:BAR_H + RED_BLOCK, :RED_BLOCK] = (230, 20, 20)
    return frames


def read_marker(frame: np.ndarray) -> int:
    """The index drawn by `marked_frames` into an upright frame (any codec noise tolerated)."""
    height, width = frame.shape[:2]
    block = width // BITS
    value = 0
    for b in range(BITS):
        # Sample the centre of each block, away from edges that codecs blur.
        cell = frame[2:BAR_H - 2, b * block + 2:(b + 1) * block - 2].astype(np.float64)
        value = (value << 1) | int(cell.mean() > 128)
    return value


def read_markers(frames: np.ndarray) -> list[int]:
    return [read_marker(f) for f in frames]


def has_red_top_left(frame: np.ndarray) -> bool:
    patch = frame[BAR_H + 2:BAR_H + RED_BLOCK - 2, 2:RED_BLOCK - 2].astype(np.int32)
    r, g, b = patch[..., 0].mean(), patch[..., 1].mean(), patch[..., 2].mean()
    return r > 150 and g < 100 and b < 100


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 10.0,
    codec: str = "libx264",
    *,
    vfr_timestamps: np.ndarray | list[float] | None = None,
    rotation: int | None = None,
) -> Path:
    """Encode uint8 [N, H, W, 3] RGB frames; the container comes from the suffix (.mp4 / .avi / .mkv).

    vfr_timestamps: presentation time of each frame in seconds (strictly increasing); written as exact PTS
        on a 1/90000 time base, so the file has a variable frame rate. Use .mp4 or .mkv for this.
    rotation: counter-clockwise degrees a player turns the stored picture by (the display matrix, as
        PyAV's `frame.rotation` reads it back). `frames` are what the viewer should see: they are stored
        turned the other way, so a reader that honours the matrix returns `frames` unchanged.
    """
    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    stored = frames if not rotation else np.rot90(frames, k=-(rotation // 90), axes=(1, 2))
    stored = np.ascontiguousarray(stored)
    n, height, width = stored.shape[:3]
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w", format=CONTAINER_FORMATS[path.suffix.lower()]) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = PIX_FMTS[codec]
        if codec == "libx264":
            # No B-frames: decode order equals presentation order, which keeps explicit PTS simple.
            stream.options = {"bf": "0", "preset": "ultrafast"}
        if vfr_timestamps is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 90000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(stored[i], format="rgb24")
            if vfr_timestamps is not None:
                frame.pts = int(round(float(vfr_timestamps[i]) * 90000))
                frame.time_base = Fraction(1, 90000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- hostile files -------------------------------------------------------------------------------------

def write_empty(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_text(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("this is not a video, whatever the name says\n" * 20)
    return path


def write_random_bytes(path: str | Path, n: int = 20_000, seed: int = 0) -> Path:
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def truncate_copy(src: str | Path, dst: str | Path, keep_bytes: int) -> Path:
    """A copy of `src` cut after `keep_bytes` bytes (a download or upload that stopped)."""
    dst = Path(dst)
    dst.write_bytes(Path(src).read_bytes()[:keep_bytes])
    return dst


def write_header_truncated(path: str | Path, n_frames: int = 10) -> Path:
    """An MP4 cut inside its first few hundred bytes: the container header is incomplete."""
    path = Path(path)
    full = path.with_name(path.stem + "-full" + path.suffix)
    write_video(full, marked_frames(n_frames), fps=10)
    truncate_copy(full, path, 200)
    full.unlink()
    return path


def write_cut_mid_stream(path: str | Path, n_frames: int = 30, keep: float = 0.5,
                         codec: str = "mjpeg") -> tuple[Path, int]:
    """A video cut after `keep` of its bytes; returns (path, frames in the uncut file).

    Use an .avi or .mkv (index/header written first or not needed): an MP4 from PyAV writes its moov
    atom at the end, so a cut MP4 has no index at all and is a header-truncated file instead.
    """
    path = Path(path)
    full = path.with_name(path.stem + "-full" + path.suffix)
    write_video(full, marked_frames(n_frames), fps=10, codec=codec)
    size = full.stat().st_size
    truncate_copy(full, path, int(size * keep))
    full.unlink()
    return path, n_frames


def write_damaged_middle(path: str | Path, n_frames: int = 20, damaged: tuple[int, ...] = (8, 9)) -> Path:
    """An MJPEG AVI whose frames `damaged` are zeroed out (bad sectors, a broken copy): the container is
    intact, those frames do not decode, the rest do."""
    path = Path(path)
    write_video(path, marked_frames(n_frames), fps=10, codec="mjpeg")
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]  # JPEG start markers
    assert len(starts) == n_frames, "expected one JPEG per frame"
    for k in damaged:
        end = starts[k + 1] - 16 if k + 1 < n_frames else len(data) - 64
        data[starts[k]:end] = bytes(end - starts[k])
    path.write_bytes(bytes(data))
    return path
