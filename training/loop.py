"""One readable training loop, the same in-process (tests, one CPU) and on each Ray Train worker.

What differs between the two is passed in as a `WorkerEnv` (rank, device, how to wrap the model for DDP,
how to report and checkpoint), so this module imports no Ray. `train_worker` is a short loop over small
builders: the parts (model, optimiser, schedule, scaler), the data loader (training/data.py), the
checkpointer (training/checkpoint.py) and the metrics writer (training/metrics.py). It logs the time spent
waiting for data apart from step time, samples/s and the data-wait fraction; checkpoints hold everything
needed to continue bit-for-bit on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from feature_store.reader import iter_samples
from feature_store.store import FeatureStore
from training.augment import augment_views, crops_enabled, grid_mean_targets
from training.config import TrainConfig
from training.data import sample_patches
from training.models import build_student, video_to_input
from training.objective import BYOLBaseline, IBootHead, iboot_loss, normalize_targets


@dataclass
class DataSource:
    """Which cached targets to train on: one immutable snapshot of a KEY."""

    root: str
    key: str
    version: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    teacher_model: str = ""  # for online targets
    teacher_revision: str | None = None
    teacher_fingerprint: str = ""
    teacher_precision: str = "fp32"
    image_size: int = 0  # the KEY's stored frame size (the student's may differ: frames are resized)
    segment_frames: int = 0
    embed_dim: int = 0  # the dimension of the targets the run trains on (the patch dim when it crops)
    target_space: str = "embeds"  # "embeds" (cached embeddings) | "patch_mean" (means of stored patch grids)
    lineage: dict[str, Any] = field(default_factory=dict)  # training.checkpoint.RunLineage, as a dict


@dataclass
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m
    report: Callable[[dict[str, Any], str | None], None] = lambda metrics, ckpt: None
    restore_dir: str | None = None  # a checkpoint folder to continue from
    out_dir: str | None = None  # where rank 0 writes metrics.jsonl and the report_to sinks' logs
    callbacks: list[Any] = field(default_factory=list)  # training.callbacks.TrainCallback objects


class ObjectiveModule(nn.Module):
    """Student + heads as one module, so DDP wraps (and all-reduces) a single thing."""

    def __init__(self, cfg: TrainConfig, target_dim: int):
        super().__init__()
        self.objective = cfg.objective
        student = build_student(cfg.student)
        if cfg.objective == "iboot":
            self.student = student
            self.head = IBootHead(student.embed_dim, target_dim, offset_conditioning=cfg.offset_conditioning)
            self.weights = cfg.loss
        elif cfg.objective == "byol":
            self.byol = BYOLBaseline(student)
        else:
            raise ValueError(f"unknown objective {cfg.objective!r} (iboot | byol)")

    @property
    def student_module(self) -> nn.Module:
        return self.student if self.objective == "iboot" else self.byol.student

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None,
                offset: torch.Tensor | None = None):
        if self.objective == "iboot":
            return iboot_loss(self.student, self.head, v1, v2, t1, t2, self.weights, offset=offset)
        return self.byol(v1, v2)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm, total, floor = cfg.optim.warmup_steps, max(cfg.steps, 1), cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_views(frames: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, gen: torch.Generator,
               patches: torch.Tensor | None = None):
    """Two temporal windows per sample: their frames, exactly their cached targets, and (when given) their
    patch grids. Returns ([(frames, targets, patches | None)] * 2, offset)."""
    b, t = frames.shape[:2]
    length = min(cfg.student.frames, t)
    span = t - length
    if cfg.augment.temporal_jitter and span > 0:
        starts = torch.randint(0, span + 1, (2, b), generator=gen)
    else:
        starts = torch.tensor([[0] * b, [span] * b])
    idx = starts[..., None] + torch.arange(length)  # [2, B, L]
    rows = torch.arange(b)[:, None]
    views = [(frames[rows, idx[k]], targets[rows, idx[k]], None if patches is None else patches[rows, idx[k]])
             for k in range(2)]
    offset = (starts[1] - starts[0]).float() / length  # where view 2 is relative to view 1, in window lengths
    return views, offset


def patch_mean_stats(store: FeatureStore, key: str, version: int, limit: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of uncropped patch-grid means over the first `limit` samples of a snapshot:
    what a cropping run standardises its targets with (the manifest's stats are of the embeddings)."""
    snapshot = store.open(key, version)
    rows: list[np.ndarray] = []
    for s in iter_samples(store, snapshot):
        rows.append(grid_mean_targets(torch.from_numpy(sample_patches(s))).numpy())
        if len(rows) >= limit:
            break
    x = np.concatenate(rows).astype(np.float64)
    return x.mean(0), np.maximum(x.std(0), 1e-6)


