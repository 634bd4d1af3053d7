"""A small CLIP image tower for the demo, pretrained self-supervised on still images of another world.

Nothing can be downloaded in the demo, and a randomly initialised tiny CLIP maps every image to nearly the
same direction (cosine ~0.997 between different images): a weak teacher. So the demo builds a small
`CLIPVisionModelWithProjection` and pretrains it the way real image teachers are pretrained, without
labels: SimCLR (two augmented views of each image - random resized crop, horizontal flip, brightness,
contrast and saturation jitter - are pulled together and pushed away from the other images' views, through
a projection head that is thrown away). It sees only `subsume.pretrain_images`: other shapes, any colour
of the hue circle, other backgrounds; never a frame of the evaluation videos, never a label. What it knows
about the evaluation videos is then measured, not assumed: frozen probes on its embeddings of held-out
frames (`subsume.frame_probe`), next to the same architecture at random init, recorded in
`demo_teacher.json`. What is saved is an ordinary Hugging Face checkpoint (weights, config, image
processor) that loads with `CLIPVisionModelWithProjection.from_pretrained(folder)` like a hub model.
Hue is not jittered: a real teacher tells colours apart, and so should this one.

`objective="supervised"` instead trains the way ImageNet-supervised teachers are built: a linear head on
the image embedding names which of the pretraining world's own shapes (`PRETRAIN_SHAPES`, one object per
image, `render_labelled_images`) is drawn, on augmented views; the head is thrown away. Those labels are a
different task on a different distribution: still never a circle, square or triangle, never an evaluation label.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from subsume import frame_probe, pretrain_images

# The standard CLIP normalisation, so the checkpoint looks like any CLIP to the pipeline.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INFO_FILE = "demo_teacher.json"
_NEVER = ("It never saw a frame of the evaluation videos nor any of their labels; `probe` measures what it "
          "knows about them.")
WHAT = {
    "simclr": "tiny CLIPVisionModelWithProjection pretrained from scratch with SimCLR (NT-Xent, projection head "
              "discarded) on unlabelled still images of subsume.pretrain_images: shapes other than the "
              "evaluation's circle/square/triangle, any hue, other backgrounds. " + _NEVER,
    "supervised": "tiny CLIPVisionModelWithProjection trained from scratch to name which of "
                  "subsume.pretrain_images' own 8 shapes (none a circle, square or triangle) an image shows "
                  "(linear head on image_embeds, discarded), on augmented images with any hue and other "
                  "backgrounds. " + _NEVER,
}


@dataclass(frozen=True)
class DemoTeacherConfig:
    """Model size, pretraining schedule and augmentations; the defaults train in about two minutes on 2 CPU
    cores."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    mlp_ratio: int = 2
    projection_dim: int = 48
    # "simclr": NT-Xent on unlabelled images (measured: knows no shape); "supervised": name the pretraining
    # world's own shape (8 classes, none of them the evaluation's), not yet measured at full schedule.
    objective: str = "simclr"
    steps: int = 600
    batch_size: int = 64  # images per step (SimCLR: each gives two views)
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    train_images: int = 6144  # rendered once by subsume.pretrain_images
    temperature: float = 0.2  # of the NT-Xent loss
    head_hidden: int = 128  # the projection head (thrown away)
    head_dim: int = 64
    crop_scale: tuple[float, float] = (0.3, 1.0)  # area of the random resized crop (supervised trial: 0.5)
    jitter: float = 0.4  # brightness, contrast and saturation factors in [1 - jitter, 1 + jitter]
    greyscale_p: float = 0.0  # probability of a greyscale view (SimCLR uses 0.2; it trades colour for shape)
    sincos_init: float = 1.0  # scale of the 2D sine-cosine start of the position embeddings (0: CLIP's init)
    probe: frame_probe.ProbeConfig = frame_probe.ProbeConfig()


def clip_vision_config(cfg: DemoTeacherConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_ratio * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, projection_dim=cfg.projection_dim,
    )


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2D sine-cosine position code (MAE), row-major like CLIP's patches."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    code = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(code, (0, dim - code.shape[1]))


