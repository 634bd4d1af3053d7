"""One readable training loop, the same in-process (tests, one CPU) and on each Ray Train worker.

What differs between the two is passed in as a `WorkerEnv` (rank, device, how to wrap the model for DDP,
how to report and checkpoint), so this module imports no Ray. The loop logs data time apart from step
time, samples/s and the data-wait fraction; checkpoints hold everything needed to continue bit-for-bit:
model, heads, optimiser, scheduler, RNG, and the data position (epoch, samples consumed).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from feature_store.reader import SplitFilter, iter_samples
from feature_store.store import FeatureStore
from training.augment import augment_views, check_config, crops_enabled, grid_mean_targets
from training.config import TrainConfig
from training.models import build_student, save_student, unwrap_model, video_to_input
from training.objective import BYOLBaseline, IBootHead, cosine_momentum, iboot_loss, normalize_targets

STATE_FILE = "state.pt"
EXPORT_DIR = "student"


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
    image_size: int = 0
    segment_frames: int = 0
    embed_dim: int = 0  # the dimension of the targets the run trains on (the patch dim when it crops)
    target_space: str = "embeds"  # "embeds" (cached embeddings) | "patch_mean" (means of stored patch grids)


@dataclass
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m
    report: Callable[[dict[str, Any], str | None], None] = lambda metrics, ckpt: None
    restore_dir: str | None = None  # a checkpoint folder to continue from
    out_dir: str | None = None  # where rank 0 writes metrics.jsonl and TensorBoard logs
    crash_after_step: int = 0  # tests only: rank 0's process dies once, right after this step's checkpoint


class ObjectiveModule(nn.Module):
    """Student + heads as one module, so DDP wraps (and all-reduces) a single thing."""

    def __init__(self, cfg: TrainConfig, target_dim: int):
        super().__init__()
        self.objective = cfg.objective
        student = build_student(cfg.student)
        if cfg.objective == "iboot":
            self.student = student
            self.head = IBootHead(student.embed_dim, target_dim)
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


def sample_stream(store: FeatureStore, src: DataSource, cfg: TrainConfig, env: WorkerEnv, epoch: int,
                  skip: int) -> Iterator[tuple[dict[str, Any], int, int]]:
    """Training samples forever, epoch after epoch: yields (sample, epoch, position in epoch after it)."""
    snapshot = store.open(src.key, src.version)
    split = SplitFilter("train", cfg.data.heldout_fraction)
    while True:
        n = 0
        for i, s in enumerate(iter_samples(store, snapshot, rank=env.rank, world_size=env.world_size, epoch=epoch,
                                           seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer, split=split)):
            n += 1
            if i < skip:
                continue
            yield s, epoch, i + 1
        if n == 0:
            raise RuntimeError(f"worker {env.rank} of {env.world_size} got no training samples from {src.key}: "
                               "fewer training samples than workers?")
        epoch, skip = epoch + 1, 0


def make_views(frames: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, gen: torch.Generator,
               patches: torch.Tensor | None = None):
    """Two temporal windows per sample: their frames, exactly their cached targets, and (when given) their
    patch grids. Returns ([(frames, targets, patches | None)] * 2, offset)."""
    b, t = frames.shape[:2]
    length = min(cfg.data.view_frames, t)
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


def collate(samples: list[dict[str, Any]], with_patches: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 frames [B, T, S, S, 3], float32 targets [B, T, D], and the patch grids [B, T, G, G, Dp] if asked."""
    frames = torch.from_numpy(np.stack([s["frames"] for s in samples]))
    targets = torch.from_numpy(np.stack([s["targets"] for s in samples]).astype(np.float32))
    patches = torch.from_numpy(np.stack([_patches(s) for s in samples])) if with_patches else None
    return frames, targets, patches


def _patches(sample: dict[str, Any]) -> np.ndarray:
    """A sample's stored patch grid [T, G, G, Dp], which random crops cannot do without."""
    if sample.get("patches") is None:
        raise ValueError(f"sample {sample.get('sample_key', '?')} has no stored patch grid: random crops need a KEY "
                         "extracted with TeacherSpec.patch_grid > 0 (subsume extract --patch-grid G)")
    return sample["patches"]