def online_targets(teacher: Any, view_frames: torch.Tensor) -> torch.Tensor:
    """The teacher on one view's stored frames [B, L, S, S, 3] -> targets [B, L, D] (`targets: online`)."""
    return teacher.embed(view_frames.reshape(-1, *view_frames.shape[2:])).embeds.reshape(*view_frames.shape[:2], -1)


def step_loss(model: nn.Module, cfg: TrainConfig, frames: torch.Tensor, targets: torch.Tensor,
              patches: torch.Tensor | None, gen: torch.Generator, *, device: torch.device, mean: torch.Tensor,
              std: torch.Tensor, teacher: Any = None, amp_dtype: torch.dtype | None = None):
    """The loss of one micro-batch, as collated: two temporal views, their augmentation (brightness; crops
    with targets pooled from the patch grid under the box), their targets (cached, or the teacher on the
    views' frames), standardised, and the objective's forward. Returns (loss tensor, float terms).
    The training loop and the cached-vs-online benchmark both call this, so they measure the same work."""
    ((f1, y1, p1), (f2, y2, p2)), offset = make_views(frames, targets, cfg, gen, patches)
    if cfg.augment.brightness > 0 or crops_enabled(cfg.augment):  # see docs/method.md: what keeps targets valid
        f1, y1 = augment_views(f1, y1, p1, cfg.augment, gen)
        f2, y2 = augment_views(f2, y2, p2, cfg.augment, gen)
    v1 = video_to_input(f1.to(device), cfg.student)
    v2 = video_to_input(f2.to(device), cfg.student)
    t1 = t2 = None
    if cfg.objective == "iboot":
        if teacher is not None:
            y1, y2 = online_targets(teacher, f1), online_targets(teacher, f2)
        t1 = normalize_targets(y1.to(device), mean, std)
        t2 = normalize_targets(y2.to(device), mean, std)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(v1, v2, t1, t2, offset.to(device))




# ---------------------------------------------------------------------------------------------------------
# Builders: each makes one part of a run; train_worker below strings them together.


@dataclass
class Parts:
    """What an optimizer step touches."""

    module: ObjectiveModule  # unwrapped: what is saved
    model: nn.Module  # wrapped for DDP: what is called
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def build_parts(cfg: TrainConfig, src: DataSource, env: WorkerEnv) -> Parts:
    """Model (the same initial weights on every rank), AdamW, warm-up + cosine schedule, grad scaler."""
    torch.manual_seed(cfg.seed)
    module = ObjectiveModule(cfg, target_dim=src.embed_dim).to(env.device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16" and env.device.type == "cuda")
    return Parts(module, module, params, optimizer, scheduler, scaler)


@dataclass
class Targets:
    """How a batch's targets are made: the KEY's statistics, the online teacher if any, the autocast dtype."""

    mean: torch.Tensor
    std: torch.Tensor
    teacher: Any = None
    amp_dtype: torch.dtype | None = None


def build_targets(cfg: TrainConfig, src: DataSource, env: WorkerEnv) -> Targets:
    teacher = None
    if cfg.objective == "iboot" and cfg.targets == "online":
        from feature_store.spec import TeacherSpec
        from feature_store.teacher import load_teacher

        teacher = load_teacher(TeacherSpec(model=cfg.teacher or src.teacher_model, revision=src.teacher_revision,
                                           precision=src.teacher_precision),
                               size=cfg.student.image_size, device=str(env.device))
        if not cfg.teacher and teacher.fingerprint != src.teacher_fingerprint:
            raise ValueError(f"the teacher at {src.teacher_model} is not the one that made {src.key} (weights "
                             "changed since extraction); pass --set teacher=... to compare with another on purpose")
    mean = torch.tensor(src.target_mean, dtype=torch.float32, device=env.device)
    std = torch.tensor(src.target_std, dtype=torch.float32, device=env.device)
    return Targets(mean, std, teacher, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision))


