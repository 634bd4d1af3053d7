"""One configuration of the learning benchmark trained and evaluated in-process, with the product's parts.

Training is `training.loop.train_step` (windows, augmentation, model, objective, optimiser, schedule, BYOL's
EMA with its cosine momentum) fed from the KEY held in memory instead of the shard loader; evaluation is
`training.evaluate`'s kNN and linear probe on the product's centre-window clip embeddings. Compute is counted
with `torch.utils.flop_counter` on one training step (forward and backward; BYOL's includes the target
network's forward), times the steps; an iBoot run adds the teacher's extraction forward passes once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from benchmarks.learning_data import LearningData
from training.config import TrainConfig
from training.data import Batch, DataPosition, resize_frames
from training.evaluate import centre_window, embed_clips, knn_accuracy, linear_probe_accuracy
from training.loop import DataSource, WorkerEnv, build_parts, build_targets, step_loss, train_step
from training.models import build_student
from training.objective import LossWeights


@dataclass(frozen=True)
class Variant:
    """One trained configuration: the objective and the switches the ablations turn one at a time."""

    name: str
    objective: str = "iboot"
    cross: float = 1.0
    frame: float = 0.0
    coord: bool = False
    derivative: bool = False
    offset: bool = False
    brightness: float = 0.0


# The ablation ladder, one switch at a time from the iBoot core; the last is the demo's config before
# this benchmark (LossWeights(cross=0.2, frame=1.0), CoordConv, derivative readout, offset conditioning).
LADDER: tuple[Variant, ...] = (
    Variant("core: cross-view only", cross=1.0, frame=0.0),
    Variant("+ frame term", cross=0.2, frame=1.0),
    Variant("+ CoordConv", cross=0.2, frame=1.0, coord=True),
    Variant("+ derivative readout", cross=0.2, frame=1.0, coord=True, derivative=True),
    Variant("+ offset conditioning", cross=0.2, frame=1.0, coord=True, derivative=True, offset=True),
)
# The video-only baseline: the same student (CoordConv, derivative readout), BYOL's EMA target (0.996 -> 1,
# cosine), BYOL's brightness jitter (0.4; hue, flips, rotations and crops would change labels, see method.md).
BYOL = Variant("BYOL (video only)", objective="byol", coord=True, derivative=True, brightness=0.4)


def train_config(base: TrainConfig, v: Variant, *, seed: int, steps: int, lr: float, batch_size: int,
                 warmup_steps: int) -> TrainConfig:
    return dataclasses.replace(
        base, objective=v.objective, steps=steps, workers=1, seed=seed, eval_every=0, offset_conditioning=v.offset,
        loss=LossWeights(cross=v.cross, frame=v.frame),
        student=dataclasses.replace(base.student, coord_channels=v.coord, temporal_derivative=v.derivative),
        optim=dataclasses.replace(base.optim, lr=lr, warmup_steps=warmup_steps),
        data=dataclasses.replace(base.data, batch_size=batch_size),
        augment=dataclasses.replace(base.augment, brightness=v.brightness))


def data_source(data: LearningData) -> DataSource:
    return DataSource(root=data.root, key=data.key, version=data.version, target_mean=data.target_mean.tolist(),
                      target_std=data.target_std.tolist(), image_size=data.frames.shape[2],
                      segment_frames=data.frames.shape[1], embed_dim=data.targets.shape[2])


def memory_batches(data: LearningData, cfg: TrainConfig) -> Iterator[Batch]:
    """Endless shuffled batches of the train split (a new permutation per epoch, seeded by the run's seed)."""
    idx, b = data.index("train"), cfg.data.batch_size
    epoch = 0
    while True:
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed * 7_919 + epoch)).numpy()
        for i in range(0, len(perm) - b + 1, b):
            rows = np.sort(idx[perm[i:i + b]])
            yield Batch(resize_frames(torch.from_numpy(data.frames[rows]), cfg.student.image_size),
                        torch.from_numpy(data.targets[rows]), None, 0, epoch, i + b)
        epoch += 1


def step_flops(data: LearningData, cfg: TrainConfig) -> float:
    """FLOPs of one training step (forward + backward of one batch) on a fresh copy of the model."""
    from torch.utils.flop_counter import FlopCounterMode

    src, env = data_source(data), WorkerEnv()
    parts, targets = build_parts(cfg, src, env), build_targets(cfg, src, env)
    batch = next(memory_batches(data, cfg))
    with FlopCounterMode(display=False) as counter:
        loss, _ = step_loss(parts.model, cfg, batch.frames, batch.targets, None, torch.Generator().manual_seed(0),
                            device=env.device, mean=targets.mean, std=targets.std)
        loss.backward()
    return float(counter.get_total_flops())


