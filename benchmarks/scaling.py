"""Scaling: peak memory of all the job's processes and frames/s as the number of videos grows (1x, 2x, 4x).

The extraction streams (Ray Data, bounded actor pools, shards committed as they come), so memory should not
grow with the number of videos. Memory is the summed RSS of this process and all its descendants (the local
Ray cluster and its workers, the decoder children), sampled in a background thread; PSS is reported too.
"""

from __future__ import annotations

from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession

NAME = "scaling"
TARGET = Target(1.2, higher_is_better=False)
MIB = 2**20


def run(session: BenchSession) -> BenchResult:
    scales = sorted(session.cfg.scales)
    per_scale, peaks = {}, {}
    for s in scales:
        r = session.extract(s)
        b = r["bench"]
        peaks[s] = (b["peak_rss_bytes"], b["peak_pss_bytes"])
        per_scale[f"{s}x"] = {
            "videos": r["videos_total"], "frames": r["frames_computed"], "wall_s": sig(b["wall_s"]),
            "frames_per_s": sig(r["frames_computed"] / b["wall_s"]),
            "peak_rss_mib": sig(b["peak_rss_bytes"] / MIB), "peak_pss_mib": sig(b["peak_pss_bytes"] / MIB),
            "idle_rss_mib": sig(b["idle_rss_bytes"] / MIB), "processes": b["processes"],
            "memory_samples": b["memory_samples"]}
    lo, hi = per_scale[f"{scales[0]}x"], per_scale[f"{scales[-1]}x"]
    (rss_lo, pss_lo), (rss_hi, pss_hi) = peaks[scales[0]], peaks[scales[-1]]
    value = rss_hi / rss_lo
    figures = {"scales": per_scale, "pss_ratio": sig(pss_hi / pss_lo) if pss_lo else None,
               "ray_start_s": sig(session.ray_start_s or 0.0, 3)}
    summary = (f"peak RSS {lo['peak_rss_mib']:.0f} -> {hi['peak_rss_mib']:.0f} MiB, "
               f"{lo['frames_per_s']:.0f} -> {hi['frames_per_s']:.0f} frames/s ({scales[0]}x -> {scales[-1]}x)")
    notes = []
    if hi["processes"] != lo["processes"]:
        notes.append(f"the process count differed ({lo['processes']} at {scales[0]}x, {hi['processes']} at "
                     f"{scales[-1]}x): idle Ray workers come and go, and each holds a few hundred MiB")
    return BenchResult(NAME, sig(value), TARGET, summary, figures, notes)
