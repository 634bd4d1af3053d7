"""A small CLIP image tower for the demo, trained the way real image teachers are: on other images, another task.

Nothing can be downloaded in the demo, and a randomly initialised tiny CLIP maps every image to nearly the
same direction (cosine ~0.997 between different images): a weak teacher. So the demo builds a small
`CLIPVisionModelWithProjection` and trains it on still images of ANOTHER world (`subsume.pretrain_images`:
other shapes - ellipses, rectangles, polygons, stars, crosses, rings, crescents, never a circle, square or
triangle - in any hue, over other backgrounds), supervised on that world's own labels, the way
ImageNet-supervised teachers are built (`objective="supervised"`, the default): linear heads on the image
embedding name which of its 8 shapes is drawn, say where and how big it is in the view and draw its
centred outline, and a linear head on each patch token names the shape (or background) that patch shows.
All heads are thrown away. It never sees a frame of the evaluation videos nor any of their labels. What it
knows about the evaluation videos is then measured, not assumed: frozen probes on its embeddings of
held-out frames (`subsume.frame_probe`), next to the same architecture at random init, recorded in
`demo_teacher.json`. What is saved is an ordinary Hugging Face checkpoint (weights, config, image
processor) that loads with `CLIPVisionModelWithProjection.from_pretrained(folder)` like a hub model.

`objective="simclr"` instead pretrains without labels (SimCLR: two augmented views of each image pulled
together through a projection head that is thrown away); measured on an earlier version of the pretraining
images, it learned colour but not shape (docs/method.md). Augmentations: random resized crop, horizontal
flip, brightness/contrast/saturation jitter; hue is not jittered, because a real teacher tells colours apart.
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
    "supervised": "tiny CLIPVisionModelWithProjection trained from scratch on still images of "
                  "subsume.pretrain_images (one object of 8 shapes, none a circle, square or triangle; any hue; "
                  "other backgrounds), supervised on that world's own labels with linear heads that were "
                  "discarded: which of its shapes (cross-entropy on image_embeds), where and how big in the "
                  "view and its centred outline (squared errors on image_embeds), and per patch token which "
                  "shape or background the patch shows. " + _NEVER,
}


@dataclass(frozen=True)
class DemoTeacherConfig:
    """Model size, pretraining schedule and augmentations (the defaults: see `demo_teacher.json`'s
    train_seconds and train_cpu_seconds for what they took)."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    mlp_ratio: int = 2
    projection_dim: int = 48
    # "supervised": the pretraining world's own labels (shape of 8, none of them the evaluation's; where, how
    # big, outline; per-patch shape); "simclr": NT-Xent on unlabelled images (measured earlier: no shape).
    objective: str = "supervised"
    steps: int = 2000
    batch_size: int = 32  # images per step (SimCLR: each gives two views)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    train_images: int = 2048  # rendered once by subsume.pretrain_images
    temperature: float = 0.2  # of the NT-Xent loss
    head_hidden: int = 128  # the projection head (thrown away)
    head_dim: int = 64
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area of the random resized crop (the SimCLR trial: 0.3)
    geometry_weight: float = 1.0  # supervised: weight of the where-and-how-big term next to naming the shape
    silhouette_weight: float = 4.0  # supervised: weight of the outline term (a mean over 256 cells)
    patch_weight: float = 1.0  # supervised: weight of naming, per patch token, the shape (or background) it shows
    patch_cover: float = 0.25  # a patch shows the object when it covers more than this fraction of it
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