@torch.no_grad()
def _init_sincos_positions(model: CLIPVisionModelWithProjection, scale: float) -> None:
    """Start the (trainable) position embeddings from a 2D sine-cosine code: CLIP's default init (std
    0.02) is small next to the patch embeddings, and the tiny model then takes long to learn where
    things are."""
    emb = model.vision_model.embeddings
    grid = emb.image_size // emb.patch_size
    weight = emb.position_embedding.weight
    weight.zero_()
    weight[1:] = scale * sincos_2d(grid, weight.shape[1])  # row 0 is the class token's


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] with CLIP's mean/std (what the saved processor does)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _lr_factor(step: int, cfg: DemoTeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _crop_grids(n: int, cfg: DemoTeacherConfig, gen: torch.Generator) -> torch.Tensor:
    """[n, H, W, 2] sampling grids: random resized crop (area `crop_scale`, aspect 3/4..4/3) and a
    horizontal flip with probability 1/2."""
    area = torch.empty(n).uniform_(*cfg.crop_scale, generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    size = (n, 3, cfg.image_size, cfg.image_size)
    return nn.functional.affine_grid(theta, size, align_corners=False)


def _jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of [N, 3, H, W] in [0, 1]; hue is left alone."""
    n = x.shape[0]

    def factor() -> torch.Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(1 - strength, 1 + strength, generator=gen)

    x = x * factor()
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = grey.mean((2, 3), keepdim=True) + (x - grey.mean((2, 3), keepdim=True)) * factor()
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return (grey + (x - grey) * factor()).clamp(0.0, 1.0)


def augment(images: np.ndarray, cfg: DemoTeacherConfig, gen: torch.Generator) -> torch.Tensor:
    """One augmented view per uint8 [N, H, W, 3] image, CLIP-normalised [N, 3, S, S]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = nn.functional.grid_sample(x, _crop_grids(len(x), cfg, gen), mode="bilinear", padding_mode="reflection",
                                  align_corners=False)
    x = _jitter(x, cfg.jitter, gen)
    if cfg.greyscale_p:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < cfg.greyscale_p, grey, x)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2N - 1 other views of the batch."""
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return nn.functional.cross_entropy(logits, partner)


def projection_head(cfg: DemoTeacherConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(cfg.projection_dim, cfg.head_hidden), nn.BatchNorm1d(cfg.head_hidden),
                         nn.ReLU(), nn.Linear(cfg.head_hidden, cfg.head_dim))


def build_model(cfg: DemoTeacherConfig) -> CLIPVisionModelWithProjection:
    """The teacher at its random initialisation (deterministic in cfg.seed)."""
    torch.manual_seed(cfg.seed)
    model = CLIPVisionModelWithProjection(clip_vision_config(cfg))
    if cfg.sincos_init:
        _init_sincos_positions(model, scale=cfg.sincos_init)
    return model


def embedder(model: CLIPVisionModelWithProjection, batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
    """images uint8 [N, H, W, 3] -> image_embeds float32 [N, D], as the pipeline computes them."""
    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        model.eval()
        return torch.cat([model(pixel_values=normalize_images(images[i:i + batch_size])).image_embeds
                          for i in range(0, len(images), batch_size)]).numpy()
    return embed


def _optimise(model: CLIPVisionModelWithProjection, head: nn.Module, cfg: DemoTeacherConfig,
              step_loss: Callable[[torch.Generator], torch.Tensor], log: Callable[[str], None]) -> list[float]:
    """AdamW with warm-up and cosine decay over cfg.steps of `step_loss(gen)`; returns the loss per step."""
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    log_every = max(1, cfg.steps // 8)
    losses = []
    model.train()
    head.train()
    for step in range(cfg.steps):
        loss = step_loss(gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log(f"demo teacher step {step + 1}/{cfg.steps}: {cfg.objective} loss {loss.item():.3f}")
    model.eval()
    return losses


def pretrain(model: CLIPVisionModelWithProjection, images: np.ndarray, cfg: DemoTeacherConfig,
             log: Callable[[str], None]) -> list[float]:
    """SimCLR on unlabelled `images` for cfg.steps; returns the loss per step. The head is discarded."""
    head = projection_head(cfg)

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        batch = images[torch.randint(0, len(images), (cfg.batch_size,), generator=gen).numpy()]
        views = torch.cat([augment(batch, cfg, gen), augment(batch, cfg, gen)])
        z = head(model(pixel_values=views).image_embeds)
        return nt_xent(z[:cfg.batch_size], z[cfg.batch_size:], cfg.temperature)

    return _optimise(model, head, cfg, step_loss, log)


def pretrain_supervised(model: CLIPVisionModelWithProjection, images: np.ndarray, labels: np.ndarray,
                        cfg: DemoTeacherConfig, log: Callable[[str], None]) -> list[float]:
    """Classify the pretraining world's shapes (cross-entropy of a linear head on the image embedding, the
    head discarded), on augmented views; returns the loss per step."""
    head = nn.Linear(cfg.projection_dim, len(pretrain_images.PRETRAIN_SHAPES))

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        logits = head(model(pixel_values=augment(images[idx.numpy()], cfg, gen)).image_embeds)
        return nn.functional.cross_entropy(logits, torch.from_numpy(labels)[idx])

    return _optimise(model, head, cfg, step_loss, log)


def _run_objective(model: CLIPVisionModelWithProjection, cfg: DemoTeacherConfig,
                   log: Callable[[str], None]) -> tuple[list[float], float]:
    """Render this objective's images and pretrain; returns (losses, the loss at chance)."""
    if cfg.objective == "supervised":
        images, labels = pretrain_images.render_labelled_images(cfg.train_images, seed=cfg.seed,
                                                                size=cfg.image_size)
        return pretrain_supervised(model, images, labels, cfg, log), math.log(len(pretrain_images.PRETRAIN_SHAPES))
    if cfg.objective == "simclr":
        images = pretrain_images.render_pretrain_images(cfg.train_images, seed=cfg.seed, size=cfg.image_size)
        return pretrain(model, images, cfg, log), math.log(2 * cfg.batch_size - 1)
    raise ValueError(f"unknown objective {cfg.objective!r}; expected 'supervised' or 'simclr'")