def build_probe(cfg: TrainConfig, src: DataSource, env: WorkerEnv):
    if not cfg.eval_every or env.rank != 0:
        return None
    from training.evaluate import KnnProbe

    return KnnProbe(FeatureStore(src.root, src.storage_options), src.key, version=src.version,
                    heldout_fraction=cfg.data.heldout_fraction)


def _mean_over_workers(terms: dict[str, float], env: WorkerEnv) -> dict[str, float]:
    """Logged losses are the mean over all workers' batches, not rank 0's alone."""
    import torch.distributed as dist

    if env.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return terms
    t = torch.tensor(list(terms.values()), dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return dict(zip(terms, (t / env.world_size).tolist()))


def train_step(parts: Parts, cfg: TrainConfig, batches: Any, progress: Any, targets: Targets, env: WorkerEnv,
               timer: Any) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the loss terms (mean over workers)."""
    from training.objective import cosine_momentum

    parts.model.train()
    parts.optimizer.zero_grad(set_to_none=True)
    acc: dict[str, float] = {}
    for _ in range(cfg.optim.grad_accum):
        with timer.waiting():
            batch = next(batches)
        progress.position.advance(batch.stream, batch.epoch, batch.consumed)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + progress.step * 1_009 + env.rank)
        loss, terms = step_loss(parts.model, cfg, batch.frames, batch.targets, batch.patches, gen,
                                device=env.device, mean=targets.mean, std=targets.std, teacher=targets.teacher,
                                amp_dtype=targets.amp_dtype)
        parts.scaler.scale(loss / cfg.optim.grad_accum).backward()
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v / cfg.optim.grad_accum
    parts.scaler.unscale_(parts.optimizer)
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parts.params, cfg.optim.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    if cfg.objective == "byol":
        parts.module.byol.update_ema(cosine_momentum(progress.step, cfg.steps, base=cfg.byol_momentum))
    return _mean_over_workers(acc, env)


def train_worker(cfg: TrainConfig, src: DataSource, env: WorkerEnv, log: Callable[[str], None] = print) -> dict[str, Any]:
    from training.runparts import Checkpointer, StepTimer, loader_for, metrics_writer

    parts = build_parts(cfg, src, env)
    ckpt = Checkpointer(parts, cfg, src, env)
    progress = ckpt.restore(log)
    parts.model = env.prepare(parts.module)
    targets, probe = build_targets(cfg, src, env), build_probe(cfg, src, env)
    batches = iter(loader_for(cfg, src, env, progress.position))
    writer = metrics_writer(cfg, src, env)
    timer = StepTimer(cfg.data.batch_size * cfg.optim.grad_accum * env.world_size)
    while progress.step < cfg.steps:
        with timer.stepping():
            terms = train_step(parts, cfg, batches, progress, targets, env, timer)
        progress.record(terms)
        knn = probe(parts.module.student_module, cfg.student) if probe and (
            progress.step % cfg.eval_every == 0 or progress.step == 1) else {}
        metrics = timer.metrics(progress, terms, parts.scheduler.get_last_lr()[0], knn) if (
            progress.step % cfg.log_every == 0 or progress.step in (1, cfg.steps) or knn) else None
        if metrics and writer:
            writer.write(metrics)
            log(f"step {progress.step}/{cfg.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                f"{metrics['samples_per_s']:.1f} samples/s data-wait {metrics['data_wait_frac']:.0%}")
        for cb in env.callbacks:
            cb.on_step_end(progress.step, env)
        if progress.step % cfg.checkpoint_every == 0 or progress.step == cfg.steps:
            ckpt.save(progress, metrics)
    if writer:
        writer.close()
    return progress.summary()