class Probe:
    """The product's evaluation on the in-memory KEY: centre-window clips embedded by a model, kNN against
    the train split's labelled bank, a linear probe trained on it."""

    def __init__(self, data: LearningData, frames: int, k: int = 5):
        self.data, self.k = data, k
        self.clips = np.stack([centre_window(f, frames) for f in data.frames])
        self.splits = {s: data.index(s) for s in ("train", "val", "test")}

    def features(self, model: torch.nn.Module, cfg: Any, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
        was_training = model.training
        model.eval()
        out = {}
        for s in splits:
            rows = self.splits[s]
            out[s] = np.concatenate([embed_clips(model, cfg, list(self.clips[rows[i:i + 64]]))
                                     for i in range(0, len(rows), 64)])
        model.train(was_training)
        return out

    def scores(self, feats: dict[str, np.ndarray], split: str, linear: bool) -> dict[str, dict[str, float]]:
        """{label: {knn, linear?}} of `split` against the train bank."""
        tr, q = self.splits["train"], self.splits[split]
        out = {}
        for name, values in self.data.labels.items():
            ytr, yq = [values[i] for i in tr], [values[i] for i in q]
            row = {"knn": knn_accuracy(feats["train"], ytr, feats[split], yq, self.k)}
            if linear:
                row["linear"] = linear_probe_accuracy(feats["train"], ytr, feats[split], yq)
            out[name] = row
        return out

    def final(self, feats: dict[str, np.ndarray]) -> dict[str, Any]:
        return {s: self.scores(feats, s, linear=True) for s in ("val", "test")}


def train_and_evaluate(data: LearningData, probe: Probe, cfg: TrainConfig, eval_every: int,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """Train `cfg.steps` steps with `train_step`; validation kNN every `eval_every` steps (and at step 0);
    val and test kNN / linear probe at the end."""
    from training.runparts import Progress, StepTimer

    src, env = data_source(data), WorkerEnv()
    parts, targets = build_parts(cfg, src, env), build_targets(cfg, src, env)
    progress, timer = Progress(step=0, position=DataPosition.start(1)), StepTimer(cfg.data.batch_size)
    batches = memory_batches(data, cfg)
    student = parts.module.student_module
    curve: dict[str, list] = {"step": [], **{n: [] for n in data.labels}}

    def record() -> None:
        scores = probe.scores(probe.features(student, cfg.student, ("train", "val")), "val", linear=False)
        curve["step"].append(progress.step)
        for n, r in scores.items():
            curve[n].append(r["knn"])

    t0 = time.perf_counter()
    record()
    while progress.step < cfg.steps:
        progress.record(train_step(parts, cfg, batches, progress, targets, env, timer))
        if progress.step % eval_every == 0 or progress.step == cfg.steps:
            record()
    final = probe.final(probe.features(student, cfg.student, ("train", "val", "test")))
    wall = time.perf_counter() - t0
    log(f"  seed {cfg.seed}: loss {progress.history[0]:.3f} -> {progress.history[-1]:.3f}, val kNN "
        + ", ".join(f"{n} {curve[n][-1]:.2f}" for n in data.labels) + f" ({wall:.0f} s)")
    return {"curve": curve, "final": final, "loss_first": progress.history[0], "loss_last": progress.history[-1],
            "wall_s": wall}


def random_init_scores(data: LearningData, probe: Probe, cfg: TrainConfig) -> dict[str, Any]:
    """The same architecture, untrained (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.student)
    return probe.final(probe.features(model, cfg.student, ("train", "val", "test")))


def teacher_scores(data: LearningData, probe: Probe, frames: int, kind: str) -> dict[str, Any]:
    """The teacher's standardised frame embeddings of the same centre window, read out as `kind`."""
    from training.evaluate import teacher_readout

    targets = (data.targets - data.target_mean) / data.target_std
    window = np.stack([centre_window(t, frames) for t in targets]).astype(np.float32)
    feats = {s: teacher_readout(window[rows], kind) for s, rows in probe.splits.items()}
    return probe.final(feats)
