"""Decode the sampled frames of one video, streaming: decord first, PyAV as the fallback.

- `iter_decode` reads a local path or an fsspec URL and yields, in presentation order: a `StreamPlan` (how
  many frames the sampling selects) when the decoder knows it before decoding (decord), `FrameChunk`s of at
  most CHUNK_FRAMES frames with `transform` already applied, and a final `StreamEnd`. Nothing holds more
  than one chunk of frames, so memory does not grow with the video's length. `decode_video` collects the
  stream into one `DecodedVideo` (for short videos, tests and the plain benchmark loop).
- `DecodeLimits` caps duration, frame count, file size, frame size and aspect ratio before anything is
  decoded (and again while PyAV decodes, where headers may lie); each cap is lifted by setting it to 0.
- A remote file is copied into `tmp_dir` after its size passed the file-size cap and the folder has room
  for it (decord wants a path); the copy is removed when the stream ends.
- Frames are picked by presentation time (`pipeline.sampling`). decord returns frames already turned by the
  container's display matrix; PyAV does not, so its path turns them itself (`frame.rotation` is
  counter-clockwise degrees, np.rot90's direction). decord reads the sampled indices in increasing order
  (its pixels can depend on access order). If decord fails part-way, PyAV decodes the file from the start
  and continues after the last frame already yielded.

Failures raise `DecodeError` with a short machine-readable `.reason` (see REASONS and TRANSIENT).
`pipeline.decoder_process.DecoderProcess` runs `iter_decode` in a killable child process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from feature_store.spec import SamplingSpec
from pipeline.sampling import TIE_EPS, FrameSelector, select_frames

log = logging.getLogger(__name__)

REASONS = {
    "missing": "the file does not exist",
    "empty_file": "the file has zero bytes",
    "not_a_video": "no container format recognises the file",
    "corrupt": "a known video container that cannot be opened (e.g. a truncated header)",
    "no_video_stream": "the container has no video stream (audio only, subtitles, ...)",
    "no_frames": "a video stream without a single decodable frame",
    "too_long": "longer than DecodeLimits.max_duration_s or with more frames than max_frames",
    "too_large": "a file larger than DecodeLimits.max_file_bytes, or frames larger than max_pixels",
    "bad_aspect": "frames wider or taller than DecodeLimits.max_aspect",
    "timeout": "decoding took longer than the timeout (the decoder process was killed)",
    "crashed": "the decoder process died",
    "io": "the file could not be read or copied (network, disk full)",
    "decoder_error": "any other decoder failure",
}
# Reasons that may go away on a retry; the others are properties of the file.
TRANSIENT = frozenset({"timeout", "crashed", "io", "oom"})

DEFAULT_MAX_PIXELS = 7680 * 4320  # 8K UHD
CHUNK_FRAMES = 16  # frames decoded before `transform` runs on them, and yielded together
CHUNK_BYTES = 256 * 2**20  # ... fewer when 16 full-resolution RGB frames would exceed this
TMP_HEADROOM_BYTES = 256 * 2**20  # free space left in tmp_dir after copying a remote file

# First bytes of containers we know: a file that starts like one but does not open is "corrupt".
_SIGNATURES = ((4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (0, b"RIFF"), (0, b"\x1a\x45\xdf\xa3"),
               (0, b"OggS"), (0, b"FLV"), (0, b"\x00\x00\x01\xba"), (0, b"\x47"))


class DecodeError(Exception):
    """A video that could not be decoded. `reason` is one of REASONS; `message` is for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class DecodeTimeout(DecodeError):
    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


