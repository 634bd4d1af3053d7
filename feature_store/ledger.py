"""The failure ledger: one append-only table of attempts, and the one function that decides what to retry.

Each run appends at most one `attempt` row per video (failure_id) and a `cleared` row for each video it
extracted. A KEY version's ledger state is an Arrow aggregation: per failure_id, the attempts (distinct runs)
since its last `cleared` row, and the latest attempt's cause. Nothing is rewritten, so a commit costs the
failures it adds.

Causes: a failure is `deterministic` when the same bytes through the same decoder and judging code fail the
same way again (not a video, empty, no frames, damaged header, too short), `transient` otherwise (timeout,
out of memory, I/O, a crashed decoder). `decide` is the only place that turns a ledger row into retry or skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# Bump when the code that judges a video (decoding, sampling checks) changes what it accepts: deterministic
# failures recorded under another version are then retried once.
JUDGE_CODE_VERSION = "2"

DETERMINISTIC = frozenset({"missing", "empty_file", "not_a_video", "corrupt", "no_video_stream", "no_frames",
                           "too_large", "too_short"})

LEDGER_SCHEMA = pa.schema([
    ("failure_id", pa.string()),
    ("kind", pa.string()),  # "attempt" | "cleared"
    ("video_sha256", pa.string()),
    ("source", pa.string()),  # display form; see names.py for names that are not UTF-8
    ("source_raw", pa.binary()),  # the name's bytes when it is not valid UTF-8, else null
    ("stage", pa.string()),
    ("error", pa.string()),
    ("cause", pa.string()),  # "deterministic" | "transient"
    ("message", pa.string()),
    ("judged_by", pa.string()),  # decoder and judging-code version that produced the verdict
    ("run_id", pa.string()),
    ("at", pa.string()),  # UTC ISO time of the attempt, microseconds (orders attempts)
])

# The aggregated state (Snapshot.failures): one row per failing video.
FAILURES_SCHEMA = pa.schema([
    ("failure_id", pa.string()),
    ("video_sha256", pa.string()),
    ("source", pa.string()),
    ("source_raw", pa.binary()),
    ("stage", pa.string()),
    ("error", pa.string()),
    ("cause", pa.string()),
    ("message", pa.string()),
    ("judged_by", pa.string()),
    ("attempts", pa.int64()),
    ("retryable", pa.bool_()),
    ("last_attempt", pa.string()),
])


def cause_of(error: str, retryable: bool = True) -> str:
    return "deterministic" if (error in DETERMINISTIC or not retryable) else "transient"


def ledger_state(ledger: pa.Table) -> pa.Table:
    """Per failure_id: attempts (distinct runs) since the last `cleared` row, with the latest attempt's fields."""
    if ledger.num_rows == 0:
        return FAILURES_SCHEMA.empty_table()
    kind = ledger.column("kind")
    cleared = ledger.filter(pc.equal(kind, "cleared")).group_by("failure_id").aggregate([("at", "max")]) \
        .rename_columns({"at_max": "cleared_at"})
    tries = ledger.filter(pc.equal(kind, "attempt")).join(cleared, "failure_id", join_type="left outer")
    live = pc.or_kleene(pc.is_null(tries.column("cleared_at")), pc.greater(tries.column("at"), tries.column("cleared_at")))
    tries = tries.filter(live)
    if tries.num_rows == 0:
        return FAILURES_SCHEMA.empty_table()
    per_run = tries.group_by(["failure_id", "run_id"]).aggregate([("at", "max")])
    counts = per_run.group_by("failure_id").aggregate([("run_id", "count"), ("at_max", "max")]) \
        .rename_columns({"run_id_count": "attempts", "at_max_max": "last_attempt"})
    latest = tries.join(counts, "failure_id").filter(pc.equal(pc.field("at"), pc.field("last_attempt")))
    _, first = _first_per(latest.column("failure_id"))
    latest = latest.take(first)  # two rows at the same instant: keep one
    retryable = pc.equal(latest.column("cause"), "transient")
    out = latest.append_column("retryable", retryable)
    return out.select(FAILURES_SCHEMA.names).cast(FAILURES_SCHEMA).sort_by("failure_id")


def _first_per(keys: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Indices of the first row of each distinct key."""
    import numpy as np

    order = pc.sort_indices(keys).to_numpy()
    sorted_keys = keys.take(order).to_numpy(zero_copy_only=False)
    keep = np.ones(len(order), bool)
    keep[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return pa.array(sorted_keys[keep]), pa.array(order[keep])


@dataclass(frozen=True)
class Verdict:
    retry: bool
    why: str


def decide(*, error: str, cause: str, attempts: int, judged_by: str, judge_now: str, max_attempts: int,
           retry_failed: bool = False) -> Verdict:
    """Retry a failed video, or skip it (quarantine). The only place this is decided."""
    if retry_failed:
        return Verdict(True, "--retry-failed")
    if cause == "deterministic":
        if judged_by != judge_now:
            return Verdict(True, f"{error} judged by {judged_by or 'unknown'}, now {judge_now}")
        return Verdict(False, f"{error} (deterministic; same bytes, same decoder)")
    if attempts >= max_attempts:
        return Verdict(False, f"failed {attempts} times (max_attempts {max_attempts}): {error}")
    return Verdict(True, f"{error} (transient, attempt {attempts + 1} of {max_attempts})")


def judge_version() -> str:
    """Decoder libraries and judging-code version that stand behind a verdict recorded now."""
    from importlib import metadata

    parts = []
    for dist in ("decord", "av"):
        try:
            parts.append(f"{dist}-{metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return "/".join(parts + [f"judge-{JUDGE_CODE_VERSION}"])
