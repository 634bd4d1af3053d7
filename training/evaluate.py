"""What training bought: kNN and linear-probe accuracy on held-out labelled samples.

The bank (kNN neighbours, probe training data) is the labelled training split; queries are the held-out
split (by video content hash, so a video's segments never straddle the two), at the held-out fraction the
run trained with (from the checkpoint). Samples are streamed a batch at a time; only embeddings are kept. Three embeddings are compared:
the trained student, a randomly initialised student of the same config, and the teacher's frame-averaged
cached targets (standardised with the KEY's statistics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feature_store.reader import SplitFilter, iter_samples
from feature_store.store import FeatureStore
from training.checkpoint import EXPORT_DIR, RunLineage, read_lineage
from training.data import resize_frames
from training.models import StudentConfig, build_student, video_to_input, with_temporal_derivative


@dataclass
class EmbeddedSplit:
    """One split's labelled samples, reduced to what the probes need: embeddings per model and labels."""

    feats: dict[str, np.ndarray]  # model name -> [N, E]
    labels: dict[str, list[str]]  # label column -> one value per sample ("" where a sample lacks it)
    videos: list[str]

    @property
    def n(self) -> int:
        return len(self.videos)


def centre_window(frames: np.ndarray, length: int) -> np.ndarray:
    """The `length` frames in the middle of a segment: the one clip of a sample that evaluation embeds."""
    start = max((frames.shape[0] - length) // 2, 0)
    return frames[start:start + length]


@torch.no_grad()
def embed_clips(model: torch.nn.Module, cfg: StudentConfig, clips: list[np.ndarray]) -> np.ndarray:
    """uint8 clips [T, H, W, 3] -> the student's clip embeddings [N, E] (resized to its input size)."""
    x = resize_frames(torch.from_numpy(np.stack(clips)), cfg.image_size)
    return model(video_to_input(x, cfg)).clip.float().numpy()


TEACHER_READOUTS = ("mean", "mean_derivative", "concat")


def teacher_readout(targets: np.ndarray, kind: str = "mean") -> np.ndarray:
    """Standardised teacher embeddings of clips' frames [N, T, D] -> one vector per clip: "mean" (the plain
    frame average), "mean_derivative" (the students' temporal readout: the mean of the frames and of their
    temporal derivative, `models.with_temporal_derivative`) or "concat" (the frames side by side, [N, T * D])."""
    if kind == "mean":
        return targets.mean(axis=1)
    if kind == "mean_derivative":
        return with_temporal_derivative(torch.from_numpy(np.ascontiguousarray(targets)), dim=1).mean(dim=1).numpy()
    if kind == "concat":
        return targets.reshape(targets.shape[0], -1)
    raise ValueError(f"unknown teacher readout {kind!r}; expected one of {TEACHER_READOUTS}")


def embed_split(store: FeatureStore, snapshot: Any, split: SplitFilter, models: dict[str, torch.nn.Module],
                cfg: StudentConfig, *, teacher_stats: tuple[np.ndarray, np.ndarray] | None = None,
                batch_size: int = 32) -> EmbeddedSplit:
    """Stream a split's labelled samples through the models a batch at a time: memory holds one batch of
    frames and the embeddings, never the split's frames. With `teacher_stats`, also the teacher's
    frame-averaged standardised targets (as model "teacher")."""
    for m in models.values():
        m.eval()
    feats: dict[str, list[np.ndarray]] = {name: [] for name in [*models, *(["teacher"] if teacher_stats else [])]}
    labels: list[dict[str, str]] = []
    videos: list[str] = []
    clips: list[np.ndarray] = []

    def flush() -> None:
        for name, m in models.items():
            feats[name].append(embed_clips(m, cfg, clips))
        clips.clear()

    for s in iter_samples(store, snapshot, split=split):
        if not s["labels"]:
            continue
        clips.append(centre_window(s["frames"], cfg.frames))
        if teacher_stats:
            mean, std = teacher_stats
            feats["teacher"].append((((s["targets"].astype(np.float32) - mean) / std).mean(0))[None])
        labels.append(dict(s["labels"]))
        videos.append(s["video_sha256"])
        if len(clips) == batch_size:
            flush()
    if clips:
        flush()
    names = sorted(set().union(*labels)) if labels else []
    return EmbeddedSplit({k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in feats.items()},
                         {n: [row.get(n, "") for row in labels] for n in names}, videos)


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_accuracy(bank: np.ndarray, bank_y: list[str], query: np.ndarray, query_y: list[str], k: int = 5) -> float:
    """Cosine kNN with similarity-weighted votes, on features standardised with the bank's statistics (so a
    few high-variance dimensions do not decide every neighbour; the same for every model compared)."""
    if not len(query) or not len(bank):
        return float("nan")
    mu, sd = bank.mean(0), bank.std(0) + 1e-6
    sims = _l2n((query - mu) / sd) @ _l2n((bank - mu) / sd).T
    k = min(k, len(bank))
    nn_idx = np.argsort(-sims, axis=1)[:, :k]
    correct = 0
    for i, row in enumerate(nn_idx):
        votes: dict[str, float] = {}
        for j in row:
            votes[bank_y[j]] = votes.get(bank_y[j], 0.0) + float(sims[i, j]) + 1.0
        correct += max(votes, key=votes.get) == query_y[i]
    return correct / len(query)


def linear_probe_accuracy(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str],
                          *, steps: int = 300, weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    classes = sorted(set(train_y))
    if len(classes) < 2 or not len(test_x):
        return float("nan")
    idx = {c: i for i, c in enumerate(classes)}
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = torch.tensor((train_x - mu) / sd, dtype=torch.float32)
    xte = torch.tensor((test_x - mu) / sd, dtype=torch.float32)
    ytr = torch.tensor([idx[y] for y in train_y])
    torch.manual_seed(seed)
    lin = torch.nn.Linear(xtr.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    pred = lin(xte).argmax(1).tolist()
    return float(np.mean([classes[p] == y for p, y in zip(pred, test_y)]))


class KnnProbe:
    """Held-out kNN accuracy of a student during training; streams both splits at each call."""

    def __init__(self, store: FeatureStore, key: str, *, heldout_fraction: float, version: int | None = None,
                 k: int = 5):
        self.store, self.snapshot, self.k = store, store.open(key, version), k
        self.fraction = heldout_fraction

    def __call__(self, student: torch.nn.Module, cfg: StudentConfig) -> dict[str, float]:
        was_training = student.training
        train = embed_split(self.store, self.snapshot, SplitFilter("train", self.fraction), {"s": student}, cfg)
        test = embed_split(self.store, self.snapshot, SplitFilter("heldout", self.fraction), {"s": student}, cfg)
        student.train(was_training)
        if not test.labels:
            return {}
        out = {f"knn_{n}": knn_accuracy(train.feats["s"], train.labels[n], test.feats["s"], test.labels[n], self.k)
               for n in sorted(test.labels)}
        out["knn_mean"] = float(np.mean(list(out.values())))
        return out


@dataclass
class EvalTarget:
    """What an evaluation reads: resolved from the checkpoint's lineage, with optional overrides."""

    root: str
    key: str
    version: int | None
    heldout_fraction: float


def eval_target(lineage: RunLineage, root: str | None, key: str | None, heldout_fraction: float | None,
                storage_options: dict[str, Any]) -> tuple[EvalTarget, Any]:
    """The store, KEY snapshot and split to evaluate on; refuses the run's snapshot if its manifest changed."""
    store = FeatureStore(root or lineage.store, storage_options)
    same_key = (key or lineage.key) == lineage.key
    snap = store.open(lineage.key, lineage.version) if same_key else store.open(key)
    if same_key and snap.manifest_sha256 != lineage.manifest_sha256:
        raise ValueError(f"snapshot {lineage.version} of {lineage.key} in {store.root} is not the one the student "
                         "was trained on (its manifest hash changed): refusing to evaluate on it")
    fraction = lineage.heldout_fraction if heldout_fraction is None else heldout_fraction
    return EvalTarget(store.root, snap.key, snap.version, fraction), (store, snap)


def evaluate(checkpoint: str, root: str | None = None, key: str | None = None, *,
             storage_options: dict[str, Any] | None = None, k: int = 5, heldout_fraction: float | None = None,
             seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """kNN / linear-probe accuracy of the checkpoint's student on the held-out split of its own run (store,
    KEY snapshot and held-out fraction from the checkpoint), unless overridden."""
    from training.export import load_exported
    from training.locate import open_checkpoint

    opts = storage_options or {}
    with open_checkpoint(checkpoint, opts) as (folder, where):
        lineage = read_lineage(folder)
        student = load_exported(os.path.join(folder, EXPORT_DIR))
    cfg = student.student_config
    target, (store, snap) = eval_target(lineage, root, key, heldout_fraction, opts)
    torch.manual_seed(seed)
    models = {"student": student.encoder, "random_student": build_student(cfg)}
    stats = snap.target_mean_std()
    splits = {name: embed_split(store, snap, SplitFilter(name, target.heldout_fraction), models, cfg,
                                teacher_stats=stats, batch_size=batch_size) for name in ("train", "heldout")}
    train, test = splits["train"], splits["heldout"]
    if not test.labels or not test.n:
        raise ValueError(f"KEY {target.key} has no labelled held-out samples at held-out fraction "
                         f"{target.heldout_fraction}")
    per_label = {name: _label_scores(train, test, name, k) for name in sorted(test.labels)}

    def mean_of(field: str) -> float:
        return float(np.mean([r[field] for r in per_label.values()]))

    return {
        "checkpoint": where, "store": target.root, "key": target.key, "version": target.version,
        "heldout_fraction": target.heldout_fraction, "n": test.n, "n_train": train.n,
        "heldout_videos": len(set(test.videos)), "k": k,
        **{f"{who}_{probe}": mean_of(f"{who}_{probe}") for who in ("student", "teacher", "random_student")
           for probe in ("knn", "linear")},
        "per_label": per_label,
    }


def _label_scores(train: EmbeddedSplit, test: EmbeddedSplit, name: str, k: int) -> dict[str, float]:
    row = {}
    for who in ("student", "random_student", "teacher"):
        xtr, xte = train.feats[who], test.feats[who]
        row[f"{who}_knn"] = knn_accuracy(xtr, train.labels[name], xte, test.labels[name], k)
        row[f"{who}_linear"] = linear_probe_accuracy(xtr, train.labels[name], xte, test.labels[name])
    values = test.labels[name]
    row["chance"] = max(values.count(c) for c in set(values)) / len(values)
    return row
