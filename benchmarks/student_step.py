"""One optimiser step of the training loop on a fixed batch, with cached targets or the teacher in the loop.

This is `training.loop.train_worker`'s inner step, built from the same pieces (`ObjectiveModule`,
`make_views`, `video_to_input`, `normalize_targets`, AdamW with gradient clipping) minus data reading,
logging and checkpointing, so that the two target sources are compared on exactly the same work. The
online path calls `Teacher.embed` on each view's stored frames, as the loop does with `targets=online`.
"""

from __future__ import annotations

from typing import Any

import torch

from training.config import DataConfig, TrainConfig
from training.loop import ObjectiveModule, make_views
from training.models import StudentConfig, video_to_input
from training.objective import normalize_targets


def bench_train_config(*, arch: str, size: str, frames: int, image_size: int, patch: int, batch_size: int,
                       seed: int = 0) -> TrainConfig:
    student = StudentConfig(arch=arch, size=size, frames=frames, image_size=image_size, patch=patch)
    return TrainConfig(seed=seed, student=student, data=DataConfig(view_frames=frames, batch_size=batch_size))


class StudentStep:
    def __init__(self, cfg: TrainConfig, target_dim: int, device: torch.device, mean: torch.Tensor,
                 std: torch.Tensor):
        torch.manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device
        self.module = ObjectiveModule(cfg, target_dim=target_dim).to(device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.mean, self.std = mean.to(device), std.to(device)

    def views(self, frames: torch.Tensor, targets: torch.Tensor, step: int):
        """The loop's two temporal windows of each sample and their offset, with the loop's per-step generator."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 1_009)
        return make_views(frames, targets, self.cfg, gen)

    @staticmethod
    def teacher_targets(teacher: Any, view_frames: torch.Tensor) -> torch.Tensor:
        """Online targets of one view [B, L, S, S, 3] -> [B, L, D], as the loop computes them."""
        return teacher.embed(view_frames.reshape(-1, *view_frames.shape[2:])).embeds.reshape(*view_frames.shape[:2], -1)

    def teacher_only(self, teacher: Any, frames: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        """The teacher work an online step adds, alone: both views' frames through `Teacher.embed`."""
        ((f1, _), (f2, _)), _ = self.views(frames, targets, step)
        self.teacher_targets(teacher, f1)
        self.teacher_targets(teacher, f2)

    def __call__(self, frames: torch.Tensor, targets: torch.Tensor, step: int, teacher: Any = None) -> float:
        """frames uint8 [B, T, S, S, 3] and cached targets float [B, T, D], on the CPU as `collate` returns
        them; with `teacher`, the cached targets are ignored and recomputed from the frames."""
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        ((f1, y1), (f2, y2)), offset = self.views(frames, targets, step)
        v1 = video_to_input(f1.to(self.device), self.cfg.student)
        v2 = video_to_input(f2.to(self.device), self.cfg.student)
        if teacher is not None:
            y1, y2 = self.teacher_targets(teacher, f1), self.teacher_targets(teacher, f2)
        t1 = normalize_targets(y1.to(self.device), self.mean, self.std)
        t2 = normalize_targets(y2.to(self.device), self.mean, self.std)
        loss, terms = self.module(v1, v2, t1, t2, offset.to(self.device))
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        return terms["loss"]