def patch_mean_stats(store: FeatureStore, key: str, version: int, limit: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of uncropped patch-grid means over the first `limit` samples of a snapshot:
    what a cropping run standardises its targets with (the manifest's stats are of the embeddings)."""
    snapshot = store.open(key, version)
    rows: list[np.ndarray] = []
    for s in iter_samples(store, snapshot):
        rows.append(grid_mean_targets(torch.from_numpy(_patches(s))).numpy())
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


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def _mean_over_workers(terms: dict[str, float], env: WorkerEnv) -> dict[str, float]:
    """Logged losses are the mean over all workers' batches, not rank 0's alone."""
    import torch.distributed as dist

    if env.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return terms
    t = torch.tensor(list(terms.values()), dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return dict(zip(terms, (t / env.world_size).tolist()))


def _crash_once(marker: str) -> None:
    """Simulate a worker dying (no exception, no cleanup), once per run folder."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def train_worker(cfg: TrainConfig, src: DataSource, env: WorkerEnv, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)  # same initial weights on every worker (DDP broadcasts rank 0's anyway)
    random.seed(cfg.seed)
    store = FeatureStore(src.root, src.storage_options)
    module = ObjectiveModule(cfg, target_dim=src.embed_dim).to(env.device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step, epoch, consumed = 0, 0, 0
    history: list[float] = []
    if env.restore_dir:
        state = torch.load(os.path.join(env.restore_dir, STATE_FILE), map_location="cpu", weights_only=True)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, epoch, consumed = int(state["step"]), int(state["epoch"]), int(state["consumed"])
        history = list(state.get("loss_history", []))
        log(f"resumed at step {step} (epoch {epoch}, {consumed} samples into it)")
    model = env.prepare(module)

    teacher = None
    if cfg.objective == "iboot" and cfg.targets == "online":
        from feature_store.spec import TeacherSpec
        from feature_store.teacher import load_teacher

        teacher = load_teacher(TeacherSpec(model=cfg.teacher or src.teacher_model, revision=src.teacher_revision,
                                           precision=src.teacher_precision),
                               size=src.image_size, device=str(env.device))
        if not cfg.teacher and teacher.fingerprint != src.teacher_fingerprint:
            raise ValueError(f"the teacher at {src.teacher_model} is not the one that made {src.key} (weights "
                             "changed since extraction); pass --set teacher=... to compare with another on purpose")
    mean = torch.tensor(src.target_mean, dtype=torch.float32, device=env.device)
    std = torch.tensor(src.target_std, dtype=torch.float32, device=env.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and env.device.type == "cuda")

    writer = tb = None
    if env.rank == 0 and env.out_dir:
        os.makedirs(env.out_dir, exist_ok=True)
        writer = open(os.path.join(env.out_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(env.out_dir, "tensorboard"))
        except ImportError:  # TensorBoard is optional at run time
            tb = None

    check_config(cfg.augment)
    cropping = crops_enabled(cfg.augment)
    if cropping and src.target_space != "patch_mean":
        raise ValueError("augment.random_crop_scale < 1 trains on patch-grid means: prepare the DataSource with "
                         "training.train.prepare_run, which sets its target space and stats")
    probe = None
    if cfg.eval_every and env.rank == 0:
        from training.evaluate import KnnProbe

        probe = KnnProbe(store, src.key, frames=cfg.student.frames, heldout_fraction=cfg.data.heldout_fraction,
                         version=src.version)
    micro = cfg.data.batch_size
    stream = sample_stream(store, src, cfg, env, epoch, consumed)
    t_last = time.perf_counter()
    data_time = step_time = 0.0
    window_samples = 0
    losses_first: float | None = history[0] if history else None
    while step < cfg.steps:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        terms_acc: dict[str, float] = {}
        for _ in range(cfg.optim.grad_accum):
            t0 = time.perf_counter()
            batch = []
            for _ in range(micro):
                s, epoch, consumed = next(stream)
                batch.append(s)
            frames, targets, patches = collate(batch, with_patches=cropping)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + env.rank)
            t1_ = time.perf_counter()
            data_time += t1_ - t0  # reading and collating; views, augmentation, online targets are step time
            loss, terms = step_loss(model, cfg, frames, targets, patches, gen, device=env.device, mean=mean,
                                    std=std, teacher=teacher, amp_dtype=amp_dtype)
            scaler.scale(loss / cfg.optim.grad_accum).backward()
            for k, v in terms.items():
                terms_acc[k] = terms_acc.get(k, 0.0) + v / cfg.optim.grad_accum
            step_time += time.perf_counter() - t1_
        t2_ = time.perf_counter()
        scaler.unscale_(optimizer)
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if cfg.objective == "byol":
            module.byol.update_ema(cosine_momentum(step, cfg.steps, base=cfg.byol_momentum))
        step += 1
        terms_acc = _mean_over_workers(terms_acc, env)
        step_time += time.perf_counter() - t2_
        window_samples += micro * cfg.optim.grad_accum * env.world_size
        history.append(terms_acc["loss"])
        if losses_first is None:
            losses_first = terms_acc["loss"]

        checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
        t_eval = time.perf_counter()
        knn = probe(module.student_module, cfg.student) if probe and (step % cfg.eval_every == 0 or step == 1) else {}
        t_eval = time.perf_counter() - t_eval  # not training time: kept out of samples/s
        if step % cfg.log_every == 0 or step == 1 or checkpoint_now or knn:
            elapsed = time.perf_counter() - t_last - t_eval
            metrics = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in terms_acc.items()},
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": round(window_samples / max(elapsed, 1e-9), 2),
                       "data_time_s": round(data_time, 4), "step_time_s": round(step_time, 4),
                       "data_wait_frac": round(data_time / max(data_time + step_time, 1e-9), 4), **knn}
            if writer:
                writer.write(json.dumps(metrics) + "\n")
                writer.flush()
                for k, v in metrics.items():
                    if tb is not None and isinstance(v, (int, float)) and k != "step":
                        tb.add_scalar(k, v, step)
                log(f"step {step}/{cfg.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                    f"{metrics['samples_per_s']:.1f} samples/s data-wait {metrics['data_wait_frac']:.0%}")
            t_last, data_time, step_time, window_samples = time.perf_counter(), 0.0, 0.0, 0
        else:
            metrics = None
        if checkpoint_now:
            state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step, "epoch": epoch,
                     "consumed": consumed, "loss_history": history}
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if env.rank == 0:
                    torch.save(state, os.path.join(tmp, STATE_FILE))
                    save_student(unwrap_model(module.student_module), cfg.student, os.path.join(tmp, EXPORT_DIR))
                    with open(os.path.join(tmp, "train_state.json"), "w") as f:
                        json.dump({"step": step, "epoch": epoch, "consumed": consumed, "store": src.root, "key": src.key,
                                   "version": src.version, "config": cfg.to_dict()}, f, indent=1)
                    ckpt = tmp
                env.report(metrics or {"step": step, "loss": terms_acc["loss"]}, ckpt)
            if env.crash_after_step == step and env.rank == 0 and env.out_dir:
                _crash_once(os.path.join(env.out_dir, ".test-crash-done"))
    if writer:
        writer.close()
    if tb is not None:
        tb.close()
    return {"steps": step, "loss_first": losses_first, "loss_last": history[-1] if history else None,
            "loss_history": history}
