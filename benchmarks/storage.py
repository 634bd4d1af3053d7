"""Storage and fidelity: bytes per stored frame (by member: frames, targets, metadata, tar overhead) and how
close float16 targets are to the float32 teacher output.

Fidelity is the cosine after centring on the float32 mean (a raw cosine cannot tell a good pipeline from a
broken one: a teacher's embeddings share one large direction). It is computed directly on each teacher's
outputs for synthetic frames, and read from the store's manifest (recorded per batch by the extraction).
value = the lowest mean centred cosine of these; the minimum over frames is reported beside it.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from typing import Any

import torch

from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession

NAME = "storage"
TARGET = Target(0.9999)


def centred_cosine(stored: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of `stored` and `exact` [N, D] after subtracting the mean of `exact`."""
    mu = exact.double().mean(0, keepdim=True)
    return torch.nn.functional.cosine_similarity(stored.double() - mu, exact.double() - mu, dim=1)


def direct_fidelity(session: BenchSession, name: str) -> dict[str, Any]:
    teacher, _ = session.teacher(name)
    frames = session.frames(session.cfg.frames_alone, seed=2)
    exact = teacher.embed_batched(frames, session.cfg.extract_batch).embeds.float()
    stored = exact.to(torch.float16).float()
    cos = centred_cosine(stored, exact)
    raw = torch.nn.functional.cosine_similarity(stored.double(), exact.double(), dim=1)
    d = exact.shape[1]
    return {"frames": len(frames), "embed_dim": d, "centred_cos_mean": float(cos.mean()),
            "centred_cos_min": float(cos.min()), "raw_cos_min": float(raw.min()),
            "target_bytes_per_frame_fp16": 2 * d, "target_bytes_per_frame_fp32": 4 * d}


def stored_figures(session: BenchSession) -> dict[str, Any]:
    from feature_store.store import FeatureStore

    run = session.extract(max(session.cfg.scales))
    store = FeatureStore(run["store"])
    snap = store.open(run["key"])
    m = snap.manifest
    frames, total = m["counts"]["frames"], m["counts"]["bytes"]
    by_member: Counter = Counter()
    for shard in snap.shards:
        with store.fs.open(f"{store.key_path(snap.key)}/{shard.name}", "rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar:
                by_member[member.name.split(".", 1)[1]] += member.size
    by_member["tar overhead"] = total - sum(by_member.values())
    fid = m.get("fidelity") or {}
    return {"frames": frames, "bytes": total, "bytes_per_frame": sig(total / frames),
            "bytes_per_frame_by_member": {k: sig(v / frames) for k, v in sorted(by_member.items())},
            "frame_size": snap.spec.preprocess.crop, "frame_encoding": snap.spec.storage.frame_encoding,
            "target_dtype": snap.spec.storage.target_dtype, "embed_dim": snap.spec.embed_dim,
            "manifest_fidelity_mean": fid.get("mean_cos"), "manifest_fidelity_min": fid.get("min_cos")}


def run(session: BenchSession, *, ray_free: bool = False) -> BenchResult:
    direct = {name: direct_fidelity(session, name) for name in session.cfg.teachers}
    means = [f["centred_cos_mean"] for f in direct.values()]
    figures: dict[str, Any] = {"direct": direct}
    summary = ""
    if not ray_free:
        stored = stored_figures(session)
        figures["store"] = stored
        if stored["manifest_fidelity_mean"] is not None:
            means.append(stored["manifest_fidelity_mean"])
        summary = f"{stored['bytes_per_frame']:.0f} B/frame ({stored['frame_size']} px {stored['frame_encoding']}); "
    value = min(means)
    lowest = min(f["centred_cos_min"] for f in direct.values())
    summary += f"fp16 centred cos mean {value:.6f}, min {lowest:.6f}"
    return BenchResult(NAME, value, TARGET, summary, figures)
