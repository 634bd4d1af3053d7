"""Which decoded frames become samples, and how they are cut into segments. Pure logic, numpy only.

Rules (a `SamplingSpec` fixes them, and they are part of the feature KEY):
- By fps: wanted times run t0, t0 + 1/fps, t0 + 2/fps, ... up to the last frame's time, t0 being the first
  frame's time. Each wanted time takes the frame whose presentation time is NEAREST (a tie, within
  `TIE_EPS`, goes to the earlier frame, so decoders whose timestamps differ by float rounding agree).
  Nearest rather than "latest frame at or before t": it halves the worst timing error.
- A frame wanted twice is kept once. When the source has fewer frames per second than asked (a 2 fps
  video sampled "at 4 fps"), repeating frames would show the student still frames as if time passed; we
  keep the real frames at their real spacing instead, so the sampled rate is min(source, fps).
- By stride: every stride-th frame, in presentation order, starting with the first.
- max_frames > 0 keeps only the first max_frames sampled frames.

`FrameSelector` applies these rules to a stream of timestamps (one frame of look-ahead), so a decoder can
decide while it decodes and never holds unselected frames; `select_frames` runs it over an array.
"""

from __future__ import annotations

import math

import numpy as np

from feature_store.spec import SamplingSpec

# Timestamps closer than this (seconds) count as equal when choosing between two frames.
TIE_EPS = 1e-6


class FrameSelector:
    """Streaming form of the sampling rules: feed presentation times in increasing order.

    `push(t)` returns the positions (0-based, in push order) that are now known to be selected, in
    increasing order, each once: at most the `pending` frame (the latest earlier frame with a distinct
    time) and the current one. `done` turns true when max_frames frames have been selected; the caller can
    stop decoding there.
    """

    def __init__(self, spec: SamplingSpec) -> None:
        self.spec = spec
        self.count = 0  # frames pushed
        self.selected = 0  # frames selected so far
        self._last_emitted = -1
        self._prev_t: float | None = None
        self._prev_i = -1  # the frame that may still be chosen for a later wanted time
        self._t0 = 0.0
        self._k = 0  # next wanted time is t0 + k / fps

    @property
    def pending(self) -> int | None:
        """The position a later push may still select: a streaming caller keeps this frame."""
        if self.spec.stride is not None or self.done or self._prev_i <= self._last_emitted:
            return None
        return self._prev_i

    @property
    def done(self) -> bool:
        return 0 < self.spec.max_frames <= self.selected

    def push(self, t: float) -> list[int]:
        i = self.count
        self.count += 1
        if self.done:
            return []
        chosen = self._choose_stride(i) if self.spec.stride is not None else self._choose_fps(i, float(t))
        out: list[int] = []
        for j in chosen:
            if j > self._last_emitted and not self.done:
                out.append(j)
                self._last_emitted = j
                self.selected += 1
        return out

    def _choose_stride(self, i: int) -> list[int]:
        assert self.spec.stride is not None
        return [i] if i % self.spec.stride == 0 else []

    def _choose_fps(self, i: int, t: float) -> list[int]:
        assert self.spec.fps is not None
        if not math.isfinite(t):
            raise ValueError(f"timestamp must be finite, got {t}")
        if self._prev_t is None:
            self._t0 = t
        elif t < self._prev_t - TIE_EPS:
            raise ValueError(f"timestamps must not decrease: {t} after {self._prev_t}")
        elif t <= self._prev_t + TIE_EPS:
            # Same time as the previous frame: ties go to the earlier frame, so this one is never chosen.
            return []
        chosen: list[int] = []
        while True:
            wanted = self._t0 + self._k / self.spec.fps
            if wanted > t + TIE_EPS:
                break  # later frames decide this wanted time
            # Every later frame is at least as far from `wanted` as this one, so the choice is final.
            if self._prev_t is not None and wanted - self._prev_t <= t - wanted + TIE_EPS:
                chosen.append(self._prev_i)
            else:
                chosen.append(i)
            self._k += 1
        self._prev_t, self._prev_i = t, i
        return sorted(set(chosen))


