"""Video students: a (2+1)D ResNet and a space-time ViT with one interface.

Both take normalised float video `[B, T, 3, H, W]` and return a clip embedding `[B, E]` and one embedding
per input frame `[B, T, E]` (the per-frame outputs are what the frame-alignment term of the objective needs,
so neither model strides over time for good). Pure torch; no Ray, no transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "student_config.json"

# Size presets. R(2+1)D: stage widths and residual blocks per stage ("base" is R(2+1)D-18's layout).
# ViT: width, depth, heads ("small" and "base" are ViT-S and ViT-B).
R2PLUS1D_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (8, 16, 32, 64), "blocks": (1, 1, 1, 1)},
    "small": {"widths": (32, 64, 128, 256), "blocks": (2, 2, 2, 2)},
    "base": {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2)},
}
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 64, "depth": 2, "heads": 4},
    "small": {"dim": 384, "depth": 12, "heads": 6},
    "base": {"dim": 768, "depth": 12, "heads": 12},
}
ARCHS = ("r2plus1d", "vit")
SIZES = ("tiny", "small", "base")


@dataclass
class StudentConfig:
    """Architecture and input contract of a video student.

    `size` picks a preset; the explicit fields (widths/blocks for r2plus1d, dim/depth/heads for vit) override
    it when set. `resolved()` fills them in, and that is what `save_student` writes, so an exported model
    does not depend on the presets staying the same. `frames`/`image_size` are the training clip shape:
    the ViT's learned position embedding is sized for it (and interpolated for other shapes); the
    r2plus1d and sincos models accept any shape. `mean`/`std` define the input normalisation
    (`video_to_input`), so exported models carry it.
    """

    arch: str = "r2plus1d"
    size: str = "tiny"
    frames: int = 8
    image_size: int = 64
    tubelet: int = 2
    patch: int = 8
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # r2plus1d
    widths: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None
    norm: str = "group"  # "group" (safe with DDP and small per-GPU batches) | "batch"
    # Stages (from the second) that also halve time, as R(2+1)D-18 does in 3; per-frame outputs are then
    # linearly upsampled back to T. 0 keeps full temporal resolution (about twice the compute of 3).
    temporal_downsample: int = 0
    # CoordConv (Liu et al. 2018): two extra input channels holding each pixel's x and y in [-1, 1]. A conv
    # net pooled globally is nearly translation-invariant, so without them it can hardly say WHERE things
    # are, and the teacher's per-frame embeddings (and the motion between them) are largely about where.
    coord_channels: bool = False
    # vit
    dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"  # "sincos" (fixed, any shape) | "learned" (interpolated to other shapes)
    pool: str = "mean"  # "mean" over patch tokens | "cls" token
    drop_path: float = 0.0
    # both: trade compute for memory by recomputing blocks in the backward pass
    grad_checkpointing: bool = False
    # both: append to each per-frame feature its rate of change over time (central differences), doubling
    # E. The clip embedding, the mean of the per-frame outputs, then holds the net change over the clip as
    # well as the average: a plain mean is blind to the order of frames (a left-moving clip has the same set
    # of frames as a right-moving one played backwards), its change is not. Parameter-free.
    temporal_derivative: bool = False

    def __post_init__(self) -> None:
        self.mean = tuple(float(x) for x in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(x) for x in self.std)  # type: ignore[assignment]
        if self.widths is not None:
            self.widths = tuple(int(x) for x in self.widths)
        if self.blocks is not None:
            self.blocks = tuple(int(x) for x in self.blocks)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 entries each, std > 0")
        if self.norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {self.norm!r}")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {self.pos_embed!r}")
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {self.pool!r}")
        if self.temporal_downsample < 0:
            raise ValueError("temporal_downsample must be >= 0")
        if min(self.tubelet, self.patch) < 1 or min(self.frames, self.image_size) < 0:
            raise ValueError("tubelet and patch must be >= 1, frames and image_size >= 0 (0: from the KEY)")

    def resolved(self) -> StudentConfig:
        """A copy with the preset's sizes written out explicitly."""
        if self.arch == "r2plus1d":
            p = R2PLUS1D_PRESETS[self.size]
            r = dataclasses.replace(self, widths=self.widths or p["widths"], blocks=self.blocks or p["blocks"])
            if len(r.widths) != len(r.blocks):  # type: ignore[arg-type]
                raise ValueError("widths and blocks need the same length")
            if r.temporal_downsample > len(r.widths) - 1:  # type: ignore[arg-type]
                raise ValueError(f"temporal_downsample must be <= {len(r.widths) - 1}")  # type: ignore[arg-type]
            return r
        p = VIT_PRESETS[self.size]
        r = dataclasses.replace(self, dim=self.dim or p["dim"], depth=self.depth or p["depth"],
                                heads=self.heads or p["heads"])
        if r.dim % r.heads or r.dim % 2:  # type: ignore[operator]
            raise ValueError(f"dim {r.dim} must be even and divisible by heads {r.heads}")
        return r

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown StudentConfig fields: {sorted(unknown)}")
        return cls(**d)