def _mean_cosine(embeds: np.ndarray) -> float:
    unit = embeds / (np.linalg.norm(embeds, axis=1, keepdims=True) + 1e-8)
    n = len(unit)
    cos = unit @ unit.T
    return float((cos.sum() - np.trace(cos)) / max(1, n * (n - 1)))


def _summary(probe: dict) -> str:
    parts = []
    for who, res in probe["results"].items():
        parts.append(who + " " + ", ".join(f"{lab} {r['linear']:.2f}/{r['knn']:.2f}" for lab, r in res.items()))
    return "; ".join(parts) + " (linear/kNN, chance " + \
        ", ".join(f"{k} {v:.2f}" for k, v in probe["chance"].items()) + ")"


def train_demo_teacher(cfg: DemoTeacherConfig = DemoTeacherConfig(), *,
                       log: Callable[[str], None] = print) -> tuple[CLIPVisionModelWithProjection, dict]:
    """Build the tiny CLIP from `cfg.seed`, pretrain it (cfg.objective), probe it next to its random init.

    Returns (model in eval mode, report)."""
    started = time.perf_counter()
    model = build_model(cfg)
    random_init = copy.deepcopy(model).eval()
    losses, chance_loss = _run_objective(model, cfg, log)
    train_seconds = time.perf_counter() - started
    probe = frame_probe.probe_models({"teacher": embedder(model), "random_init": embedder(random_init)},
                                     replace(cfg.probe, size=cfg.image_size))
    sample = frame_probe.probe_frames(64, seed=cfg.probe.seed + 1, size=cfg.image_size).images
    log("demo teacher probe on held-out frames of the evaluation videos: " + _summary(probe))
    report = {
        "what": WHAT[cfg.objective],
        "config": asdict(cfg),
        "pretrain_shapes": list(pretrain_images.PRETRAIN_SHAPES),
        "pretrain_loss": {"first": losses[0], "last_50_mean": float(np.mean(losses[-50:])),
                          "chance": chance_loss},
        "probe": probe,
        "mean_cosine_between_frames": {"teacher": _mean_cosine(embedder(model)(sample)),
                                       "random_init": _mean_cosine(embedder(random_init)(sample))},
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, report


def save_demo_teacher(model: CLIPVisionModelWithProjection, report: dict, out_dir: str | Path) -> Path:
    """Write weights, config and a matching CLIP image processor; `demo_teacher.json` last, atomically,
    so its presence means the folder is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    model.save_pretrained(out_dir)  # sets config.architectures to ["CLIPVisionModelWithProjection"]
    processor = _image_processor_class()(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_resize=True,
        do_center_crop=True, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    processor.save_pretrained(out_dir)
    tmp = out_dir / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / INFO_FILE)
    return out_dir


def _image_processor_class() -> type:
    """Without torchvision, transformers 5 falls back (with a warning) from `CLIPImageProcessor` to the
    Pillow class; name that one directly then. Both save `image_processor_type: CLIPImageProcessor`."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor


def build_demo_teacher(out_dir: str | Path, *, seed: int = 0, image_size: int = 64,
                       steps: int = DemoTeacherConfig.steps, log: Callable[[str], None] = print,
                       **overrides) -> Path:
    """Pretrain (about two minutes on 2 cores with the defaults), probe and save the demo teacher into `out_dir`.

    Returns `out_dir` at once, without training, when `out_dir/demo_teacher.json` exists already.
    `overrides`: other `DemoTeacherConfig` fields (e.g. batch_size, train_images, probe).
    """
    out_dir = Path(out_dir)
    if (out_dir / INFO_FILE).exists():
        log(f"demo teacher: found {out_dir / INFO_FILE}, not retraining")
        return out_dir
    cfg = replace(DemoTeacherConfig(), seed=seed, image_size=image_size, steps=steps, **overrides)
    model, report = train_demo_teacher(cfg, log=log)
    return save_demo_teacher(model, report, out_dir)
