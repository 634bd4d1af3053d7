"""Spatial augmentation that stays consistent with cached targets, and the measurement that decides it.

A cached target is valid only for the pixels it was computed from, so only two spatial augmentations are
offered (see docs/method.md, "Augmentation consistency (measured)"):

- brightness: every pixel of a view multiplied by one factor drawn from [1 - b, 1 + b] (the same factor for
  all frames of the view, so it adds no flicker that could pass for motion). Targets stay the cached ones;
  this is allowed because the teacher's embedding barely moves (measured).
- random resized crop aligned to the stored patch grid (only when the KEY stores patch grids): a square of
  k x k grid cells, k drawn from [ceil(scale * G), G], the same box for all frames of the view, resized back
  to S x S. Its per-frame targets are the mean of the stored patch cells under the box. That is the patch-mean
  space, not the teacher's pooled embedding space (CLIP's image_embeds are a projection of the post-layernorm
  CLS token; patch tokens are neither), so with cropping on, EVERY target of the run is a patch mean (an
  uncropped view's target is the mean of the whole grid): `target_space(cfg)` says which space a run uses.

Never offered, because they change what a label means: horizontal flip (left <-> right motion), rotations
(swap up/down with left/right), colour jitter / hue (colour labels). `FORBIDDEN` lists them with the reason.

Everything here is a pure function of its inputs and a `torch.Generator` (deterministic given its seed).
The measurement behind the docs table (the teacher's cosine between plain and augmented frames) is research
code and lives outside the product: `python -m benchmarks.augment_consistency`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.config import AugmentConfig

# What is never offered, and why (also the docs table).
FORBIDDEN: dict[str, str] = {
    "horizontal flip": "reverses left/right motion: a 'left' clip becomes a 'right' one",
    "rotation by 90/180/270 degrees": "turns up/down motion into left/right (or reverses it)",
    "colour jitter / hue": "changes colour labels (a hue shift turns red into green)",
}

TARGET_SPACES = ("embeds", "patch_mean")


@dataclass(frozen=True)
class ViewParams:
    """The random choices for one view of a batch of B clips (everything `apply_view_params` needs)."""

    brightness: torch.Tensor | None  # float32 [B] factors, or None (off)
    crop: torch.Tensor | None  # int64 [B, 3] (row, col, k) in patch-grid cells, or None (off)
    grid: int = 0  # G of the patch grid the crop boxes refer to


def check_config(cfg: AugmentConfig) -> None:
    if not 0.0 <= cfg.brightness < 1.0:
        raise ValueError(f"augment.brightness must be in [0, 1), got {cfg.brightness}")
    if not 0.0 < cfg.random_crop_scale <= 1.0:
        raise ValueError(f"augment.random_crop_scale must be in (0, 1], got {cfg.random_crop_scale}")


def crops_enabled(cfg: AugmentConfig) -> bool:
    return cfg.random_crop_scale < 1.0


def target_space(cfg: AugmentConfig) -> str:
    """The run's target space: "patch_mean" when it crops (then all targets are patch-grid means), else "embeds"."""
    check_config(cfg)
    return "patch_mean" if crops_enabled(cfg) else "embeds"


def min_crop_cells(scale: float, grid: int) -> int:
    """The smallest crop side in cells: ceil(scale * G), at least 1 (1e-9 absorbs float noise: 0.75 * 8 = 6)."""
    return max(1, min(grid, math.ceil(scale * grid - 1e-9)))


def sample_view_params(batch: int, cfg: AugmentConfig, gen: torch.Generator, grid: int = 0) -> ViewParams:
    """Draw one view's brightness factors and crop boxes; nothing is drawn for what is off."""
    check_config(cfg)
    factors = None
    if cfg.brightness > 0:
        factors = 1.0 + cfg.brightness * (2.0 * torch.rand(batch, generator=gen) - 1.0)
    crop = None
    if crops_enabled(cfg):
        if grid < 1:
            raise ValueError("random crops need the stored patch grid (a KEY with TeacherSpec.patch_grid > 0)")
        k = torch.randint(min_crop_cells(cfg.random_crop_scale, grid), grid + 1, (batch,), generator=gen)
        room = (grid - k + 1).double()
        row = (torch.rand(batch, generator=gen, dtype=torch.float64) * room).long()
        col = (torch.rand(batch, generator=gen, dtype=torch.float64) * room).long()
        crop = torch.stack([row, col, k], dim=1)
    return ViewParams(brightness=factors, crop=crop, grid=grid)