def select_frames(timestamps: np.ndarray, spec: SamplingSpec) -> np.ndarray:
    """Indices into `timestamps` (each frame's presentation time in seconds, any order) of the sampled
    frames, in presentation order. int64; empty for an empty input."""
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if not np.isfinite(ts).all():
        raise ValueError("timestamps must be finite")
    order = np.argsort(ts, kind="stable")
    selector = FrameSelector(spec)
    picked: list[int] = []
    for t in ts[order]:
        picked.extend(selector.push(t))
        if selector.done:
            break
    return order[np.asarray(picked, dtype=np.int64)].astype(np.int64)


def cut_segments(sampled: int | np.ndarray, spec: SamplingSpec) -> list[np.ndarray]:
    """Segments as int64 arrays of positions into the sampled frames (length segment_frames each).

    `sampled` is the number of sampled frames, or the sampled indices themselves (only their count
    matters). Windows step by segment_frames - overlap; a tail that does not fill a window is dropped.
    A video with fewer sampled frames than one segment gives one segment that repeats its last frame
    (short="pad") or none (short="drop"); no frames give none.
    """
    n = int(sampled) if np.isscalar(sampled) else len(sampled)
    length = spec.segment_frames
    if n <= 0:
        return []
    if n < length:
        if spec.short == "drop":
            return []
        return [np.minimum(np.arange(length, dtype=np.int64), n - 1)]
    step = length - spec.overlap
    return [np.arange(s, s + length, dtype=np.int64) for s in range(0, n - length + 1, step)]


def count_segments(sampled: int, spec: SamplingSpec) -> int:
    """len(cut_segments(sampled, spec)), without building them."""
    if sampled <= 0:
        return 0
    if sampled < spec.segment_frames:
        return 0 if spec.short == "drop" else 1
    return (sampled - spec.segment_frames) // (spec.segment_frames - spec.overlap) + 1


class SegmentCutter:
    """`cut_segments` on a stream: push sampled frames (and per-frame values) chunk by chunk, get each
    segment as soon as its last frame arrives. Holds at most one segment plus one chunk of frames.

    Segments are (segment number, positions into the sampled frames, stacked values per pushed array).
    """

    def __init__(self, spec: SamplingSpec) -> None:
        self.spec = spec
        self.step = spec.segment_frames - spec.overlap
        self.pushed = 0  # frames pushed so far
        self._next = 0  # first position of the next window
        self._start = 0  # position of the first buffered frame
        self._buf: list[np.ndarray] | None = None
        self._count = 0

    def push(self, *arrays: np.ndarray) -> list[tuple[int, np.ndarray, list[np.ndarray]]]:
        n = len(arrays[0])
        self._buf = list(arrays) if self._buf is None else [np.concatenate([b, a]) for b, a in zip(self._buf, arrays)]
        self.pushed += n
        out = []
        length = self.spec.segment_frames
        while self._next + length <= self.pushed:
            lo = self._next - self._start
            pos = np.arange(self._next, self._next + length, dtype=np.int64)
            out.append((self._count, pos, [b[lo:lo + length] for b in self._buf]))
            self._count += 1
            self._next += self.step
        drop = min(self._next, self.pushed) - self._start  # frames no later window needs
        if drop > 0:
            self._buf = [b[drop:] for b in self._buf]
            self._start += drop
        return out

    def finish(self) -> list[tuple[int, np.ndarray, list[np.ndarray]]]:
        """The padded segment of a video shorter than one segment (short="pad"), else nothing."""
        if self._count or not self.pushed or self.spec.short == "drop" or self._buf is None:
            return []
        pos = np.minimum(np.arange(self.spec.segment_frames, dtype=np.int64), self.pushed - 1)
        self._count = 1
        return [(0, pos, [b[pos - self._start] for b in self._buf])]
