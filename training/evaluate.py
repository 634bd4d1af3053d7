"""What training bought: kNN and linear-probe accuracy on held-out labelled samples.

The bank (kNN neighbours, probe training data) is the labelled training split; queries are the held-out
split (by video content hash, so a video's segments never straddle the two). Three embeddings are compared:
the trained student, a randomly initialised student of the same config, and the teacher's frame-averaged
cached targets (standardised with the KEY's statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feature_store.reader import SplitFilter, iter_samples
from feature_store.store import FeatureStore
from training.models import StudentConfig, build_student, load_student, video_to_input


@dataclass
class LabelledSet:
    student_inputs: list[np.ndarray]  # uint8 [L, S, S, 3] central windows
    teacher: np.ndarray  # [N, D] frame-averaged standardised targets
    labels: dict[str, list[str]]
    videos: list[str]


def load_split(store: FeatureStore, key: str, split: str, *, frames: int, heldout_fraction: float,
               version: int | None = None) -> LabelledSet:
    snap = store.open(key, version)
    mean, std = snap.target_mean_std()
    inputs, teach, vids = [], [], []
    labels: dict[str, list[str]] = {}
    samples = [s for s in iter_samples(store, snap, split=SplitFilter(split, heldout_fraction)) if s["labels"]]
    names = sorted(set().union(*(s["labels"] for s in samples))) if samples else []
    for s in samples:
        t = s["frames"].shape[0]
        start = max((t - frames) // 2, 0)
        inputs.append(s["frames"][start:start + frames])
        teach.append(((s["targets"].astype(np.float32) - mean) / std).mean(0))
        vids.append(s["video_sha256"])
        for n in names:
            labels.setdefault(n, []).append(s["labels"].get(n, ""))
    dim = len(mean)
    return LabelledSet(inputs, np.stack(teach) if teach else np.zeros((0, dim), np.float32), labels, vids)


@torch.no_grad()
def embed_clips(model: torch.nn.Module, cfg: StudentConfig, clips: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(clips), batch_size):
        x = torch.from_numpy(np.stack(clips[i:i + batch_size]))
        out.append(model(video_to_input(x, cfg)).clip.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, getattr(model, "embed_dim", 0)), np.float32)


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
    """Held-out kNN accuracy of a student during training: the labelled splits are loaded once."""

    def __init__(self, store: FeatureStore, key: str, *, frames: int, heldout_fraction: float,
                 version: int | None = None, k: int = 5):
        self.train = load_split(store, key, "train", frames=frames, heldout_fraction=heldout_fraction, version=version)
        self.test = load_split(store, key, "heldout", frames=frames, heldout_fraction=heldout_fraction, version=version)
        self.k = k

    def __call__(self, student: torch.nn.Module, cfg: StudentConfig) -> dict[str, float]:
        if not self.test.labels:
            return {}
        was_training = student.training
        xtr = embed_clips(student, cfg, self.train.student_inputs)
        xte = embed_clips(student, cfg, self.test.student_inputs)
        student.train(was_training)
        out = {f"knn_{n}": knn_accuracy(xtr, self.train.labels[n], xte, self.test.labels[n], self.k)
               for n in sorted(self.test.labels)}
        out["knn_mean"] = float(np.mean(list(out.values())))
        return out


def evaluate(checkpoint: str, root: str, key: str, *, storage_options: dict[str, Any] | None = None, k: int = 5,
             heldout_fraction: float = 0.2, version: int | None = None, seed: int = 0) -> dict[str, Any]:
    import os

    from training.loop import EXPORT_DIR

    export = os.path.join(checkpoint, EXPORT_DIR) if os.path.isdir(os.path.join(checkpoint, EXPORT_DIR)) else checkpoint
    student, cfg = load_student(export)
    torch.manual_seed(seed)
    random_student = build_student(cfg)
    store = FeatureStore(root, storage_options)
    train = load_split(store, key, "train", frames=cfg.frames, heldout_fraction=heldout_fraction, version=version)
    test = load_split(store, key, "heldout", frames=cfg.frames, heldout_fraction=heldout_fraction, version=version)
    if not test.labels or not len(test.teacher):
        raise ValueError(f"KEY {key} has no labelled held-out samples to evaluate on")
    feats = {
        "student": (embed_clips(student, cfg, train.student_inputs), embed_clips(student, cfg, test.student_inputs)),
        "random_student": (embed_clips(random_student, cfg, train.student_inputs),
                           embed_clips(random_student, cfg, test.student_inputs)),
        "teacher": (train.teacher, test.teacher),
    }
    per_label: dict[str, dict[str, float]] = {}
    for name in sorted(test.labels):
        row = {}
        for who, (xtr, xte) in feats.items():
            row[f"{who}_knn"] = knn_accuracy(xtr, train.labels[name], xte, test.labels[name], k)
            row[f"{who}_linear"] = linear_probe_accuracy(xtr, train.labels[name], xte, test.labels[name])
        row["chance"] = max(test.labels[name].count(c) for c in set(test.labels[name])) / len(test.labels[name])
        per_label[name] = row

    def mean_of(field: str) -> float:
        return float(np.mean([r[field] for r in per_label.values()]))

    return {
        "checkpoint": checkpoint, "key": key, "n": len(test.teacher), "n_train": len(train.teacher),
        "heldout_videos": len(set(test.videos)), "k": k,
        "student_knn": mean_of("student_knn"), "teacher_knn": mean_of("teacher_knn"),
        "random_student_knn": mean_of("random_student_knn"),
        "student_linear": mean_of("student_linear"), "teacher_linear": mean_of("teacher_linear"),
        "random_student_linear": mean_of("random_student_linear"),
        "per_label": per_label,
    }