def cell_edge(cells: int, size: int, grid: int) -> int:
    """Pixel edge of grid line `cells` (floor(cells * S / G): adaptive pooling's bin starts; exact if G | S)."""
    return (cells * size) // grid


def crop_frames(frames: torch.Tensor, crop: torch.Tensor, grid: int) -> torch.Tensor:
    """float [B, L, S, S, 3] -> float [B, L, S, S, 3]: each clip's box (row, col, k cells) resized to S x S.

    Bilinear upsampling (a crop is never larger than the frame), one box for all frames of a clip.
    """
    b, _, s = frames.shape[:3]
    out = torch.empty_like(frames)
    for i in range(b):
        row, col, k = (int(v) for v in crop[i])
        if k == grid:
            out[i] = frames[i]
            continue
        y0, y1 = cell_edge(row, s, grid), cell_edge(row + k, s, grid)
        x0, x1 = cell_edge(col, s, grid), cell_edge(col + k, s, grid)
        region = frames[i, :, y0:y1, x0:x1].permute(0, 3, 1, 2)  # [L, 3, h, w]
        resized = F.interpolate(region, size=(s, s), mode="bilinear", align_corners=False)
        out[i] = resized.permute(0, 2, 3, 1)
    return out


def crop_targets(patches: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """[B, L, G, G, Dp] patch grids -> float32 [B, L, Dp]: per frame, the mean of the cells under the box."""
    b, _, g = patches.shape[:3]
    cells = torch.arange(g)
    row, col, k = crop[:, 0, None], crop[:, 1, None], crop[:, 2, None]
    in_rows = (cells >= row) & (cells < row + k)  # [B, G]
    in_cols = (cells >= col) & (cells < col + k)
    mask = (in_rows[:, :, None] & in_cols[:, None, :]).to(torch.float32)  # [B, G, G]
    summed = torch.einsum("blghd,bgh->bld", patches.to(torch.float32), mask.to(patches.device))
    return summed / (k.to(patches.device).to(torch.float32) ** 2)[:, :, None]


def grid_mean_targets(patches: torch.Tensor) -> torch.Tensor:
    """[..., G, G, Dp] -> float32 [..., Dp]: an uncropped view's patch-mean target (and what its stats are of)."""
    return patches.to(torch.float32).mean(dim=(-3, -2))


def apply_view_params(frames: torch.Tensor, targets: torch.Tensor, patches: torch.Tensor | None,
                      params: ViewParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply drawn params to one view: uint8 frames [B, L, S, S, 3] and its targets, consistently."""
    if params.brightness is None and params.crop is None:
        return frames, targets
    x = frames.to(torch.float32)
    if params.crop is not None:
        if patches is None:
            raise ValueError("random crops need the view's patch grids [B, L, G, G, Dp]")
        x = crop_frames(x, params.crop, params.grid)
        targets = crop_targets(patches, params.crop)
    if params.brightness is not None:
        x = x * params.brightness.to(x.device).view(-1, 1, 1, 1, 1)
    return x.round_().clamp_(0, 255).to(torch.uint8), targets


def augment_views(frames: torch.Tensor, targets: torch.Tensor, patches: torch.Tensor | None,
                  cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of B clips: uint8 frames [B, L, S, S, 3], cached targets [B, L, D], patch grids
    [B, L, G, G, Dp] or None -> (augmented frames uint8 [B, L, S, S, 3], targets).

    Targets are the cached ones unless the config crops; then they are patch-grid means [B, L, Dp] for every
    clip (see `target_space`). Deterministic given `gen`'s state; call once per view (independent draws).
    """
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [B, L, S, S, 3], got {frames.dtype} {tuple(frames.shape)}")
    grid = 0
    if crops_enabled(cfg):
        if patches is None:
            raise ValueError("augment.random_crop_scale < 1 needs stored patch grids (a KEY with "
                             "TeacherSpec.patch_grid > 0); crops with unchanged targets are not offered")
        if patches.ndim != 5 or patches.shape[:2] != frames.shape[:2] or patches.shape[2] != patches.shape[3]:
            raise ValueError(f"patches {tuple(patches.shape)} do not match frames {tuple(frames.shape)}")
        grid = int(patches.shape[2])
    params = sample_view_params(frames.shape[0], cfg, gen, grid)
    return apply_view_params(frames, targets, patches, params)