@dataclass(frozen=True)
class DecodeLimits:
    """What a video may be before it is refused; 0 lifts a cap. Defaults: 3 hours, 648,000 frames (3 hours
    at 60 fps), 16 GiB, 8K UHD frames, sides at most 4:1."""

    max_duration_s: float = 3 * 3600.0
    max_frames: int = 648_000
    max_file_bytes: int = 16 * 2**30
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = 4.0

    def check_file(self, size: int, name: str) -> None:
        if self.max_file_bytes and size > self.max_file_bytes:
            raise DecodeError("too_large", f"{name}: {size} bytes exceed max_file_bytes={self.max_file_bytes}")

    def check_frames(self, frames: int, seconds: float, name: str) -> None:
        if self.max_frames and frames > self.max_frames:
            raise DecodeError("too_long", f"{name}: more than max_frames={self.max_frames} frames ({frames})")
        if self.max_duration_s and seconds > self.max_duration_s:
            raise DecodeError("too_long", f"{name}: {seconds:.1f} s exceed max_duration_s={self.max_duration_s:g}")

    def check_size(self, width: int, height: int, name: str) -> None:
        if self.max_pixels and width * height > self.max_pixels:
            raise DecodeError("too_large", f"{name}: {width}x{height} frames exceed max_pixels={self.max_pixels}")
        if self.max_aspect and max(width, height) > self.max_aspect * max(1, min(width, height)):
            raise DecodeError("bad_aspect", f"{name}: {width}x{height} frames exceed max_aspect={self.max_aspect:g}")


@dataclass(frozen=True)
class StreamPlan:
    """What is known before any frame is decoded (decord): how many frames the sampling selects, and the
    stream's facts as StreamEnd will report them (unless decord fails part-way; see StreamEnd.decoder)."""

    sampled_total: int
    decoder: str
    fps: float
    num_frames: int
    rotation: int


@dataclass
class FrameChunk:
    """Consecutive sampled frames: uint8 [n, H, W, 3] RGB, upright, `transform` applied; their positions among
    the decoded frames of the file (int64 [n]) and presentation times from the stream's start (float64 [n])."""

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray


@dataclass(frozen=True)
class StreamEnd:
    """decoder: "decord", "pyav", or "decord+pyav" (decord failed part-way). fps: the stream's average rate.
    num_frames: frames in the file (decord: its count; PyAV: frames decoded, or the container's count when it
    stopped early at max_frames, -1 if unknown). rotation: the display matrix's counter-clockwise degrees
    (already applied). sampled: frames yielded in all."""

    decoder: str
    fps: float
    num_frames: int
    rotation: int
    sampled: int


DecodeEvent = Union[StreamPlan, FrameChunk, StreamEnd]


@dataclass
class DecodedVideo:
    """The sampled frames of one video, in presentation order (a collected stream; see FrameChunk/StreamEnd)."""

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    decoder: str
    fps: float
    num_frames: int
    rotation: int


Transform = Callable[[np.ndarray], np.ndarray]


