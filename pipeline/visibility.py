"""Refuse, before any compute, a local store root or local video path that some node of the cluster cannot see.

On one machine a local path just works; on a cluster each node resolves it on its own disk. A writer on a
node without the shared volume would then write shards where no reader looks, and a decoder would fail every
video as missing. So, once Ray is up: the driver writes a marker file holding a random token into the store
root, and one task pinned to each alive node reads it back (the same folder, not merely a folder of the same
name, shows as the right token) and stats a few of the local videos to compute (the size it sees must be the
size listed). Any node that fails stops the run with the node(s), the path and what to do. Remote roots and
videos (s3://, gs://, ...) are skipped: every node reaches them the same way.

A node added after the check (an autoscaler) is not covered: it must mount the same volume (docs/kubernetes.md).
Everything here is pure apart from `check_cluster` (Ray) and the marker file's write and removal.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

MARKER_PREFIX = ".subsume-visibility-"
VIDEOS_CHECKED = 4  # local videos each node stats: the first, the last and a few between
ANSWER_TIMEOUT_S = 180.0  # a node must answer within this (a worker process may have to start first)


class PathNotShared(ValueError):
    """A local path that some node of the cluster cannot see (a usage error: exit 2 from the CLI)."""


@dataclass(frozen=True)
class Probe:
    """What each node checks: the marker (path and token) and a few local videos with their listed sizes."""

    store_root: str
    marker_path: str
    token: str
    videos: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class NodeReport:
    """One node's answer: the problems it found (none when it sees everything)."""

    node_id: str
    address: str
    problems: tuple[str, ...] = ()


def is_local(path: str) -> bool:
    """A path on a node's own file system (no URL scheme, or file://)."""
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def pick_videos(items: Sequence[Any], k: int = VIDEOS_CHECKED) -> tuple[tuple[str, int], ...]:
    """(source, listed size) of the local videos among k positions spread over the work list (the first, the
    last, evenly between): a few lookups, whatever the list's length. `items` have `.source` and `.size`."""
    n = min(k, len(items))
    if n <= 0:
        return ()
    step = (len(items) - 1) / max(1, n - 1)
    chosen = sorted({round(j * step) for j in range(n)})
    return tuple((local_path(items[i].source), int(items[i].size)) for i in chosen if is_local(items[i].source))


@dataclass(frozen=True)
class Listed:
    source: str
    size: int


class WorkListRows(Sequence):
    """A work list (an Arrow table with `source` and `size`) seen as a sequence of Listed, each row read only
    when looked up: pick_videos reads a few, whatever the list's length."""

    def __init__(self, table: Any):
        self._table = table

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i: int) -> Listed:  # type: ignore[override]
        return Listed(self._table.column("source")[i].as_py(), int(self._table.column("size")[i].as_py()))


def make_probe(store_root: str, items: Sequence[Any], token: str | None = None) -> Probe | None:
    """The probe for this run, or None when nothing is local (a remote root and remote videos)."""
    videos = pick_videos(items)
    if not is_local(store_root) and not videos:
        return None
    token = token or secrets.token_hex(16)
    root = local_path(store_root) if is_local(store_root) else ""
    marker = os.path.join(root, MARKER_PREFIX + token) if root else ""
    return Probe(root, marker, token, videos)


def check_probe(probe: Probe) -> tuple[str, ...]:
    """Run on a node: what this node cannot see. Pure apart from reading the marker and stat-ing videos."""
    problems = []
    if probe.marker_path:
        try:
            with open(probe.marker_path, encoding="utf-8") as f:
                seen = f.read().strip()
            if seen != probe.token:
                problems.append(f"store root {probe.store_root}: the marker holds another token (a different "
                                "folder under the same path)")
        except OSError as e:
            problems.append(f"store root {probe.store_root}: cannot read the driver's marker "
                            f"({type(e).__name__}: {e.strerror or e})")
    for path, size in probe.videos:
        try:
            seen_size = os.stat(path).st_size
        except OSError as e:
            problems.append(f"video {path}: {type(e).__name__}: {e.strerror or e}")
            continue
        if seen_size != size:
            problems.append(f"video {path}: {seen_size} bytes here, {size} bytes listed by the driver")
    return tuple(problems)


def refusal(reports: Iterable[NodeReport], probe: Probe) -> str | None:
    """The message that stops the run, or None when every node sees every path."""
    bad = [r for r in reports if r.problems]
    if not bad:
        return None
    lines = [f"{len(bad)} node(s) of the Ray cluster cannot see this run's local paths; nothing was computed."]
    for r in bad:
        lines.append(f"  node {r.node_id} ({r.address}):")
        lines.extend(f"    - {p}" for p in r.problems)
    lines.append("Every node must see the same files at the same path: mount the store root"
                 + (f" ({probe.store_root})" if probe.store_root else "")
                 + " and the videos on a volume shared by all nodes (NFS, a ReadWriteMany PVC), or use object "
                 "storage (--store s3://..., videos listed as s3:// URLs).")
    return "\n".join(lines)


def _probe_task(probe: Probe) -> tuple[str, ...]:
    return check_probe(probe)


def check_cluster(probe: Probe, timeout_s: float = ANSWER_TIMEOUT_S) -> list[NodeReport]:
    """One 0-CPU task pinned (hard affinity) to each alive node runs `check_probe`. A node that died in the
    meantime is left out; one that does not answer in time counts as failing (it could not be checked)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_probe_task)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                         ).remote(probe): n for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    alive_now = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    reports = []
    for ref, n in refs.items():
        if n["NodeID"] in alive_now:  # a node gone since runs nothing of this job
            reports.append(NodeReport(n["NodeID"], n.get("NodeManagerAddress", ""), _answer(ref, ready, timeout_s)))
    return reports


def _answer(ref: Any, ready: list[Any], timeout_s: float) -> tuple[str, ...]:
    import ray

    if ref not in ready:
        return (f"did not answer the visibility check within {timeout_s:.0f} s",)
    try:
        return tuple(ray.get(ref))
    except ray.exceptions.RayError as e:
        return (f"the visibility check failed: {type(e).__name__}: {str(e).splitlines()[0]}",)


def ensure_visible(store_root: str, items: Sequence[Any]) -> None:
    """Raise PathNotShared when some alive node cannot see the local store root or the sampled local videos.
    Call with Ray connected, before any compute. Remote roots and videos skip the check."""
    probe = make_probe(store_root, items)
    if probe is None:
        return
    if probe.marker_path:
        with open(probe.marker_path, "w", encoding="utf-8") as f:
            f.write(probe.token)
    try:
        message = refusal(check_cluster(probe), probe)
    finally:
        if probe.marker_path:
            try:
                os.remove(probe.marker_path)
            except OSError:
                pass
    if message:
        raise PathNotShared(message)
