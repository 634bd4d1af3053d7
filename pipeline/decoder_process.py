"""`iter_decode` in a persistent, killable child process that streams its frames back chunk by chunk.

- The child is started with "spawn" (never fork: Ray workers have threads) and imports its libraries once.
- Per request it sends small dicts (plan, chunk header, end, error) and each chunk's pixels as raw bytes
  (`send_bytes`, no pickle). A pipe holds a few tens of KiB, so a child that runs ahead of its reader waits
  on the pipe: neither side ever holds more than a chunk of frames, whatever the video's length.
- `timeout_s` bounds the time the parent waits on the child for one video (time the reader spends between
  chunks does not count). A child that outlives it is killed with SIGKILL (DecodeTimeout); a child that
  dies (decoders are C code) raises DecodeError("crashed"); either way the next request starts a fresh one.
- A stream abandoned before its end (the reader stopped, or raised) also kills the child: its pipe still
  holds the rest of that video.
- `decode_fn` (default `iter_decode`) is what the child runs: an importable function, so tests can inject
  a slow or crashing stand-in without any switch in product code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from feature_store.spec import PreprocessSpec, SamplingSpec
from pipeline.decode import (DecodedVideo, DecodeError, DecodeEvent, DecodeLimits, DecodeTimeout, FrameChunk,
                             StreamEnd, StreamPlan, collect, iter_decode)

STARTUP_TIMEOUT_S = 120.0  # for the decoder child to import its libraries


class DecoderProcess:
    """Stream or decode videos in a child process, one request at a time (threads are serialised).

    `resize_crop` (a PreprocessSpec) is applied in the child with feature_store.preprocess.resize_crop, so
    only teacher-sized frames cross back. `child_peak_rss` is the child's peak RSS in bytes as it reported
    at the end of the last stream (its whole life so far).
    """

    def __init__(self, timeout_s: float = 300.0, *, decoder: str = "auto", threads: int = 0,
                 limits: DecodeLimits = DecodeLimits(), tmp_dir: str | None = None, start_method: str = "spawn",
                 decode_fn: Callable[..., Iterator[DecodeEvent]] = iter_decode) -> None:
        if start_method == "fork":
            raise ValueError("fork is unsafe in threaded processes such as Ray workers; use spawn or forkserver")
        self.timeout_s = timeout_s
        self.decoder = decoder
        self.threads = threads
        self.limits = limits
        self.decode_fn = decode_fn
        self._ctx = multiprocessing.get_context(start_method)
        self._workdir: str | None = tempfile.mkdtemp(prefix="subsume-decoder-", dir=tmp_dir)
        self._process: Any = None
        self._conn: Any = None
        self._ready = False  # the child said "ready" (its imports are done)
        self._lock = threading.Lock()
        self.restarts = 0  # children killed after a timeout, a crash or an abandoned stream
        self.child_peak_rss = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def decode(self, source: str, sampling: SamplingSpec, **kwargs: Any) -> DecodedVideo:
        """The whole sampled video in memory (see `stream` for the arguments)."""
        return collect(self.stream(source, sampling, **kwargs))

    def stream(self, source: str, sampling: SamplingSpec, *, resize_crop: PreprocessSpec | None = None,
               timeout_s: float | None = None, storage_options: dict[str, Any] | None = None,
               decoder: str | None = None) -> Iterator[DecodeEvent]:
        """StreamPlan (when known), FrameChunks, then StreamEnd; DecodeError on failure."""
        request = {"source": source, "sampling": dataclasses.asdict(sampling),
                   "resize_crop": dataclasses.asdict(resize_crop) if resize_crop is not None else None,
                   "decoder": decoder or self.decoder, "storage_options": storage_options,
                   "limits": dataclasses.asdict(self.limits), "threads": self.threads}
        with self._lock:
            if self._workdir is None:
                raise RuntimeError("DecoderProcess is closed")
            self._ensure_started()
            wait = _Budget(self.timeout_s if timeout_s is None else timeout_s, source)
            finished = False
            try:
                self._send(request)
                while not finished:
                    event = self._next_event(wait)
                    finished = isinstance(event, (StreamEnd, DecodeError))
                    if isinstance(event, DecodeError):
                        raise event  # the child reported it and waits for the next request
                    yield event
            finally:
                if not finished and self._process is not None:  # the child still owes the rest of the video
                    self._restart()

    # -- the pipe ----------------------------------------------------------------------------------------

    def _send(self, request: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(request)  # a dead child shows on the next receive

    def _receive(self, wait: _Budget, raw: bool = False) -> Any:
        try:
            ready = self._conn.poll(wait.left())
        except (BrokenPipeError, EOFError, OSError):
            ready = True  # the child is gone; recv below reports it
        if not ready:
            self._restart()
            raise DecodeTimeout(f"{wait.source}: no result after {wait.total:g} s; decoder process killed")
        wait.charge()
        try:
            return self._conn.recv_bytes() if raw else self._conn.recv()
        except (EOFError, OSError):
            code = self._restart()
            raise DecodeError("crashed", f"{wait.source}: decoder process died (exit code {code})") from None

    def _next_event(self, wait: _Budget) -> DecodeEvent | DecodeError:
        msg = self._receive(wait)
        kind = msg["kind"]
        if kind == "chunk":
            pixels = np.frombuffer(self._receive(wait, raw=True), dtype=np.uint8).reshape(msg["shape"])
            return FrameChunk(pixels, np.asarray(msg["indices"], np.int64), np.asarray(msg["timestamps"], np.float64))
        if kind == "plan":
            return StreamPlan(**{k: v for k, v in msg.items() if k != "kind"})
        if kind == "end":
            self.child_peak_rss = msg.pop("peak_rss")
            return StreamEnd(**{k: v for k, v in msg.items() if k != "kind"})
        return DecodeError(msg["reason"], msg["message"])

    # -- the child's life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the child now, without waiting for its imports (seconds of torch): they overlap the
        caller's own start-up (a teacher's load), and the first request waits only for what is left."""
        with self._lock:
            if self._workdir is None:
                raise RuntimeError("DecoderProcess is closed")
            if self._process is None or not self._process.is_alive():
                self._launch()

    def _ensure_started(self) -> None:
        if self._process is not None and not self._process.is_alive():  # died between requests (killed?)
            self._restart()
        if self._process is None:
            self._launch()
        if not self._ready:
            # Wait for the child's imports, so that request timeouts measure decoding, not start-up.
            if not self._conn.poll(STARTUP_TIMEOUT_S) or not _recv_ready(self._conn):
                code = self._kill()
                raise DecodeError("crashed", f"decoder process did not start (exit code {code})")
            self._ready = True

    def _launch(self) -> None:
        if self._process is not None:
            self._restart()
        parent_conn, child_conn = self._ctx.Pipe()
        self._process = self._ctx.Process(target=_child_main, args=(child_conn, self._workdir, self.decode_fn),
                                          daemon=True, name="subsume-decoder")
        try:
            self._process.start()
        except BaseException:
            self._process = None
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        self._conn, self._ready = parent_conn, False

    def _restart(self) -> int | None:
        self.restarts += 1
        return self._kill()

    def _kill(self) -> int | None:
        """SIGKILL the child, reap it, and clear what it left in the work folder (remote copies)."""
        process, self._process, self._ready = self._process, None, False
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
            # a child still importing holds nothing yet: it is killed without waiting for its imports
            if self._ready and self._process is not None and self._process.is_alive() and self._conn is not None:
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


