"""Reuse: wall time of a second extraction over the same videos into the same store, against the first.

The second run re-plans (stats each file, finds its content hash in the index, fingerprints the teacher)
and computes nothing. Both runs find Ray already started. The ratio is taken on the largest set, since the
first run grows with the frames and the second does not; the 1x ratio is reported beside it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession

NAME = "reuse"
TARGET = Target(0.1, higher_is_better=False)


def _pair(session: BenchSession, scale: int) -> dict[str, Any]:
    first = session.extract(scale)
    session.log(f"{NAME}: extracting the {scale}x set again into the same store")
    second = session.run_extract(session.manifest(scale), first["store"])
    w1, w2 = first["bench"]["wall_s"], second["bench"]["wall_s"]
    return {"videos": first["videos_total"], "first_wall_s": sig(w1), "second_wall_s": sig(w2),
            "first_frames_computed": first["frames_computed"], "second_frames_computed": second["frames_computed"],
            "second_frames_reused": second["frames_reused"], "second_videos_reused": second["videos_reused"],
            "ratio": sig(w2 / w1)}


def run(session: BenchSession) -> BenchResult:
    big = max(session.cfg.scales)
    runs = {f"{s}x": _pair(session, s) for s in sorted({1, big})}
    main = runs[f"{big}x"]
    notes = []
    if main["second_frames_computed"]:
        notes.append(f"the second run computed {main['second_frames_computed']} frames again: reuse is broken")
    summary = (f"{big}x set: {main['second_wall_s']:.2f} s again vs {main['first_wall_s']:.1f} s first "
               f"({main['second_frames_computed']} frames recomputed)")
    return BenchResult(NAME, main["ratio"], TARGET, summary,
                       {"runs": runs, "ratio_on": f"{big}x"}, notes)