def iter_decode(
    source: str,
    sampling: SamplingSpec,
    *,
    transform: Transform | None = None,
    decoder: str = "auto",
    storage_options: dict[str, Any] | None = None,
    limits: DecodeLimits = DecodeLimits(),
    threads: int = 0,
    tmp_dir: str | None = None,
) -> Iterator[DecodeEvent]:
    """Stream the frames `sampling` selects from `source` (local path or fsspec URL).

    decoder: "auto" (decord if importable, PyAV if decord is missing or fails on the file), "decord" or
        "pyav". threads: decoder threads (0: the library's choice). tmp_dir: where remote files are copied.
    """
    if decoder not in ("auto", "decord", "pyav"):
        raise ValueError(f"unknown decoder {decoder!r}: use 'auto', 'decord' or 'pyav'")
    with _local_copy(source, storage_options, tmp_dir, limits) as path:
        probe = _probe(path, limits)
        chunk = max(1, min(CHUNK_FRAMES, CHUNK_BYTES // max(1, probe.width * probe.height * 3)))
        after: _Resume | None = None
        if decoder in ("auto", "decord"):
            after = _Resume()
            try:
                yield from _decode_decord(path, sampling, transform, chunk, threads, probe.rotation, limits, after)
                return
            except _DecordUnusable as e:
                if decoder == "decord":
                    raise DecodeError(e.reason, e.message) from e.__cause__
                log.info("decord failed on %s (%s); continuing with PyAV", source, e.message)
        yield from _decode_pyav(path, sampling, transform, chunk, threads, limits, after)


def decode_video(source: str, sampling: SamplingSpec, *, transform: Transform | None = None, **kwargs: Any
                 ) -> DecodedVideo:
    """`iter_decode` collected into one DecodedVideo (all sampled frames in memory)."""
    return collect(iter_decode(source, sampling, transform=transform, **kwargs))


def collect(events: Iterator[DecodeEvent]) -> DecodedVideo:
    chunks: list[FrameChunk] = []
    end: StreamEnd | None = None
    for ev in events:
        if isinstance(ev, FrameChunk):
            chunks.append(ev)
        elif isinstance(ev, StreamEnd):
            end = ev
    if end is None:
        raise DecodeError("decoder_error", "the decode stream ended without its summary")
    frames = np.concatenate([c.frames for c in chunks]) if chunks else np.zeros((0, 0, 0, 3), np.uint8)
    indices = np.concatenate([c.indices for c in chunks]) if chunks else np.zeros(0, np.int64)
    times = np.concatenate([c.timestamps for c in chunks]) if chunks else np.zeros(0, np.float64)
    return DecodedVideo(frames=frames, indices=indices.astype(np.int64), timestamps=times.astype(np.float64),
                        decoder=end.decoder, fps=end.fps, num_frames=end.num_frames, rotation=end.rotation)


# --- local copies and probing ---------------------------------------------------------------------------

def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


@contextlib.contextmanager
def _local_copy(source: str, storage_options: dict[str, Any] | None, tmp_dir: str | None,
                limits: DecodeLimits) -> Iterator[str]:
    if not _is_remote(source):
        path = source.removeprefix("file://")
        _check_local_file(path)
        limits.check_file(os.path.getsize(path), path)
        yield path
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(source, **(storage_options or {}))
    size = remote_size(fs, remote, source)
    limits.check_file(size, source)
    folder = tmp_dir or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if size + TMP_HEADROOM_BYTES > free:
        raise DecodeError("io", f"{source}: {size} bytes do not fit in {folder} ({free} bytes free)")
    fd, tmp = tempfile.mkstemp(prefix="subsume-video-", suffix=os.path.splitext(remote)[1], dir=folder)
    os.close(fd)
    try:
        try:
            fs.get_file(remote, tmp)
        except FileNotFoundError as e:
            raise DecodeError("missing", f"{source} does not exist") from e
        except OSError as e:
            raise DecodeError("io", f"{source}: copy failed: {e}") from e
        _check_local_file(tmp, shown_as=source)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remote_size(fs: Any, remote: str, source: str) -> int:
    """A remote file's size from one `info` call; a missing file or a folder is a DecodeError."""
    try:
        info = fs.info(remote)
    except FileNotFoundError as e:
        raise DecodeError("missing", f"{source} does not exist") from e
    except OSError as e:
        raise DecodeError("io", f"{source}: {e}") from e
    if info.get("type") == "directory":
        raise DecodeError("not_a_video", f"{source} is not a regular file")
    return int(info.get("size") or 0)


def _check_local_file(path: str, shown_as: str | None = None) -> None:
    name = shown_as or path
    if not os.path.exists(path):
        raise DecodeError("missing", f"{name} does not exist")
    if not os.path.isfile(path):
        raise DecodeError("not_a_video", f"{name} is not a regular file")
    if os.path.getsize(path) == 0:
        raise DecodeError("empty_file", f"{name} has zero bytes")


def _looks_like_video(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[off:off + len(sig)] == sig for off, sig in _SIGNATURES)


@dataclass(frozen=True)
class _Probe:
    width: int
    height: int
    rotation: int


def _open_container(path: str) -> Any:
    import av

    try:
        return av.open(path)
    except av.error.InvalidDataError as e:
        reason = "corrupt" if _looks_like_video(path) else "not_a_video"
        raise DecodeError(reason, f"{path}: {e}") from e
    except av.error.FFmpegError as e:
        raise DecodeError("decoder_error", f"{path}: {e}") from e


def _probe(path: str, limits: DecodeLimits) -> _Probe:
    """Size, duration, frame count and display rotation from the container (PyAV), checked against limits."""
    import av

    with _open_container(path) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise DecodeError("no_video_stream", f"{path} has no video stream (streams: {kinds or 'none'})")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        limits.check_size(width, height, path)
        seconds = container.duration / av.time_base if container.duration else 0.0
        limits.check_frames(int(stream.frames or 0), seconds, path)
        rotation = 0
        # The rotation lives in the stream's display matrix, which PyAV exposes on decoded frames only.
        with contextlib.suppress(av.error.FFmpegError, StopIteration):
            rotation = int(next(container.decode(stream)).rotation)
    return _Probe(width, height, rotation)


# --- transforms -----------------------------------------------------------------------------------------

def _apply(transform: Transform | None, frames: np.ndarray) -> np.ndarray:
    if transform is None:
        return frames
    out = np.asarray(transform(frames))
    if out.dtype != np.uint8 or out.ndim != 4 or out.shape[0] != frames.shape[0] or out.shape[-1] != 3:
        raise ValueError(f"transform must return uint8 [{frames.shape[0]}, H, W, 3], got {out.dtype} {out.shape}")
    return out


# --- decord ---------------------------------------------------------------------------------------------

class _DecordUnusable(Exception):
    """decord is missing or failed on this file: try PyAV (unless decord was asked for)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Resume:
    """What decord already yielded, so that PyAV can carry on after it."""

    sampled: int = 0
    last_t: float | None = None


def _open_decord(path: str, threads: int, limits: DecodeLimits) -> tuple[Any, np.ndarray, float]:
    try:
        import decord
    except ImportError as e:
        raise _DecordUnusable("decoder_error", "decord is not installed") from e
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        n = len(reader)
        if n == 0:
            raise _DecordUnusable("no_frames", f"{path}: decord found no frames")
        limits.check_frames(n, 0.0, path)
        # Column 0 is each frame's start time: its presentation timestamp, from the stream's start.
        timestamps = np.asarray(reader.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
        fps = float(reader.get_avg_fps())
    except (_DecordUnusable, DecodeError):
        raise
    except Exception as e:  # decord raises RuntimeError / DECORDError subclasses, with C++ text
        raise _DecordUnusable("decoder_error", f"decord could not open {path}: {_first_line(e)}") from e
    if not _usable_timestamps(timestamps):
        # Seen on H.264 in AVI: every frame reported at AV_NOPTS_VALUE. PyAV derives real times there.
        raise _DecordUnusable("decoder_error", f"decord reports no usable timestamps for {path}")
    limits.check_frames(n, float(timestamps[-1] - timestamps[0]), path)
    return reader, timestamps, fps


def _decode_decord(path: str, sampling: SamplingSpec, transform: Transform | None, chunk: int, threads: int,
                   rotation: int, limits: DecodeLimits, done: _Resume) -> Iterator[DecodeEvent]:
    reader, timestamps, fps = _open_decord(path, threads, limits)
    indices = np.sort(select_frames(timestamps, sampling)).astype(np.int64)
    try:
        # A count announced is a promise (segments leave before the video ends): a file cut short, whose
        # container still counts the lost frames, fails here, before anything is yielded.
        reader.get_batch([int(indices[-1])])
    except Exception as e:
        raise _DecordUnusable("decoder_error", f"decord cannot read the last frame of {path}: {_first_line(e)}") from e
    yield StreamPlan(len(indices), "decord", fps, len(reader), rotation)
    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        try:
            batch = reader.get_batch(part.tolist()).asnumpy()
        except Exception as e:
            raise _DecordUnusable("decoder_error", f"decord failed reading {path}: {_first_line(e)}") from e
        yield FrameChunk(_apply(transform, batch), part, timestamps[part])
        done.sampled, done.last_t = done.sampled + len(part), float(timestamps[part[-1]])
    yield StreamEnd("decord", fps, len(reader), rotation, len(indices))


def _usable_timestamps(ts: np.ndarray) -> bool:
    if not (np.isfinite(ts).all() and (ts > -1.0).all()):
        return False
    return len(ts) < 2 or bool((np.diff(ts) >= 0).all() and ts[-1] > ts[0])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --- PyAV -----------------------------------------------------------------------------------------------

def _upright_rgb(frame: Any) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4
    # np.rot90 turns counter-clockwise, the same sense as frame.rotation; copy to drop negative strides.
    return np.ascontiguousarray(np.rot90(rgb, k=quarter_turns)) if quarter_turns else rgb


class _PyavBatch:
    """Chosen frames waiting for the transform, flushed every `chunk` frames as one FrameChunk."""

    def __init__(self, transform: Transform | None, chunk: int, after: _Resume | None) -> None:
        self.transform, self.chunk = transform, chunk
        self.skip_until = after.last_t if after is not None and after.sampled else None
        self.frames: list[np.ndarray] = []
        self.indices: list[int] = []
        self.times: list[float] = []
        self.sampled = after.sampled if after is not None else 0

    def add(self, frame: Any, index: int, t: float) -> None:
        if self.skip_until is not None and t <= self.skip_until + TIE_EPS:
            return  # decord yielded this one already
        self.frames.append(_upright_rgb(frame))
        self.indices.append(index)
        self.times.append(t)

    def flush(self, force: bool = False) -> Iterator[FrameChunk]:
        if self.frames and (force or len(self.frames) >= self.chunk):
            yield FrameChunk(_apply(self.transform, np.stack(self.frames)), np.asarray(self.indices, np.int64),
                             np.asarray(self.times, np.float64))
            self.sampled += len(self.frames)
            self.frames, self.indices, self.times = [], [], []


def _decode_pyav(path: str, sampling: SamplingSpec, transform: Transform | None, chunk: int, threads: int,
                 limits: DecodeLimits, after: _Resume | None) -> Iterator[DecodeEvent]:
    with _open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        # Times from the stream's start, as decord reports them.
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        selector = FrameSelector(sampling)
        batch = _PyavBatch(transform, chunk, after)
        held: dict[int, Any] = {}  # (av.VideoFrame, time) of the current frame and the selector's pending one
        decoded, rotation, last_t = 0, 0, None
        for frame in _tolerant_frames(container, stream):
            rotation = int(frame.rotation) if decoded == 0 else rotation
            t = _frame_time(frame, start, last_t, fps, decoded)
            limits.check_frames(decoded + 1, t, path)
            last_t = t
            held[decoded] = (frame, t)
            for j in selector.push(t):
                batch.add(held[j][0], j, held[j][1])
            keep = selector.pending
            held = {keep: held[keep]} if keep is not None and keep in held else {}
            decoded += 1
            yield from batch.flush()
            if selector.done:
                break
        yield from batch.flush(force=True)
        if decoded == 0:
            raise DecodeError("no_frames", f"{path}: PyAV decoded no frames")
        num_frames = decoded if not selector.done else (stream.frames or -1)
    name = "decord+pyav" if after is not None and after.sampled else "pyav"
    yield StreamEnd(name, fps, int(num_frames), rotation, batch.sampled)


def _frame_time(frame: Any, start: float, last_t: float | None, fps: float, decoded: int) -> float:
    t = frame.time - start if frame.time is not None else None
    if t is None:  # no timestamp: assume the nominal rate
        t = (last_t + 1 / fps if last_t is not None else 0.0) if fps else float(decoded)
    if last_t is not None and t < last_t:
        t = last_t  # a backwards jump in a damaged stream: never choose the frame over its twin
    return t


def _tolerant_frames(container: Any, stream: Any) -> Iterator[Any]:
    """Decoded frames in presentation order, skipping packets the decoder rejects (damaged data)."""
    import av

    packets = container.demux(stream)  # ends with an empty packet that flushes the decoder
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as e:  # the container cannot be read further (cut file)
            log.debug("stopping at an unreadable packet: %s", e)
            return
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            log.debug("skipping a damaged packet: %s", e)
            continue
        yield from frames