@dataclass(frozen=True)
class Crops:
    """Random resized crops with flips, in normalised coordinates ([-1, 1] across the image): the view's
    point u shows the image's point (flip * w * u_x + cx, h * u_y + cy)."""

    w: torch.Tensor  # [N] width and height of the crop, fractions of the image
    h: torch.Tensor
    cx: torch.Tensor  # [N] centre of the crop
    cy: torch.Tensor
    flip: torch.Tensor  # [N] -1 (mirrored) or 1

    def grids(self, size: int) -> torch.Tensor:
        """[N, size, size, 2] sampling grids for `grid_sample`."""
        theta = torch.zeros(len(self.w), 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = self.w * self.flip, self.cx
        theta[:, 1, 1], theta[:, 1, 2] = self.h, self.cy
        return nn.functional.affine_grid(theta, (len(self.w), 3, size, size), align_corners=False)

    def geometry(self, centre: np.ndarray, radius: np.ndarray, size: int) -> torch.Tensor:
        """[N, 3] where an object at `centre` (pixels [N, 2]) of `radius` (pixels [N]) is in the view:
        x and y in [-1, 1] (outside when cropped away) and the log of its radius as a fraction of the view."""
        c = torch.from_numpy(np.asarray(centre, np.float32)) * (2.0 / size) - 1.0
        r = torch.from_numpy(np.asarray(radius, np.float32)) / size
        x = (c[:, 0] - self.cx) / (self.w * self.flip)
        y = (c[:, 1] - self.cy) / self.h
        return torch.stack([x, y, torch.log(r / (self.w * self.h).sqrt())], dim=1)


def random_crops(n: int, cfg: DemoTeacherConfig, gen: torch.Generator) -> Crops:
    """Random resized crop (area `crop_scale`, aspect 3/4..4/3) and a horizontal flip with probability 1/2."""
    area = torch.empty(n).uniform_(*cfg.crop_scale, generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return Crops(w, h, cx, cy, flip)


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
    return augment_with_crops(images, cfg, gen)[0]


def augment_with_crops(images: np.ndarray, cfg: DemoTeacherConfig,
                       gen: torch.Generator) -> tuple[torch.Tensor, Crops]:
    """`augment`, and the crops it took (to move geometric labels into the views)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    crops = random_crops(len(x), cfg, gen)
    x = nn.functional.grid_sample(x, crops.grids(cfg.image_size), mode="bilinear", padding_mode="reflection",
                                  align_corners=False)
    x = _jitter(x, cfg.jitter, gen)
    if cfg.greyscale_p:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < cfg.greyscale_p, grey, x)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std, crops


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


def supervised_heads(cfg: DemoTeacherConfig) -> nn.ModuleDict:
    """Linear heads on the image embedding for the pretraining world's labels (all thrown away)."""
    grid = pretrain_images.SILHOUETTE
    return nn.ModuleDict({"shape": nn.Linear(cfg.projection_dim, len(pretrain_images.PRETRAIN_SHAPES)),
                          "geometry": nn.Linear(cfg.projection_dim, 3),
                          "silhouette": nn.Linear(cfg.projection_dim, grid * grid),
                          "patches": nn.Linear(cfg.hidden_size, len(pretrain_images.PRETRAIN_SHAPES) + 1)})


def view_silhouettes(silhouettes: np.ndarray, crops: Crops) -> torch.Tensor:
    """[N, S*S]: the objects' centred silhouettes as the views show them (mirrored with the view)."""
    sil = torch.from_numpy(silhouettes)
    return torch.where(crops.flip.view(-1, 1, 1) < 0, sil.flip(-1), sil).flatten(1)


def patch_labels(coverage: np.ndarray, shapes: np.ndarray, crops: Crops, cfg: DemoTeacherConfig) -> torch.Tensor:
    """int64 [N, P]: per patch of the view, 1 + the object's shape where the object covers more than
    cfg.patch_cover of the patch, else 0 (background); patches in the model's row-major order."""
    cover = torch.from_numpy(coverage).float().div(255.0).unsqueeze(1)
    cover = nn.functional.grid_sample(cover, crops.grids(cfg.image_size), mode="bilinear", padding_mode="zeros",
                                      align_corners=False)
    cover = nn.functional.avg_pool2d(cover, cfg.patch_size).flatten(1)
    return torch.where(cover > cfg.patch_cover, torch.from_numpy(shapes)[:, None] + 1, 0)


def pretrain_supervised(model: CLIPVisionModelWithProjection, data: pretrain_images.LabelledImages,
                        cfg: DemoTeacherConfig, log: Callable[[str], None]) -> list[float]:
    """Supervised on the pretraining world's own labels, on augmented views, with linear heads on the
    image embedding that are thrown away: name which of its shapes is drawn (cross-entropy), say where and
    how big it is in the view, and draw its outline (its centred silhouette; squared errors weighted by
    cfg.geometry_weight and cfg.silhouette_weight). Returns the cross-entropy per step (chance: ln 8)."""
    heads = supervised_heads(cfg)
    shape_losses: list[float] = []

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data.images), (cfg.batch_size,), generator=gen).numpy()
        views, crops = augment_with_crops(data.images[idx], cfg, gen)
        out = model(pixel_values=views)
        embeds, tokens = out.image_embeds, out.last_hidden_state[:, 1:]
        shape_loss = nn.functional.cross_entropy(heads["shape"](embeds), torch.from_numpy(data.shape[idx]))
        shape_losses.append(shape_loss.item())
        where = crops.geometry(data.centre[idx], data.radius[idx], cfg.image_size)
        outline = view_silhouettes(data.silhouette[idx], crops)
        parts = patch_labels(data.coverage[idx], data.shape[idx], crops, cfg)
        return (shape_loss + cfg.geometry_weight * nn.functional.mse_loss(heads["geometry"](embeds), where)
                + cfg.silhouette_weight * nn.functional.mse_loss(heads["silhouette"](embeds), outline)
                + cfg.patch_weight * nn.functional.cross_entropy(heads["patches"](tokens).flatten(0, 1),
                                                                 parts.flatten()))

    _optimise(model, heads, cfg, step_loss, log)
    return shape_losses


def _run_objective(model: CLIPVisionModelWithProjection, cfg: DemoTeacherConfig,
                   log: Callable[[str], None]) -> tuple[list[float], float]:
    """Render this objective's images and pretrain; returns (losses, the loss at chance)."""
    if cfg.objective == "supervised":
        data = pretrain_images.render_labelled_images(cfg.train_images, seed=cfg.seed, size=cfg.image_size)
        return pretrain_supervised(model, data, cfg, log), math.log(len(pretrain_images.PRETRAIN_SHAPES))
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
    started, cpu_started = time.perf_counter(), time.process_time()
    model = build_model(cfg)
    random_init = copy.deepcopy(model).eval()
    losses, chance_loss = _run_objective(model, cfg, log)
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
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
        "train_cpu_seconds": round(train_cpu_seconds, 1),  # all threads together: the machine may be shared
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
    """Train (see `demo_teacher.json` for how long it took), probe and save the demo teacher into `out_dir`.

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