def with_temporal_derivative(steps: Tensor, dim: int) -> Tensor:
    """Concatenate per-step features with their derivative along `dim` (time), on the channel dim (-1 when
    time is dim 1, 1 when time is dim 2): central differences inside, one-sided at the ends, 0 for one step."""
    channel_dim = 1 if dim == 2 else -1
    if steps.shape[dim] < 2:
        return torch.cat([steps, torch.zeros_like(steps)], dim=channel_dim)
    return torch.cat([steps, torch.gradient(steps, dim=dim)[0]], dim=channel_dim)


class StudentOutput(NamedTuple):
    clip: Tensor  # [B, E]
    frames: Tensor  # [B, T, E], one entry per input frame


def video_to_input(frames_uint8: Tensor, cfg: StudentConfig | None = None) -> Tensor:
    """uint8 `[B, T, H, W, 3]` (as stored) -> normalised float32 `[B, T, 3, H, W]` (what students take)."""
    if frames_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames_uint8.dtype}")
    if frames_uint8.dim() != 5 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"expected [B, T, H, W, 3], got {tuple(frames_uint8.shape)}")
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    x = frames_uint8.permute(0, 1, 4, 2, 3).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 1, 3, 1, 1)
    return x.sub_(m).div_(s)


def _check_video(video: Tensor) -> None:
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"expected video [B, T, 3, H, W], got {tuple(video.shape)}")


# ---------------------------------------------------------------------------------------------------------
# R(2+1)D


