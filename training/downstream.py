"""The downstream protocol: a trained student on a labelled video folder with a train/test split.

The folder is extracted into a KEY like any other (`subsume extract --videos manifest.csv`, the manifest
carrying a class label and a `split` column: pipeline/manifests.py writes one from UCF101/HMDB51's official
split files or adds a holdout split to any manifest). Then, on the KEY's samples (stored segments):

- **linear**: the student is frozen; a multinomial logistic regression (standardised features, L-BFGS) is
  fitted on the clip embeddings of the train split;
- **finetune**: the student and a linear head are trained end to end (AdamW, cosine schedule, one random
  window per stored segment per epoch, encoder at a lower learning rate than the head).

Testing is multi-clip: every test segment gives `clips_per_segment` evenly spaced windows of the student's
clip length; clip accuracy scores each window's logits, video accuracy scores the mean of a test video's
clip logits over all its windows of all its segments (`video_logits`). Beside the student, the teacher's
own readout is scored with the same linear protocol (its cached frame embeddings, standardised with the
KEY's statistics and averaged over each window): the baseline extraction gives for free.

Samples are streamed from the store a batch at a time; memory holds embeddings and logits, never the frames.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from feature_store.reader import iter_samples
from feature_store.store import FeatureStore
from training.data import resize_frames
from training.models import StudentConfig, video_to_input

PROTOCOLS = ("linear", "finetune")


class DownstreamError(ValueError):
    """A KEY, label or setting that the protocol cannot run on; the message says what to do."""


@dataclass
class DownstreamConfig:
    """Typed settings of one downstream run (validated by pydantic in `downstream_config`)."""

    __pydantic_config__ = {"extra": "forbid"}
    protocol: str = "linear"  # "linear" (frozen student) | "finetune" (student + head trained end to end)
    label: str = "action"  # the manifest column holding the class
    split_column: str = "split"  # the manifest column holding "train" / "test"
    clips_per_segment: int = 2  # evenly spaced windows per stored segment (test; and train for linear)
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"  # "cpu" | "cuda" | "auto"
    linear_max_iter: int = 300  # L-BFGS iterations of the logistic regression
    linear_weight_decay: float = 1e-3
    epochs: int = 10  # finetune
    lr: float = 1e-3  # finetune: the head's learning rate
    encoder_lr: float = 1e-4  # finetune: the student's
    weight_decay: float = 0.05
    dropout: float = 0.0  # before the head (finetune)
    shuffle_buffer: int = 64

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if min(self.clips_per_segment, self.batch_size, self.epochs, self.linear_max_iter) < 1:
            raise ValueError("clips_per_segment, batch_size, epochs and linear_max_iter must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def downstream_config(**fields: Any) -> DownstreamConfig:
    """Validate fields (types and ranges) into a DownstreamConfig; errors name the field."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(DownstreamConfig).validate_python(fields)
    except ValidationError as e:
        raise DownstreamError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}".lstrip(": ")
                                        for x in e.errors())) from None


# ---------------------------------------------------------------------------------------------------------
# What the KEY holds: classes and split sizes, from the index's label column (Arrow, no per-row objects).


@dataclass(frozen=True)
class Vocabulary:
    classes: tuple[str, ...]  # the train split's classes, sorted: class index = position
    train_samples: int
    test_samples: int
    test_only_classes: tuple[str, ...]  # classes seen only in test: their clips are left out (see notes)


def vocabulary(snapshot: Any, label: str, split_column: str) -> Vocabulary:
    import pyarrow.compute as pc

    labels = snapshot.index_columns(["labels"]).column("labels")
    split = pc.fill_null(pc.map_lookup(labels, split_column, "first"), "")
    value = pc.fill_null(pc.map_lookup(labels, label, "first"), "")
    if not pc.any(pc.not_equal(split, "")).as_py():
        raise DownstreamError(f"KEY {snapshot.key} has no {split_column!r} label: extract a manifest with a split "
                              "column (subsume manifest ucf101|hmdb51|holdout ... --out manifest.csv)")
    has = pc.not_equal(value, "")
    train = pc.and_(pc.equal(split, "train"), has)
    test = pc.and_(pc.equal(split, "test"), has)
    classes = tuple(sorted(pc.unique(pc.filter(value, train)).to_pylist()))
    test_classes = set(pc.unique(pc.filter(value, test)).to_pylist())
    n_train, n_test = pc.sum(train).as_py() or 0, pc.sum(test).as_py() or 0
    if len(classes) < 2 or not n_test:
        raise DownstreamError(f"KEY {snapshot.key}: label {label!r} needs >= 2 classes in the train split and a "
                              f"test split (found {len(classes)} classes, {n_train} train and {n_test} test samples)")
    return Vocabulary(classes, n_train, n_test, tuple(sorted(test_classes - set(classes))))


