"""Measuring helpers: wall time with the accelerator drained, medians, and peak memory of a process tree."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, queued GPU work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def marginal_rate(runs: list[tuple[int, float]]) -> float | None:
    """Steady-state items/s from whole runs of different sizes, (items, wall seconds) each: the extra items
    of the largest run over the one before it, divided by its extra time. What every run pays regardless of
    its size (start-up, model loads, the pipeline's fill and drain, commits) cancels, as long as the two runs
    pay the same, which is why the smallest (first, coldest) run is not used when there are three or more.
    None with fewer than two runs or no extra time."""
    pts = sorted(runs)
    if len(pts) < 2:
        return None
    (n0, w0), (n1, w1) = pts[-2], pts[-1]
    return (n1 - n0) / (w1 - w0) if w1 > w0 and n1 > n0 else None


class torch_threads:
    """Temporarily run torch ops on `n` threads (as a 1-CPU Ray actor does); n=0 leaves them alone."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


@dataclass
class MemoryPeak:
    rss_bytes: int = 0  # peak of the summed RSS of the process tree
    pss_bytes: int = 0  # peak of the summed PSS (shared pages counted once); 0 where unavailable
    processes: int = 0  # most processes seen at once
    samples: int = 0
    idle_rss_bytes: int = 0  # summed RSS when sampling started


PSS_EVERY = 5


class TreeMemorySampler:
    """Samples, in a background thread, the memory of this process and all its descendants.

    A local Ray cluster started by this process (GCS, raylet, workers, actors, and the decoder children
    of actors) is a descendant of it, so the tree is "all the job's processes". Summed RSS counts shared
    pages once per process (the object store, shared libraries); PSS is reported beside it.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.peak = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._root = psutil.Process()

    def _tree(self) -> list:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return [self._root]

    def sample(self, with_pss: bool = True) -> tuple[int, int, int]:
        rss = pss = n = 0
        for p in self._tree():
            try:
                rss += p.memory_info().rss
                if with_pss:
                    try:
                        pss += p.memory_full_info().pss
                    except (AttributeError, self._psutil.AccessDenied):
                        pass
                n += 1
            except self._psutil.Error:  # exited between listing and reading
                continue
        return rss, pss, n

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            # PSS reads every page table (milliseconds per large process): every 5th sample, so the sampler
            # itself stays a small load on 2 cores
            rss, pss, n = self.sample(with_pss=i % PSS_EVERY == 0)
            pk = self.peak
            pk.rss_bytes, pk.pss_bytes = max(pk.rss_bytes, rss), max(pk.pss_bytes, pss)
            pk.processes = max(pk.processes, n)
            pk.samples += 1
            i += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self.peak.idle_rss_bytes = self.sample(with_pss=False)[0]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
