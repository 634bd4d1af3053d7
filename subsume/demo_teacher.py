"""A small CLIP image tower for the demo, taught appearance and position on frames of the sample generator.

Nothing can be downloaded in the demo, and a randomly initialised tiny CLIP maps every image to nearly the
same direction (cosine ~0.997 between different images): a weak teacher. So the demo builds a small
`CLIPVisionModelWithProjection` and trains it briefly, with linear heads on `image_embeds`, to tell the
shape, the colour and the coarse position (cell of a 3x3 grid) of single frames. The heads are thrown
away; what is saved is an ordinary Hugging Face checkpoint (weights, config, image processor) that loads
with `CLIPVisionModelWithProjection.from_pretrained(folder)` like a hub model. The teacher knows
appearance and where things are, never motion: telling the direction is left to the video student.
"""

from __future__ import annotations

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

from subsume import sample_data

# The standard CLIP normalisation, so the checkpoint looks like any CLIP to the pipeline.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INFO_FILE = "demo_teacher.json"
HEAD_CLASSES = {"shape": len(sample_data.SHAPES), "colour": len(sample_data.COLOUR_NAMES),
                "position": sample_data.GRID * sample_data.GRID}


@dataclass(frozen=True)
class DemoTeacherConfig:
    """Model size and training schedule; the defaults train in about a minute on 2 CPU cores."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    mlp_ratio: int = 2
    projection_dim: int = 48
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    train_images: int = 6144  # rendered once, sampled with replacement
    eval_images: int = 768  # held out, rendered from another seed
    sincos_init: float = 1.0  # scale of the 2D sine-cosine start of the position embeddings (0: CLIP's init)

    @property
    def eval_seed(self) -> int:
        return self.seed + 1


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


@torch.no_grad()
def _evaluate(model: CLIPVisionModelWithProjection, heads: nn.ModuleDict, images: np.ndarray,
              labels: dict[str, np.ndarray], batch_size: int = 256) -> dict[str, float]:
    """Accuracy per head, plus the mean cosine between embeddings of different images."""
    model.eval()
    embeds = torch.cat([model(pixel_values=normalize_images(images[i:i + batch_size])).image_embeds
                        for i in range(0, len(images), batch_size)])
    out = {name: float((head(embeds).argmax(-1).numpy() == labels[name]).mean())
           for name, head in heads.items()}
    unit = nn.functional.normalize(embeds, dim=-1)
    n = len(unit)
    cos = unit @ unit.T
    out["mean_cosine_between_images"] = float((cos.sum() - cos.diagonal().sum()) / max(1, n * (n - 1)))
    return out


def train_demo_teacher(cfg: DemoTeacherConfig = DemoTeacherConfig(), *,
                       log: Callable[[str], None] = print,
                       ) -> tuple[CLIPVisionModelWithProjection, nn.ModuleDict, dict]:
    """Build the tiny CLIP from `cfg.seed`, train it with linear heads on `image_embeds`.

    Returns (model in eval mode, heads, report). Only the model is saved; the heads are for diagnostics.
    """
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = CLIPVisionModelWithProjection(clip_vision_config(cfg))
    if cfg.sincos_init:
        _init_sincos_positions(model, scale=cfg.sincos_init)
    heads = nn.ModuleDict({name: nn.Linear(cfg.projection_dim, k) for name, k in HEAD_CLASSES.items()})

    images, labels = sample_data.render_training_images(cfg.train_images, seed=cfg.seed, size=cfg.image_size)
    eval_images, eval_labels = sample_data.render_training_images(cfg.eval_images, seed=cfg.eval_seed,
                                                                  size=cfg.image_size)
    targets = {name: torch.from_numpy(v) for name, v in labels.items()}

    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    batches = torch.Generator().manual_seed(cfg.seed)
    loss_fn = nn.CrossEntropyLoss()
    log_every = max(1, cfg.steps // 8)
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=batches)
        embeds = model(pixel_values=normalize_images(images[idx.numpy()])).image_embeds
        losses = {name: loss_fn(head(embeds), targets[name][idx]) for name, head in heads.items()}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            log(f"demo teacher step {step + 1}/{cfg.steps}: loss {loss.item():.3f} ({parts})")

    n_train_eval = min(len(images), cfg.eval_images)
    train_metrics = _evaluate(model, heads, images[:n_train_eval],
                              {k: v[:n_train_eval] for k, v in labels.items()})
    held_out = _evaluate(model, heads, eval_images, eval_labels)
    model.eval()
    seconds = time.perf_counter() - started
    log("demo teacher held-out accuracy: " + ", ".join(f"{k} {held_out[k]:.3f}" for k in HEAD_CLASSES)
        + f" ({seconds:.0f} s)")
    report = {
        "what": "tiny CLIPVisionModelWithProjection trained from scratch on synthetic frames "
                "(subsume.sample_data) to tell shape, colour and 3x3 position cell from image_embeds; "
                "the linear heads were discarded. It knows appearance and position, not motion.",
        "config": asdict(cfg),
        "chance": {k: 1.0 / n for k, n in HEAD_CLASSES.items()},
        "train_accuracy": {k: train_metrics[k] for k in HEAD_CLASSES},
        "held_out_accuracy": {k: held_out[k] for k in HEAD_CLASSES},
        "held_out_seed": cfg.eval_seed,
        "held_out_images": cfg.eval_images,
        "mean_cosine_between_images": held_out["mean_cosine_between_images"],
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, heads, report


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
    """Train (about a minute on 2 cores with the defaults) and save the demo teacher into `out_dir`.

    Returns `out_dir` at once, without training, when `out_dir/demo_teacher.json` exists already.
    `overrides`: other `DemoTeacherConfig` fields (e.g. batch_size, train_images, eval_images).
    """
    out_dir = Path(out_dir)
    if (out_dir / INFO_FILE).exists():
        log(f"demo teacher: found {out_dir / INFO_FILE}, not retraining")
        return out_dir
    cfg = replace(DemoTeacherConfig(), seed=seed, image_size=image_size, steps=steps, **overrides)
    model, _, report = train_demo_teacher(cfg, log=log)
    return save_demo_teacher(model, report, out_dir)