# ---------------------------------------------------------------------------------------------------------
# Clips: windows of the student's length cut from the stored segments of one split.


@dataclass
class ClipSource:
    store: FeatureStore
    snapshot: Any
    cfg: DownstreamConfig
    student: StudentConfig
    classes: tuple[str, ...]
    teacher_mean: np.ndarray
    teacher_std: np.ndarray


@dataclass
class ClipBatch:
    frames: torch.Tensor  # uint8 [B, L, S, S, 3] at the student's input size
    teacher: np.ndarray  # [B, D] the teacher's standardised embeddings averaged over each window
    labels: torch.Tensor  # [B] class index
    videos: list[str]  # video_sha256 of each clip


def window_starts(n_frames: int, length: int, count: int) -> list[int]:
    """`count` evenly spaced window starts over a segment (first and last windows included)."""
    span = max(n_frames - length, 0)
    if count == 1:
        return [span // 2]
    return sorted({int(round(i * span / (count - 1))) for i in range(count)})


def clip_batches(src: ClipSource, split: str, starts: Callable[[int], list[int]], *, epoch: int = 0,
                 shuffle: bool = False) -> Iterator[ClipBatch]:
    """Batches of clips of one split; `starts(n_frames)` picks each segment's windows."""
    cfg, length = src.cfg, src.student.frames
    index = {c: i for i, c in enumerate(src.classes)}
    frames: list[np.ndarray] = []
    rows: list[tuple[np.ndarray, int, str]] = []
    for s in iter_samples(src.store, src.snapshot, epoch=epoch, seed=cfg.seed,
                          shuffle_buffer=cfg.shuffle_buffer if shuffle else 0):
        labels = s["labels"]
        if labels.get(cfg.split_column) != split or labels.get(cfg.label) not in index:
            continue
        targets = (s["targets"].astype(np.float32) - src.teacher_mean) / src.teacher_std
        for st in starts(s["frames"].shape[0]):
            frames.append(s["frames"][st:st + length])
            rows.append((targets[st:st + length].mean(0), index[labels[cfg.label]], s["video_sha256"]))
            if len(frames) == cfg.batch_size:
                yield _batch(frames, rows, src.student)
                frames, rows = [], []
    if frames:
        yield _batch(frames, rows, src.student)


def _batch(frames: list[np.ndarray], rows: list[tuple[np.ndarray, int, str]], student: StudentConfig) -> ClipBatch:
    x = resize_frames(torch.from_numpy(np.stack(frames)), student.image_size)
    return ClipBatch(x, np.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), [r[2] for r in rows])


# ---------------------------------------------------------------------------------------------------------
# Scores: clip- and video-level accuracy from clip logits.


