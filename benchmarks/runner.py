"""Run the chosen benchmarks in one process, in an order that lets them share their extraction runs."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Callable

from benchmarks.config import BENCHMARKS, RAY_FREE_BENCHMARKS, BenchConfig
from benchmarks.report import BenchResult, Target
from benchmarks.session import BenchSession

# Scaling first: its 1x/2x/4x runs are the first extractions of each set, which reuse, extraction, storage and
# loader then read. The student-step measurements come last, away from Ray's start-up.
RUN_ORDER = ("scaling", "reuse", "extraction", "storage", "cached_vs_online", "loader", "store_scale",
             "decode_memory", "multinode", "ingest_scale", "learning")
# Modules that import Ray, decord or webdataset when the Ray-free preset must not.
BLOCKED_WHEN_RAY_FREE = ("ray", "decord", "webdataset")


def block_imports(names: tuple[str, ...] = BLOCKED_WHEN_RAY_FREE) -> None:
    """Make `import ray` (etc.) fail in this process, as on a machine without them (None in sys.modules)."""
    for name in names:
        if name in sys.modules and sys.modules[name] is not None:
            raise RuntimeError(f"{name} is already imported; block it before anything imports it")
        sys.modules[name] = None  # type: ignore[assignment]


def check_selection(only: tuple[str, ...], ray_free: bool) -> None:
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    if ray_free:
        needs_ray = [n for n in only if n not in RAY_FREE_BENCHMARKS]
        if needs_ray:
            verb = "needs" if len(needs_ray) == 1 else "need"
            raise ValueError(f"{', '.join(needs_ray)} {verb} Ray and decord; the Ray-free preset runs only "
                             f"{', '.join(RAY_FREE_BENCHMARKS)}")


def run_benchmarks(cfg: BenchConfig, only: tuple[str, ...], workdir: Path, *, ray_free: bool,
                   log: Callable[[str], None]) -> list[BenchResult]:
    """The results in BENCHMARKS order. A benchmark that raises is reported with no value and the error."""
    from benchmarks import (cached_vs_online, decode_memory, extraction, ingest_scale, learning, loader, multinode,
                            reuse, scaling, storage, store_scale)

    import torch

    check_selection(only, ray_free)
    session = BenchSession(cfg, workdir, log)  # notes torch's default thread count first
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    funcs = {
        "cached_vs_online": lambda: cached_vs_online.run(session),
        "extraction": lambda: extraction.run(session, ray_free=ray_free),
        "loader": lambda: loader.run(session),
        "reuse": lambda: reuse.run(session),
        "storage": lambda: storage.run(session, ray_free=ray_free),
        "scaling": lambda: scaling.run(session),
        "store_scale": lambda: store_scale.run(session),
        "decode_memory": lambda: decode_memory.run(session),
        "multinode": lambda: multinode.run(session),
        "ingest_scale": lambda: ingest_scale.run(session),
        "learning": lambda: learning.run(session),
    }
    targets = {"cached_vs_online": cached_vs_online.TARGET, "extraction": extraction.CPU_TARGET,
               "loader": loader.TARGET, "reuse": reuse.TARGET, "storage": storage.TARGET, "scaling": scaling.TARGET,
               "store_scale": store_scale.TARGET, "decode_memory": decode_memory.TARGET,
               "multinode": multinode.TARGET, "ingest_scale": ingest_scale.TARGET, "learning": learning.TARGET}
    results: dict[str, BenchResult] = {}
    try:
        for name in RUN_ORDER:
            if name not in only:
                continue
            log(f"== {name}")
            try:
                results[name] = funcs[name]()
            except Exception as e:  # one broken benchmark must not hide the others' figures
                traceback.print_exc(file=sys.stderr)
                target: Target = targets[name]
                results[name] = BenchResult(name, None, target, f"error: {type(e).__name__}", {"error": str(e)},
                                            [f"failed: {type(e).__name__}: {e}"])
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    return [results[n] for n in BENCHMARKS if n in results]