class _Budget:
    """Seconds left of one video's timeout, counting only the time spent waiting on the child."""

    def __init__(self, total: float, source: str) -> None:
        self.total, self.source = total, source
        self._left = total
        self._since = time.monotonic()

    def left(self) -> float:
        self._since = time.monotonic()
        return max(0.0, self._left)

    def charge(self) -> None:
        self._left -= time.monotonic() - self._since


def _recv_ready(conn: Any) -> bool:
    try:
        return conn.recv() == "ready"
    except (EOFError, OSError):
        return False


def _child_main(conn: Any, workdir: str, decode_fn: Callable[..., Iterator[DecodeEvent]]) -> None:
    """The child's loop: one request in, its stream out, until the parent sends None or goes away."""
    import av  # noqa: F401  (imported here so that start-up cost is paid before the first request)

    with contextlib.suppress(ImportError):
        import decord  # noqa: F401
    import feature_store.preprocess  # noqa: F401  (torch: seconds, which must not count against a video)

    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            _serve(conn, request, workdir, decode_fn)
        except (BrokenPipeError, EOFError, OSError):
            return  # the parent went away or killed the stream


def _serve(conn: Any, request: dict[str, Any], workdir: str, decode_fn: Callable[..., Iterator[DecodeEvent]]) -> None:
    try:
        events = decode_fn(request["source"], SamplingSpec(**request["sampling"]),
                           transform=_resize_crop_transform(request["resize_crop"]), decoder=request["decoder"],
                           storage_options=request["storage_options"], limits=DecodeLimits(**request["limits"]),
                           threads=request["threads"], tmp_dir=workdir)
        end = None
        for event in events:
            if isinstance(event, StreamEnd):
                end = event  # sent once the stream is closed: its temp copy is gone by then
                continue
            _send_event(conn, event)
        if end is not None:
            _send_event(conn, end)
    except DecodeError as e:
        conn.send({"kind": "error", "reason": e.reason, "message": e.message})
    except (BrokenPipeError, EOFError):
        raise
    except Exception as e:  # anything else is still this video's failure, not the child's
        conn.send({"kind": "error", "reason": "decoder_error", "message": f"{type(e).__name__}: {e}"})


def _send_event(conn: Any, event: DecodeEvent) -> None:
    if isinstance(event, FrameChunk):
        frames = np.ascontiguousarray(event.frames)
        conn.send({"kind": "chunk", "shape": frames.shape, "indices": event.indices.tolist(),
                   "timestamps": event.timestamps.tolist()})
        conn.send_bytes(frames.reshape(-1).data)  # one flat view: send_bytes counts items of dimension 0
    elif isinstance(event, StreamPlan):
        conn.send({"kind": "plan", **dataclasses.asdict(event)})
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        conn.send({"kind": "end", **dataclasses.asdict(event), "peak_rss": peak})


def _resize_crop_transform(spec: dict[str, Any] | None) -> Callable[[np.ndarray], np.ndarray] | None:
    if spec is None:
        return None
    import torch

    from feature_store.preprocess import resize_crop

    # One thread: the child serves one decode actor (a fraction of a CPU), and a multi-threaded torch grows
    # per-thread malloc arenas (measured: +160 MiB over a 20-minute video against +0 on one thread).
    torch.set_num_threads(1)
    preprocess = PreprocessSpec(**{**spec, "mean": tuple(spec["mean"]), "std": tuple(spec["std"])})
    return lambda frames: resize_crop(torch.from_numpy(frames), preprocess).numpy()