def _group_count(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """The largest group count <= max_groups that divides `channels` with >= min_per_group channels each."""
    for g in range(min(max_groups, channels // min_per_group), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm3d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.GroupNorm(_group_count(channels), channels)


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


def _mid_channels(c_in: int, c_out: int) -> int:
    # R(2+1)D's rule: as many parameters as the full 3x3x3 conv it factorises (rounded for GroupNorm).
    return _round8(c_in * c_out * 27 / (c_in * 9 + 3 * c_out))


class Conv2Plus1d(nn.Sequential):
    """A 3x3x3 conv factorised as spatial 1x3x3 (spatial stride) -> norm -> ReLU -> temporal 3x1x1 (time
    stride). Padding 1 on the temporal kernel keeps T when time_stride is 1."""

    def __init__(self, c_in: int, c_out: int, c_mid: int, stride: int, norm: str, time_stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(c_in, c_mid, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            _norm3d(norm, c_mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(c_mid, c_out, (3, 1, 1), stride=(time_stride, 1, 1), padding=(1, 0, 0), bias=False),
        )


class ResBlock2Plus1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, time_stride: int = 1) -> None:
        super().__init__()
        mid = _mid_channels(c_in, c_out)  # both convs use the first one's rule, as in torchvision's R(2+1)D-18
        self.conv1 = Conv2Plus1d(c_in, c_out, mid, stride, norm, time_stride)
        self.norm1 = _norm3d(norm, c_out)
        self.conv2 = Conv2Plus1d(c_out, c_out, mid, 1, norm)
        self.norm2 = _norm3d(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or time_stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv3d(c_in, c_out, 1, stride=(time_stride, stride, stride), bias=False), _norm3d(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


def _coord_grid(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B, 2, T, H, W]: each pixel's x and y, from -1 (left, top) to 1 (right, bottom)."""
    b, _, t, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, H, W]: x then y
    return grid[None, :, None].expand(b, 2, t, h, w)


class R2Plus1DStudent(nn.Module):
    """R(2+1)D ResNet (Tran et al. 2018); spatial stride 2 in the stem and at the start of stages 2..n, and
    by default no temporal stride (see StudentConfig.temporal_downsample). Per-frame outputs: spatial mean of
    the last stage (upsampled to T if time was strided); clip: mean over the last stage's time steps."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        widths, blocks = cfg.widths, cfg.blocks
        assert widths is not None and blocks is not None
        stem_mid = _round8(widths[0] * 45 / 64)  # R(2+1)D-18 uses 45 for a 64-wide stem
        self.coord_channels = cfg.coord_channels
        self.stem = nn.Sequential(
            nn.Conv3d(5 if cfg.coord_channels else 3, stem_mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            _norm3d(cfg.norm, stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(stem_mid, widths[0], (3, 1, 1), padding=(1, 0, 0), bias=False),
            _norm3d(cfg.norm, widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        c_in = widths[0]
        first_time_strided = len(widths) - cfg.temporal_downsample
        for i, (c_out, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                down = i > 0 and j == 0
                time_stride = 2 if (down and i >= first_time_strided) else 1
                layers.append(ResBlock2Plus1d(c_in, c_out, 2 if down else 1, cfg.norm, time_stride))
                c_in = c_out
        self.blocks = nn.ModuleList(layers)
        self.temporal_derivative = cfg.temporal_derivative
        self.embed_dim = widths[-1] * (2 if cfg.temporal_derivative else 1)
        self.grad_checkpointing = cfg.grad_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, video: Tensor) -> StudentOutput:
        _check_video(video)
        x = video.transpose(1, 2)  # [B, C, T, H, W]
        if self.coord_channels:
            x = torch.cat([x, _coord_grid(x)], dim=1)
        x = self.stem(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        steps = x.mean(dim=(3, 4))  # [B, E, T']
        if self.temporal_derivative:
            steps = with_temporal_derivative(steps, dim=2)
        clip = steps.mean(dim=2)
        if steps.shape[2] != video.shape[1]:
            steps = F.interpolate(steps, size=video.shape[1], mode="linear", align_corners=False)
        return StudentOutput(clip=clip, frames=steps.transpose(1, 2))


# ---------------------------------------------------------------------------------------------------------
# Video ViT


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Fixed sine-cosine embedding of (possibly fractional) positions: [N] -> [N, dim], dim even."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_3d(dim: int, t: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Space-time sine-cosine embedding [t*h*w, dim]: a quarter of the channels for time, the rest split
    between rows and columns. Computed per input shape, so any frame count or size works."""
    d_t = 2 * (dim // 8)
    d_h = 2 * ((dim - d_t) // 4)
    d_w = dim - d_t - d_h
    gt, gh, gw = (torch.arange(n, device=device) for n in (t, h, w))
    et = sincos_1d(d_t, gt)[:, None, None].expand(t, h, w, d_t)
    eh = sincos_1d(d_h, gh)[None, :, None].expand(t, h, w, d_h)
    ew = sincos_1d(d_w, gw)[None, None, :].expand(t, h, w, d_w)
    return torch.cat([et, eh, ew], dim=-1).reshape(t * h * w, dim)


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d_head]
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VideoViTStudent(nn.Module):
    """Space-time ViT with tubelet embedding (VideoMAE / ViViT style joint attention).

    A clip whose T is not a multiple of the tubelet is padded by repeating its last frame; per-frame
    outputs are the mean token of each time step, repeated over that tubelet's frames and cut back to T.
    H and W must be multiples of the patch size.
    """

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        dim, depth, heads = cfg.dim, cfg.depth, cfg.heads
        assert dim is not None and depth is not None and heads is not None
        self.tubelet, self.patch = cfg.tubelet, cfg.patch
        self.width = dim
        self.temporal_derivative = cfg.temporal_derivative
        self.embed_dim = dim * (2 if cfg.temporal_derivative else 1)
        self.patch_embed = nn.Conv3d(3, dim, (cfg.tubelet, cfg.patch, cfg.patch),
                                     stride=(cfg.tubelet, cfg.patch, cfg.patch))
        # Learned embeddings are separable (space + time), sized for the training clip.
        self.grid = (math.ceil(cfg.frames / cfg.tubelet), cfg.image_size // cfg.patch, cfg.image_size // cfg.patch)
        self.pos_embed_learned = cfg.pos_embed == "learned"
        if self.pos_embed_learned:
            self.pos_spatial = nn.Parameter(torch.zeros(1, self.grid[1] * self.grid[2], dim))
            self.pos_temporal = nn.Parameter(torch.zeros(1, self.grid[0], dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.pool == "cls" else None
        rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = cfg.grad_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for p in (getattr(self, "pos_spatial", None), getattr(self, "pos_temporal", None), self.cls_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def _pos_embed(self, t: int, h: int, w: int, device: torch.device) -> Tensor:
        if not self.pos_embed_learned:
            return sincos_3d(self.width, t, h, w, device=device)[None]
        gt, gh, gw = self.grid
        sp = self.pos_spatial
        if (h, w) != (gh, gw):
            sp = sp.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            sp = F.interpolate(sp, size=(h, w), mode="bicubic", align_corners=False)
            sp = sp.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        tp = self.pos_temporal
        if t != gt:
            tp = F.interpolate(tp.transpose(1, 2), size=t, mode="linear", align_corners=False).transpose(1, 2)
        return (tp[:, :, None, :] + sp[:, None, :, :]).reshape(1, t * h * w, -1)

    def forward(self, video: Tensor) -> StudentOutput:
        _check_video(video)
        b, n_frames, _, height, width = video.shape
        if height % self.patch or width % self.patch:
            raise ValueError(f"H, W ({height}, {width}) must be multiples of the patch size {self.patch}")
        pad = (-n_frames) % self.tubelet
        if pad:
            video = torch.cat([video, video[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        x = self.patch_embed(video.transpose(1, 2))  # [B, D, t, h, w]
        _, _, t, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, t*h*w, D]
        x = x + self._pos_embed(t, h, w, x.device).to(x.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        tokens = x[:, 1:] if self.cls_token is not None else x
        steps = tokens.reshape(b, t, h * w, -1).mean(dim=2)  # [B, t, D]
        clip = x[:, 0] if self.cls_token is not None else tokens.mean(dim=1)
        if self.temporal_derivative:
            steps = with_temporal_derivative(steps, dim=1)
            clip = torch.cat([clip, steps[..., self.width:].mean(dim=1)], dim=-1)
        frames = steps.repeat_interleave(self.tubelet, dim=1)[:, :n_frames]
        return StudentOutput(clip=clip, frames=frames)


# ---------------------------------------------------------------------------------------------------------
# Building, saving, loading


def build_student(cfg: StudentConfig) -> nn.Module:
    if min(cfg.frames, cfg.image_size) < 1:
        raise ValueError("student.frames and student.image_size are 0 (take them from the KEY): resolve them "
                         "against the KEY first (training.train.resolve_student)")
    if cfg.arch == "r2plus1d":
        return R2Plus1DStudent(cfg)
    return VideoViTStudent(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def save_student(model: nn.Module, cfg: StudentConfig, folder: str | Path) -> Path:
    """Write `model.safetensors` and `student_config.json` (with the preset sizes written out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = cfg.resolved()
    # save_model drops duplicate names of shared tensors, which save_file refuses.
    save_model(unwrap_model(model), str(folder / WEIGHTS_FILE),
               metadata={"format": "pt", "student_config": json.dumps(resolved.to_dict(), sort_keys=True)})
    (folder / CONFIG_FILE).write_text(json.dumps(resolved.to_dict(), indent=2, sort_keys=True) + "\n")
    return folder


def load_student(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, StudentConfig]:
    """Rebuild the student from `student_config.json` and load its weights strictly."""
    folder = Path(folder)
    cfg = StudentConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    model = build_student(cfg)
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return model.to(device), cfg


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "StudentConfig", "StudentOutput", "R2Plus1DStudent", "VideoViTStudent",
    "build_student", "count_parameters", "save_student", "load_student", "unwrap_model", "video_to_input",
    "sincos_3d",
]
