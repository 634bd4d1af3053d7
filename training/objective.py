"""The iBoot objective on cached teacher targets, and the video-only BYOL baseline.

See docs/method.md for the formulas and where this departs from iBoot and BYOL. Pure torch; no Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------
# Targets


def target_stats(targets: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std of teacher embeddings `[N, D]` (float64 accumulation, float32 out).

    The std is floored at `eps` so a constant dimension does not divide by zero later.
    """
    if targets.dim() != 2:
        raise ValueError(f"expected targets [N, D], got {tuple(targets.shape)}")
    t = targets.double()
    mean = t.mean(dim=0)
    std = t.std(dim=0, unbiased=False) if t.shape[0] > 1 else torch.ones_like(mean)
    return mean.float(), std.clamp_min(eps).float()


def normalize_targets(targets: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each dimension of `[..., D]` targets with stats of the whole KEY (float32 out).

    A teacher's embeddings share a large common direction (a tiny random CLIP: cosine ~0.997 between any two
    images), so a cosine loss on raw targets is nearly satisfied by predicting the mean; standardising first
    leaves only what distinguishes frames.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=targets.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=targets.device)
    return (targets.float() - mean) / std.clamp_min(eps)


# ---------------------------------------------------------------------------------------------------------
# Loss pieces


def nmse(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalised MSE along the last dim: ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), in [0, 4]."""
    return 2.0 - 2.0 * F.cosine_similarity(p.float(), z.float(), dim=-1, eps=1e-8)


def _norm1d(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    raise ValueError(f"norm must be 'batch' or 'layer', got {kind!r}")


class MLP(nn.Module):
    """Linear -> norm -> ReLU -> Linear (BYOL's projector/predictor), over any leading dims."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, norm: str = "layer") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), _norm1d(norm, d_hidden), nn.ReLU(inplace=True),
                                 nn.Linear(d_hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)  # BatchNorm1d wants [N, C]


OFFSET_FREQS = 8


def fourier_features(x: Tensor, n: int = OFFSET_FREQS) -> Tensor:
    """[B] -> [B, 2n] sines and cosines of x at octave frequencies (x of order 1)."""
    freqs = (2.0 ** torch.arange(n, device=x.device, dtype=torch.float32)) * (math.pi / 4)
    angles = x.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class IBootHead(nn.Module):
    """Heads on top of a student: clip projector + predictor into the teacher's space, and a per-frame head.

    norm="layer" by default: the targets are fixed (no collapse to guard against) and LayerNorm needs no
    cross-GPU statistics; "batch" gives BYOL's original heads.
    """

    def __init__(self, embed_dim: int, target_dim: int, *, hidden_dim: int = 1024, proj_dim: int = 256,
                 frame_hidden_dim: int | None = None, norm: str = "layer",
                 offset_conditioning: bool = False) -> None:
        super().__init__()
        self.projector = MLP(embed_dim, hidden_dim, proj_dim, norm)
        self.predictor = MLP(proj_dim, hidden_dim, target_dim, norm)
        self.offset_conditioning = offset_conditioning
        # Off by default (BYOL's and iBoot's form: predict the other window's mean embedding from this window
        # alone); measured to do nothing on the demo data (cos_cross == cos_same, docs/method.md).
        # On: the predictor is told where the other window is (window-start offset, FiLM scale and shift), so
        # the cross term becomes a forecast that needs the clip's motion as well as its appearance.
        self.offset_embed = nn.Sequential(nn.Linear(2 * OFFSET_FREQS, proj_dim), nn.GELU(),
                                          nn.Linear(proj_dim, 2 * proj_dim)) if offset_conditioning else None
        self.frame_head = MLP(embed_dim, frame_hidden_dim or hidden_dim // 2, target_dim, norm)
        self.target_dim = target_dim

    def predict_clip(self, clip: Tensor, offset: Tensor | None = None) -> Tensor:
        """[B, E] (+ offset [B]: the target window's start minus this window's, in window lengths) -> [B, D]"""
        if self.offset_embed is None:
            return self.predictor(self.projector(clip))
        if offset is None:
            offset = torch.zeros(clip.shape[0], device=clip.device)
        scale, shift = self.offset_embed(fourier_features(offset)).chunk(2, dim=-1)
        return self.predictor(self.projector(clip) * (1 + scale) + shift)

    def predict_frames(self, frames: Tensor) -> Tensor:
        """[B, T, E] -> [B, T, D_teacher]"""
        return self.frame_head(frames)


@dataclass
class LossWeights:
    cross: float = 1.0  # predict the OTHER window's mean teacher embedding
    frame: float = 0.5  # align each frame's output with its own teacher embedding
    same: float = 0.0  # predict the SAME window's mean teacher embedding

    def __post_init__(self) -> None:
        if min(self.cross, self.frame, self.same) < 0:
            raise ValueError(f"loss weights must be >= 0, got {self}")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossWeights:
        return cls(**d)


def _student_pair(student: nn.Module, view1: Tensor, view2: Tensor) -> tuple[Any, Any]:
    # One forward over both views when they stack: half the kernel launches, and BatchNorm sees both.
    if view1.shape == view2.shape:
        out = student(torch.cat([view1, view2], dim=0))
        b = view1.shape[0]
        return ((out.clip[:b], out.frames[:b]), (out.clip[b:], out.frames[b:]))
    o1, o2 = student(view1), student(view2)
    return (o1.clip, o1.frames), (o2.clip, o2.frames)


def iboot_loss(student: nn.Module, head: IBootHead, view1: Tensor, view2: Tensor, targets1: Tensor,
               targets2: Tensor, weights: LossWeights | None = None,
               offset: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The iBoot loss on two temporal windows of the same samples.

    view_i: student inputs [B, L_i, 3, H, W]; targets_i: normalised teacher embeddings [B, L_i, D] of exactly
    those frames. offset [B]: view2's start minus view1's, in frames divided by the window length (None: 0);
    a head with `offset_conditioning` conditions its predictor on it (and on -offset for the other direction),
    so the cross term asks what the teacher will see *at that time*; the default head ignores it. Returns the weighted loss and float diagnostics: each term (summed over both views), and
    mean cosines between predictions and targets (cos_*). Every term stays in the graph, multiplied by its
    weight even when that is 0, so all head parameters get gradients (DDP needs no find_unused_parameters).
    """
    weights = weights or LossWeights()
    for v, t, name in ((view1, targets1, "1"), (view2, targets2, "2")):
        if t.dim() != 3 or t.shape[:2] != v.shape[:2]:
            raise ValueError(f"targets{name} {tuple(t.shape)} do not match view{name} {tuple(v.shape)}: "
                             "need [B, L, D] for the same B and L")
    (c1, f1), (c2, f2) = _student_pair(student, view1, view2)
    if offset is None:
        offset = torch.zeros(view1.shape[0], device=view1.device)
    p1, p2 = head.predict_clip(c1, offset), head.predict_clip(c2, -offset)  # each predicts the OTHER view
    # each predicts its own view (offset 0): the same prediction as p_i when the head ignores offsets
    s1, s2 = (p1, p2) if head.offset_embed is None else (head.predict_clip(c1), head.predict_clip(c2))
    z1, z2 = targets1.float().mean(dim=1), targets2.float().mean(dim=1)
    q1, q2 = head.predict_frames(f1), head.predict_frames(f2)

    cross1, cross2 = nmse(p1, z2), nmse(p2, z1)
    frame1, frame2 = nmse(q1, targets1), nmse(q2, targets2)  # [B, L_i]
    same1, same2 = nmse(s1, z1), nmse(s2, z2)
    cross = cross1.mean() + cross2.mean()
    frame = frame1.mean() + frame2.mean()
    same = same1.mean() + same2.mean()
    loss = weights.cross * cross + weights.frame * frame + weights.same * same

    def cos(a: Tensor, b: Tensor) -> Tensor:  # nmse = 2 - 2 cos
        return 1.0 - torch.cat([a.detach().flatten(), b.detach().flatten()]).mean() / 2.0

    names = ("loss", "cross", "frame", "same", "cos_cross", "cos_frame", "cos_same")
    values = torch.stack([loss.detach(), cross.detach(), frame.detach(), same.detach(),
                          cos(cross1, cross2), cos(frame1, frame2), cos(same1, same2)])
    diagnostics = dict(zip(names, values.tolist()))  # one device sync, not seven
    return loss, diagnostics


# ---------------------------------------------------------------------------------------------------------
# Video-only baseline


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL's EMA schedule: base at step 0, rising to `final` at total_steps along a half cosine."""
    if total_steps <= 0:
        return final
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class BYOLBaseline(nn.Module):
    """BYOL on video, no image teacher: the target is an EMA copy of student + projector.

    `forward(view1, view2)` returns (loss, diagnostics) with loss = nmse(q(v1), z'(v2)) + nmse(q(v2), z'(v1)),
    q = predictor . projector . student (online), z' = projector' . student' (EMA target, no gradient).
    Call `update_ema(momentum)` after each optimiser step.
    """

    def __init__(self, student: nn.Module, *, hidden_dim: int = 4096, proj_dim: int = 256,
                 norm: str = "batch") -> None:
        super().__init__()
        embed_dim = int(student.embed_dim)
        self.student = student
        self.projector = MLP(embed_dim, hidden_dim, proj_dim, norm)
        self.predictor = MLP(proj_dim, hidden_dim, proj_dim, norm)
        self.target_student = copy.deepcopy(student)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self._target_parameters():
            p.requires_grad_(False)

    def _online_parameters(self) -> list[Tensor]:
        return [*self.student.parameters(), *self.projector.parameters()]

    def _target_parameters(self) -> list[Tensor]:
        return [*self.target_student.parameters(), *self.target_projector.parameters()]

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online; buffers (BN statistics) are copied."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        torch._foreach_lerp_(self._target_parameters(), self._online_parameters(), 1.0 - momentum)
        online_buffers = [*self.student.buffers(), *self.projector.buffers()]
        target_buffers = [*self.target_student.buffers(), *self.target_projector.buffers()]
        for t, o in zip(target_buffers, online_buffers):
            t.copy_(o)

    def forward(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, dict[str, float]]:
        (c1, _), (c2, _) = _student_pair(self.student, view1, view2)
        q1, q2 = self.predictor(self.projector(c1)), self.predictor(self.projector(c2))
        with torch.no_grad():
            (t1, _), (t2, _) = _student_pair(self.target_student, view1, view2)
            z1, z2 = self.target_projector(t1), self.target_projector(t2)
        l1, l2 = nmse(q1, z2), nmse(q2, z1)
        loss = l1.mean() + l2.mean()
        cos = 1.0 - torch.cat([l1, l2]).detach().mean() / 2.0
        values = torch.stack([loss.detach(), cos]).tolist()
        return loss, {"loss": values[0], "cos_cross": values[1]}


__all__ = [
    "target_stats", "normalize_targets", "nmse", "MLP", "IBootHead", "LossWeights", "iboot_loss",
    "cosine_momentum", "BYOLBaseline",
]
