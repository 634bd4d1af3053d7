"""Decode the sampled frames of one video: decord first, PyAV as the fallback, in a killable child process.

- `decode_video` reads a local path or an fsspec URL (remote files are copied to a local temp file, since
  decord wants a path), picks frames by presentation time (`pipeline.sampling`), and applies `transform`
  per chunk right after decoding, so full-resolution frames never pile up.
- decord returns frames already turned by the container's display matrix; PyAV does not, so its path turns
  them itself (`frame.rotation` is counter-clockwise degrees, np.rot90's direction).
- decord reads the sampled indices in increasing order (its pixels can depend on access order); the
  chunks continue one forward pass, as a single `get_batch` would. PyAV decodes once, front to back,
  choosing frames as it goes, and keeps the frames of a file cut mid-stream that really decode.
- `DecoderProcess` runs decode_video in a persistent "spawn" child (never fork: Ray workers have threads).
  A decode that outlives its timeout, or a child that crashes (decoders are C code), costs only that video:
  the child is killed with SIGKILL and restarted on the next request. Frames come back as an .npy file
  (allow_pickle=False); only a small JSON-able dict crosses the pipe.

Failures raise `DecodeError` with a machine-readable `.reason` (see REASONS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from feature_store.spec import PreprocessSpec, SamplingSpec
from pipeline.sampling import FrameSelector, select_frames

log = logging.getLogger(__name__)

REASONS = {
    "missing": "the file does not exist",
    "empty_file": "the file has zero bytes",
    "not_a_video": "no container format recognises the file",
    "corrupt": "a known video container that cannot be opened (e.g. a truncated header)",
    "no_video_stream": "the container has no video stream (audio only, subtitles, ...)",
    "no_frames": "a video stream without a single decodable frame",
    "too_large": "frames larger than max_pixels",
    "timeout": "decoding took longer than the timeout (the decoder process was killed)",
    "crashed": "the decoder process died",
    "decoder_error": "any other decoder failure",
}

DEFAULT_MAX_PIXELS = 7680 * 4320  # 8K UHD; larger frames are rejected rather than decoded
CHUNK_FRAMES = 16  # frames decoded before `transform` runs on them
CHUNK_BYTES = 256 * 2**20  # ... fewer when 16 full-resolution RGB frames would exceed this
STARTUP_TIMEOUT_S = 120.0  # for the decoder child to import its libraries
TEST_DECODERS_ENV = "SUBSUME_TEST_DECODERS"  # "1" enables decoder="sleep:<s>" / "crash" (tests only)

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


@dataclass
class DecodedVideo:
    """The sampled frames of one video, in presentation order.

    frames: uint8 [N, H, W, 3] RGB, upright, `transform` applied. indices: int64 [N] positions among the
    decoded frames of the file (PyAV skips a frame that does not decode and does not count it).
    timestamps: float64 [N] presentation times in seconds from the stream's start. fps: the stream's
    average rate. num_frames: frames in the file (decord: its frame count; PyAV: frames decoded, or the
    container's count when it stopped early at max_frames, -1 if that is unknown). rotation: the display
    matrix's counter-clockwise degrees as found in the file (already applied to `frames`).
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    decoder: str
    fps: float
    num_frames: int
    rotation: int


Transform = Callable[[np.ndarray], np.ndarray]


def decode_video(
    source: str,
    sampling: SamplingSpec,
    *,
    transform: Transform | None = None,
    decoder: str = "auto",
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
    tmp_dir: str | None = None,
) -> DecodedVideo:
    """Decode the frames `sampling` selects from `source` (local path or fsspec URL).

    decoder: "auto" (decord if importable, PyAV if decord is missing or fails on the file), "decord" or
        "pyav". threads: decoder threads (0: the library's choice). tmp_dir: where remote files are copied.
    """
    decoder = _check_decoder(decoder)
    with _local_copy(source, storage_options, tmp_dir) as path:
        if decoder.startswith("sleep:"):
            time.sleep(float(decoder.split(":", 1)[1]))
            decoder = "auto"
        elif decoder == "crash":
            os._exit(70)
        probe = _probe(path, max_pixels)
        chunk = max(1, min(CHUNK_FRAMES, CHUNK_BYTES // max(1, probe.width * probe.height * 3)))
        if decoder in ("auto", "decord"):
            try:
                return _decode_decord(path, sampling, transform, chunk, threads, probe.rotation)
            except _DecordUnusable as e:
                if decoder == "decord":
                    raise DecodeError(e.reason, e.message) from e.__cause__
                log.info("decord failed on %s (%s); falling back to PyAV", source, e.message)
        return _decode_pyav(path, sampling, transform, chunk, threads)


def _check_decoder(decoder: str) -> str:
    if decoder in ("auto", "decord", "pyav"):
        return decoder
    if decoder == "crash" or decoder.startswith("sleep:"):
        if os.environ.get(TEST_DECODERS_ENV) != "1":
            raise ValueError(f"decoder {decoder!r} is a test stand-in; set {TEST_DECODERS_ENV}=1 to use it")
        return decoder
    raise ValueError(f"unknown decoder {decoder!r}: use 'auto', 'decord' or 'pyav'")


# --- local copies and probing ---------------------------------------------------------------------------

def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


@contextlib.contextmanager
def _local_copy(source: str, storage_options: dict[str, Any] | None, tmp_dir: str | None) -> Iterator[str]:
    if not _is_remote(source):
        path = source.removeprefix("file://")
        _check_local_file(path)
        yield path
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(source, **(storage_options or {}))
    fd, tmp = tempfile.mkstemp(prefix="subsume-video-", suffix=os.path.splitext(remote)[1], dir=tmp_dir)
    os.close(fd)
    try:
        try:
            fs.get_file(remote, tmp)
        except FileNotFoundError as e:
            raise DecodeError("missing", f"{source} does not exist") from e
        _check_local_file(tmp, shown_as=source)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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


def _probe(path: str, max_pixels: int) -> _Probe:
    """Size and display rotation from PyAV (decord exposes neither without decoding and seeking)."""
    import av

    with _open_container(path) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise DecodeError("no_video_stream", f"{path} has no video stream (streams: {kinds or 'none'})")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise DecodeError("too_large", f"{path}: {width}x{height} frames exceed max_pixels={max_pixels}")
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


def _stack(chunks: list[np.ndarray]) -> np.ndarray:
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


# --- decord ---------------------------------------------------------------------------------------------

class _DecordUnusable(Exception):
    """decord is missing or failed on this file: try PyAV (unless decord was asked for)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _decode_decord(path: str, sampling: SamplingSpec, transform: Transform | None, chunk: int, threads: int,
                   rotation: int) -> DecodedVideo:
    try:
        import decord
    except ImportError as e:
        raise _DecordUnusable("decoder_error", "decord is not installed") from e
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        n = len(reader)
        if n == 0:
            raise _DecordUnusable("no_frames", f"{path}: decord found no frames")
        # Column 0 is each frame's start time: its presentation timestamp, from the stream's start.
        timestamps = np.asarray(reader.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
        fps = float(reader.get_avg_fps())
    except _DecordUnusable:
        raise
    except Exception as e:  # decord raises RuntimeError / DECORDError subclasses, with C++ text
        raise _DecordUnusable("decoder_error", f"decord could not open {path}: {_first_line(e)}") from e
    if not _usable_timestamps(timestamps):
        # Seen on H.264 in AVI: every frame reported at AV_NOPTS_VALUE. PyAV derives real times there.
        raise _DecordUnusable("decoder_error", f"decord reports no usable timestamps for {path}")
    indices = np.sort(select_frames(timestamps, sampling))
    chunks: list[np.ndarray] = []
    for start in range(0, len(indices), chunk):
        try:
            batch = reader.get_batch(indices[start:start + chunk].tolist()).asnumpy()
        except Exception as e:
            raise _DecordUnusable("decoder_error", f"decord failed reading {path}: {_first_line(e)}") from e
        chunks.append(_apply(transform, batch))
    return DecodedVideo(frames=_stack(chunks), indices=indices.astype(np.int64), timestamps=timestamps[indices],
                        decoder="decord", fps=fps, num_frames=n, rotation=rotation)


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


def _decode_pyav(path: str, sampling: SamplingSpec, transform: Transform | None, chunk: int,
                 threads: int) -> DecodedVideo:
    import av

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
        held: dict[int, Any] = {}  # (av.VideoFrame, time) of the current frame and the selector's pending one
        batch: list[np.ndarray] = []  # upright RGB frames waiting for the transform
        chunks: list[np.ndarray] = []
        indices: list[int] = []
        times: list[float] = []
        decoded = 0
        rotation = 0
        last_t: float | None = None
        for frame in _tolerant_frames(container, stream):
            if decoded == 0:
                rotation = int(frame.rotation)
            t = frame.time - start if frame.time is not None else None
            if t is None:  # no timestamp: assume the nominal rate
                t = (last_t + 1 / fps if last_t is not None else 0.0) if fps else float(decoded)
            if last_t is not None and t < last_t:
                t = last_t  # a backwards jump in a damaged stream: never choose the frame over its twin
            last_t = t
            held[decoded] = (frame, t)
            for j in selector.push(t):
                chosen, chosen_t = held[j]
                batch.append(_upright_rgb(chosen))
                indices.append(j)
                times.append(chosen_t)
            keep = selector.pending
            held = {keep: held[keep]} if keep is not None and keep in held else {}
            decoded += 1
            if len(batch) >= chunk:
                chunks.append(_apply(transform, np.stack(batch)))
                batch = []
            if selector.done:
                break
        if batch:
            chunks.append(_apply(transform, np.stack(batch)))
        if decoded == 0:
            raise DecodeError("no_frames", f"{path}: PyAV decoded no frames")
        num_frames = decoded if not selector.done else (stream.frames or -1)
    return DecodedVideo(frames=_stack(chunks), indices=np.asarray(indices, dtype=np.int64),
                        timestamps=np.asarray(times, dtype=np.float64), decoder="pyav", fps=fps,
                        num_frames=int(num_frames), rotation=rotation)


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


# --- the killable child process -------------------------------------------------------------------------

class DecoderProcess:
    """decode_video in a persistent child process, with a per-video timeout.

    One request at a time (calls from several threads are serialised). A decode that outlives its timeout
    raises DecodeTimeout; a child that dies raises DecodeError("crashed"); either way the child is killed
    and the next request starts a fresh one. `resize_crop` (a PreprocessSpec) is applied in the child with
    feature_store.preprocess.resize_crop, so only teacher-sized frames cross back.
    """

    def __init__(self, timeout_s: float = 300.0, *, decoder: str = "auto", threads: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, tmp_dir: str | None = None,
                 start_method: str = "spawn") -> None:
        if start_method == "fork":
            raise ValueError("fork is unsafe in threaded processes such as Ray workers; use spawn or forkserver")
        self.timeout_s = timeout_s
        self.decoder = decoder
        self.threads = threads
        self.max_pixels = max_pixels
        self._ctx = multiprocessing.get_context(start_method)
        self._workdir = tempfile.mkdtemp(prefix="subsume-decoder-", dir=tmp_dir)
        self._process: Any = None
        self._conn: Any = None
        self._requests = 0
        self._lock = threading.Lock()
        self.restarts = 0  # children killed after a timeout or crash

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def decode(self, source: str, sampling: SamplingSpec, *, resize_crop: PreprocessSpec | None = None,
               timeout_s: float | None = None, storage_options: dict[str, Any] | None = None,
               decoder: str | None = None) -> DecodedVideo:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._workdir is None:
                raise RuntimeError("DecoderProcess is closed")
            self._ensure_started()
            self._requests += 1
            request = {
                "id": self._requests,
                "source": source,
                "sampling": dataclasses.asdict(sampling),
                "resize_crop": dataclasses.asdict(resize_crop) if resize_crop is not None else None,
                "decoder": decoder or self.decoder,
                "storage_options": storage_options,
                "max_pixels": self.max_pixels,
                "threads": self.threads,
            }
            try:
                self._conn.send(request)
                ready = self._conn.poll(timeout)
            except (BrokenPipeError, EOFError, OSError):
                ready = True  # the child is gone; recv below reports it
            if not ready:
                self._kill()
                self.restarts += 1
                raise DecodeTimeout(f"{source}: no result after {timeout:g} s; decoder process killed")
            try:
                reply = self._conn.recv()
            except (EOFError, OSError):
                code = self._kill()
                self.restarts += 1
                raise DecodeError("crashed", f"{source}: decoder process died (exit code {code})") from None
        return self._result(reply)

    def _result(self, reply: dict[str, Any]) -> DecodedVideo:
        if not reply["ok"]:
            raise DecodeError(reply["reason"], reply["message"])
        frames_path = reply["frames"]
        try:
            frames = np.load(frames_path, allow_pickle=False)
        finally:
            os.unlink(frames_path)
        return DecodedVideo(frames=frames, indices=np.asarray(reply["indices"], dtype=np.int64),
                            timestamps=np.asarray(reply["timestamps"], dtype=np.float64), decoder=reply["decoder"],
                            fps=reply["fps"], num_frames=reply["num_frames"], rotation=reply["rotation"])

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        if self._process is not None:  # died between requests (killed from outside?)
            self._kill()
            self.restarts += 1
        parent_conn, child_conn = self._ctx.Pipe()
        self._process = self._ctx.Process(target=_child_main, args=(child_conn, self._workdir), daemon=True,
                                          name="subsume-decoder")
        self._process.start()
        child_conn.close()
        self._conn = parent_conn
        # Wait for the child's imports, so that request timeouts measure decoding, not start-up.
        if not parent_conn.poll(STARTUP_TIMEOUT_S) or not _recv_ready(parent_conn):
            code = self._kill()
            raise DecodeError("crashed", f"decoder process did not start (exit code {code})")

    def _kill(self) -> int | None:
        """SIGKILL the child, reap it, and clear what it left in the work folder."""
        process, self._process = self._process, None
        code = None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(10)
            code = process.exitcode
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._workdir is not None:
            for name in os.listdir(self._workdir):
                with contextlib.suppress(OSError):
                    p = os.path.join(self._workdir, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
        return code

    def close(self) -> None:
        with self._lock:
            if self._process is not None and self._process.is_alive() and self._conn is not None:
                with contextlib.suppress(OSError, BrokenPipeError):
                    self._conn.send(None)  # ask for a clean exit
                self._process.join(5)
            self._kill()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> DecoderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _recv_ready(conn: Any) -> bool:
    try:
        return conn.recv() == "ready"
    except (EOFError, OSError):
        return False


def _child_main(conn: Any, workdir: str) -> None:
    """The child's loop: one request in, one small dict out, until the parent sends None or goes away."""
    import av  # noqa: F401  (imported here so that start-up cost is paid before the first request)

    with contextlib.suppress(ImportError):
        import decord  # noqa: F401
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        conn.send(_serve(request, workdir))


def _serve(request: dict[str, Any], workdir: str) -> dict[str, Any]:
    try:
        transform = _resize_crop_transform(request["resize_crop"])
        video = decode_video(request["source"], SamplingSpec(**request["sampling"]), transform=transform,
                             decoder=request["decoder"], storage_options=request["storage_options"],
                             max_pixels=request["max_pixels"], threads=request["threads"], tmp_dir=workdir)
    except DecodeError as e:
        return {"ok": False, "reason": e.reason, "message": e.message}
    except Exception as e:  # anything else is still this video's failure, not the child's
        return {"ok": False, "reason": "decoder_error", "message": f"{type(e).__name__}: {e}"}
    frames_path = os.path.join(workdir, f"{request['id']}-frames.npy")
    np.save(frames_path, video.frames, allow_pickle=False)
    return {"ok": True, "frames": frames_path, "indices": video.indices.tolist(),
            "timestamps": video.timestamps.tolist(), "decoder": video.decoder, "fps": video.fps,
            "num_frames": video.num_frames, "rotation": video.rotation}


def _resize_crop_transform(spec: dict[str, Any] | None) -> Transform | None:
    if spec is None:
        return None
    import torch

    from feature_store.preprocess import resize_crop

    preprocess = PreprocessSpec(**{**spec, "mean": tuple(spec["mean"]), "std": tuple(spec["std"])})
    return lambda frames: resize_crop(torch.from_numpy(frames), preprocess).numpy()