def video_logits(clip_logits: np.ndarray, videos: list[str]) -> tuple[list[str], np.ndarray]:
    """Multi-clip testing: each video's logits are the mean of its clips' logits. Returns (videos, [V, C])."""
    ids, inverse = np.unique(np.asarray(videos), return_inverse=True)
    sums = np.zeros((len(ids), clip_logits.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, clip_logits)
    counts = np.bincount(inverse, minlength=len(ids))[:, None]
    return ids.tolist(), sums / counts


@dataclass
class Scores:
    """Test predictions of one model: per clip, then per video (mean of its clip logits)."""

    clip_logits: np.ndarray  # [N, C]
    clip_labels: np.ndarray  # [N]
    clip_videos: list[str]
    videos: list[str] = field(default_factory=list)
    video_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    video_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        self.videos, self.video_logits = video_logits(self.clip_logits, self.clip_videos)
        first = {v: int(y) for v, y in zip(reversed(self.clip_videos), reversed(self.clip_labels.tolist()))}
        self.video_labels = np.array([first[v] for v in self.videos], dtype=np.int64)

    def summary(self) -> dict[str, float]:
        return {"clip_accuracy": float(np.mean(self.clip_logits.argmax(1) == self.clip_labels)),
                "video_accuracy": float(np.mean(self.video_logits.argmax(1) == self.video_labels))}


# ---------------------------------------------------------------------------------------------------------
# The linear protocol.


@torch.no_grad()
def embed_clips(src: ClipSource, split: str, encoder: nn.Module | None, device: torch.device
                ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Every window of every segment of a split -> ({"student": [N, E], "teacher": [N, D]}, labels, videos).
    With no encoder, only the teacher's features."""
    if encoder is not None:
        encoder.eval()
    feats: dict[str, list[np.ndarray]] = {"student": [], "teacher": []}
    labels: list[torch.Tensor] = []
    videos: list[str] = []
    starts = lambda n: window_starts(n, src.student.frames, src.cfg.clips_per_segment)  # noqa: E731
    for b in clip_batches(src, split, starts):
        if encoder is not None:
            x = video_to_input(b.frames.to(device), src.student)
            feats["student"].append(encoder(x).clip.float().cpu().numpy())
        feats["teacher"].append(b.teacher)
        labels.append(b.labels)
        videos.extend(b.videos)
    out = {k: np.concatenate(v) for k, v in feats.items() if v}
    return out, torch.cat(labels).numpy() if labels else np.zeros(0, np.int64), videos


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: DownstreamConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression on features standardised with the train split's statistics (full-batch
    L-BFGS, L2 penalty). Returns features -> logits."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    torch.manual_seed(cfg.seed)
    lin = nn.Linear(xt.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=cfg.linear_max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xt), yt) + cfg.linear_weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    @torch.no_grad()
    def predict(features: np.ndarray) -> np.ndarray:
        return lin(torch.tensor((features - mu) / sd, dtype=torch.float32)).numpy()

    return predict


def linear_scores(src: ClipSource, encoder: nn.Module | None, device: torch.device) -> dict[str, Scores]:
    """Linear probes on the train split's clips, scored on the test split's: per model (student, teacher)."""
    train_x, train_y, _ = embed_clips(src, "train", encoder, device)
    test_x, test_y, test_v = embed_clips(src, "test", encoder, device)
    out = {}
    for name in train_x:
        predict = fit_linear(train_x[name], train_y, len(src.classes), src.cfg)
        out[name] = Scores(predict(test_x[name]), test_y, test_v)
    return out


# ---------------------------------------------------------------------------------------------------------
# The finetune protocol.


