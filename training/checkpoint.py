"""What a checkpoint holds, and finding one.

A checkpoint folder carries the whole run: `train_state.json` (the lineage: store, KEY, snapshot version and
its manifest hash, held-out fraction, seed, the student config, and the sampling and preprocessing the
student expects), `state.pt` (rank 0: model, optimiser, scheduler, step, loss history), one `rank_NNNNN.pt`
per training worker (its RNG states, CPU and CUDA, its GradScaler and its data position) and `student/`
(the stand-alone export, training/export.py). Under Ray Train every rank reports its own files and Ray
merges them into one checkpoint folder.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from training.data import DataPosition

STATE_FILE = "state.pt"
LINEAGE_FILE = "train_state.json"
EXPORT_DIR = "student"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


@dataclass
class RunLineage:
    """What a run trains on and what its student expects; written into every checkpoint."""

    store: str
    key: str
    version: int
    manifest_sha256: str
    heldout_fraction: float
    seed: int
    student: dict[str, Any]  # StudentConfig, resolved against the KEY
    sampling: dict[str, Any]  # the KEY's SamplingSpec: how to cut new videos for this student
    preprocess: dict[str, Any]  # the KEY's PreprocessSpec, then a resize to student.image_size
    run_name: str = ""
    target_space: str = "embeds"
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunLineage:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RankState:
    """One training worker's own state: what differs between ranks and must come back per rank."""

    rng: dict[str, Any]
    scaler: dict[str, Any]
    position: DataPosition

    def to_dict(self) -> dict[str, Any]:
        return {"rng": self.rng, "scaler": self.scaler, "position": self.position.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankState:
        return cls(d["rng"], d["scaler"], DataPosition.from_dict(d["position"]))


def capture_rng(device: torch.device) -> dict[str, Any]:
    py = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_rank_state(folder: str, rank: int, state: RankState) -> None:
    torch.save(state.to_dict(), os.path.join(folder, rank_file(rank)))


def read_rank_state(folder: str, rank: int, world_size: int) -> RankState:
    path = os.path.join(folder, rank_file(rank))
    if not os.path.exists(path):
        saved = len([f for f in os.listdir(folder) if re.fullmatch(r"rank_\d{5}\.pt", f)])
        raise ValueError(f"{folder} holds the state of {saved} worker(s), this run has {world_size}: an exact "
                         f"resume needs the same number of workers (--workers {saved})")
    return RankState.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def read_lineage(folder: str) -> RunLineage:
    path = os.path.join(folder, LINEAGE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {LINEAGE_FILE})")
    with open(path) as f:
        return RunLineage.from_dict(json.load(f))


def write_lineage(folder: str, lineage: RunLineage, **progress: Any) -> None:
    with open(os.path.join(folder, LINEAGE_FILE), "w") as f:
        json.dump({**lineage.to_dict(), **progress}, f, indent=1)
