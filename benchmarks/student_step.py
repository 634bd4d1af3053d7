"""One optimiser step of the training loop on a fixed batch, with cached targets or the teacher in the loop.

The loss is `training.loop.step_loss`, exactly what `train_worker` calls per micro-batch (views,
augmentation, targets cached or from `Teacher.embed` on the views' frames, the objective's forward); around
it the loop's AdamW step with gradient clipping, minus data reading, logging and checkpointing. So the two
target sources are compared on the loop's own work.
"""

from __future__ import annotations

from typing import Any

import torch

from training.config import DataConfig, TrainConfig
from training.loop import ObjectiveModule, make_views, online_targets, step_loss
from training.models import StudentConfig


def bench_train_config(*, arch: str, size: str, frames: int, image_size: int, patch: int, batch_size: int,
                       seed: int = 0) -> TrainConfig:
    student = StudentConfig(arch=arch, size=size, frames=frames, image_size=image_size, patch=patch)
    return TrainConfig(seed=seed, student=student, data=DataConfig(batch_size=batch_size))


class StudentStep:
    def __init__(self, cfg: TrainConfig, target_dim: int, device: torch.device, mean: torch.Tensor,
                 std: torch.Tensor):
        torch.manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device
        self.module = ObjectiveModule(cfg, target_dim=target_dim).to(device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.mean, self.std = mean.to(device), std.to(device)

    def generator(self, step: int) -> torch.Generator:
        """The loop's per-step generator (rank 0)."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 1_009)

    def teacher_only(self, teacher: Any, frames: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        """The teacher work an online step adds, alone: both views' frames through `Teacher.embed`."""
        views, _ = make_views(frames, targets, self.cfg, self.generator(step))
        for f, _, _ in views:
            online_targets(teacher, f)

    def __call__(self, frames: torch.Tensor, targets: torch.Tensor, step: int, teacher: Any = None) -> float:
        """frames uint8 [B, T, S, S, 3] and cached targets float [B, T, D], on the CPU as `collate` returns
        them; with `teacher`, the cached targets are ignored and recomputed from the frames."""
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = step_loss(self.module, self.cfg, frames, targets, None, self.generator(step),
                                device=self.device, mean=self.mean, std=self.std, teacher=teacher)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        return terms["loss"]