class Classifier(nn.Module):
    """The student's clip embedding -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(encoder.embed_dim), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x).clip))


def _optimizer(model: Classifier, cfg: DownstreamConfig, total_steps: int):
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": cfg.encoder_lr},
                             {"params": model.head.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / total_steps, 1))))
    return opt, sched


def finetune(src: ClipSource, encoder: nn.Module, train_samples: int, device: torch.device,
             log: Callable[[str], None] = lambda m: None) -> Classifier:
    """Train student + head on one random window per train segment per epoch; returns the classifier."""
    cfg = src.cfg
    torch.manual_seed(cfg.seed)
    model = Classifier(encoder, len(src.classes), cfg.dropout).to(device)
    opt, sched = _optimizer(model, cfg, cfg.epochs * max(1, math.ceil(train_samples / cfg.batch_size)))
    gen = torch.Generator().manual_seed(cfg.seed)
    length = src.student.frames

    def random_start(n: int) -> list[int]:
        return [int(torch.randint(0, max(n - length, 0) + 1, (1,), generator=gen))]

    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        for b in clip_batches(src, "train", random_start, epoch=epoch, shuffle=True):
            loss = nn.functional.cross_entropy(model(video_to_input(b.frames.to(device), src.student)),
                                               b.labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        log(f"finetune epoch {epoch + 1}/{cfg.epochs}: loss {np.mean(losses):.4f}")
    return model


@torch.no_grad()
def classifier_scores(src: ClipSource, model: Classifier, device: torch.device) -> Scores:
    model.eval()
    logits, labels, videos = [], [], []
    starts = lambda n: window_starts(n, src.student.frames, src.cfg.clips_per_segment)  # noqa: E731
    for b in clip_batches(src, "test", starts):
        logits.append(model(video_to_input(b.frames.to(device), src.student)).float().cpu().numpy())
        labels.append(b.labels.numpy())
        videos.extend(b.videos)
    return Scores(np.concatenate(logits), np.concatenate(labels), videos)


# ---------------------------------------------------------------------------------------------------------
# The driver.


@dataclass
class DownstreamResult:
    summary: dict[str, Any]  # what `subsume downstream --json` prints
    scores: dict[str, Scores]  # "student", "teacher": the test predictions behind the summary
    model: nn.Module | None = None  # finetune: the trained classifier (student + head)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _open(checkpoint: str, root: str | None, key: str, storage_options: dict[str, Any]):
    from training.checkpoint import EXPORT_DIR, read_lineage
    from training.export import load_exported
    from training.locate import open_checkpoint

    with open_checkpoint(checkpoint, storage_options) as (folder, where):
        lineage = read_lineage(folder)
        student = load_exported(os.path.join(folder, EXPORT_DIR))
    store = FeatureStore(root or lineage.store, storage_options)
    return student, store, store.open(key), where


def _notes(student: Any, snapshot: Any, vocab: Vocabulary) -> list[str]:
    notes = []
    fps, seg = snapshot.spec.sampling.fps, snapshot.spec.sampling.segment_frames
    trained_fps = student.sampling.get("fps")
    if trained_fps and fps != trained_fps:
        notes.append(f"the student was trained on frames sampled at {trained_fps} fps, this KEY has {fps}: "
                     "extract the labelled folder with the same --fps for a like-for-like clip")
    if seg < student.student_config.frames:
        notes.append(f"segments of {seg} frames are shorter than the student's clip ({student.student_config.frames})")
    if vocab.test_only_classes:
        notes.append(f"test classes absent from the train split are left out: {list(vocab.test_only_classes)}")
    return notes


def run_downstream(checkpoint: str, key: str, cfg: DownstreamConfig, *, root: str | None = None,
                   storage_options: dict[str, Any] | None = None,
                   log: Callable[[str], None] = lambda m: None) -> DownstreamResult:
    """Linear probe or finetune of the checkpoint's student on KEY's train split; multi-clip test accuracy."""
    student, store, snap, where = _open(checkpoint, root, key, storage_options or {})
    vocab = vocabulary(snap, cfg.label, cfg.split_column)
    if snap.spec.sampling.segment_frames < student.student_config.frames:
        raise DownstreamError(f"KEY {key} has segments of {snap.spec.sampling.segment_frames} frames, the student "
                              f"takes clips of {student.student_config.frames}: extract with --segment-frames >= it")
    mean, std = snap.target_mean_std()
    src = ClipSource(store, snap, cfg, student.student_config, vocab.classes, mean.astype(np.float32),
                     std.astype(np.float32))
    device = _device(cfg.device)
    encoder = student.encoder.to(device)
    model = None
    if cfg.protocol == "linear":
        scores = linear_scores(src, encoder, device)
    else:
        scores = {"teacher": linear_scores(src, None, device)["teacher"]}
        model = finetune(src, encoder, vocab.train_samples, device, log)
        scores["student"] = classifier_scores(src, model, device)
    return DownstreamResult(_summary(cfg, where, snap, vocab, scores, _notes(student, snap, vocab)), scores, model)


def _summary(cfg: DownstreamConfig, where: str, snap: Any, vocab: Vocabulary, scores: dict[str, Scores],
             notes: list[str]) -> dict[str, Any]:
    test = scores["student"]
    counts = np.bincount(test.video_labels, minlength=len(vocab.classes))
    return {
        "checkpoint": where, "store": snap.store.root, "key": snap.key, "version": snap.version,
        "protocol": cfg.protocol, "label": cfg.label, "classes": len(vocab.classes), "class_names": list(vocab.classes),
        "train_samples": vocab.train_samples, "test_samples": vocab.test_samples,
        "test_clips": len(test.clip_videos), "test_videos": len(test.videos),
        "clips_per_segment": cfg.clips_per_segment,
        "student": test.summary(),
        "teacher_linear": scores["teacher"].summary(),
        "chance_video": float(counts.max() / max(counts.sum(), 1)),
        "config": dataclasses.asdict(cfg), "notes": notes,
    }
