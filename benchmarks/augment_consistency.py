"""The measurement that decides which augmentations training offers (docs/method.md, "Augmentation
consistency (measured)"): the teacher's cosine between plain and augmented frames, per augmentation and
strength. Research code, outside the packages the product imports; run from the repository root:

    python -m benchmarks.augment_consistency --teacher FOLDER
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from training.augment import crop_frames, crop_targets, grid_mean_targets, min_crop_cells


# --- measurement ------------------------------------------------------------------------------------------

def hue_rotate(frames: np.ndarray, degrees: float) -> np.ndarray:
    """uint8 [..., 3] rotated in hue about the grey axis (the usual luminance-preserving matrix)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    m = np.array([
        [0.213 + c * 0.787 - s * 0.213, 0.715 - c * 0.715 - s * 0.715, 0.072 - c * 0.072 + s * 0.928],
        [0.213 - c * 0.213 + s * 0.143, 0.715 + c * 0.285 + s * 0.140, 0.072 - c * 0.072 - s * 0.283],
        [0.213 - c * 0.213 - s * 0.787, 0.715 - c * 0.715 + s * 0.715, 0.072 + c * 0.928 + s * 0.072],
    ], np.float32)
    return np.clip(np.rint(frames.astype(np.float32) @ m.T), 0, 255).astype(np.uint8)


def jpeg_roundtrip(frames: np.ndarray, quality: int) -> np.ndarray:
    """The frames through the store's own JPEG encoding and back."""
    from feature_store.shards import decode_frames, encode_frames

    return decode_frames(encode_frames(frames, "jpeg", jpeg_quality=quality), "jpeg", len(frames))


def down_up(frames: np.ndarray, factor: int) -> np.ndarray:
    """What a student at 1/factor of the teacher's resolution sees, brought back to the teacher's size."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    s = x.shape[-1]
    small = F.interpolate(x, size=(s // factor, s // factor), mode="bilinear", antialias=True, align_corners=False)
    back = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    return back.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)


def _cosines(a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict[str, float]:
    """Cosines of [N, D] pairs after centring on `mean`, and after standardising (what the loss sees)."""
    a, b = a.double(), b.double()
    centred = F.cosine_similarity(a - mean, b - mean, dim=-1)
    standard = F.cosine_similarity((a - mean) / std, (b - mean) / std, dim=-1)
    return {"cos_centred": round(float(centred.mean()), 4), "cos_standardised": round(float(standard.mean()), 4),
            "cos_standardised_p05": round(float(standard.quantile(0.05)), 4)}


def measure_consistency(teacher: Any, videos: np.ndarray, *,
                        brightness: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3),
                        crop_scales: tuple[float, ...] = (0.875, 0.75, 0.5),
                        hue_degrees: tuple[float, ...] = (30.0, 120.0), jpeg_quality: int = 90,
                        student_downscale: int = 2, seed: int = 0, batch_size: int = 256) -> dict[str, Any]:
    """The teacher's cosine between plain and augmented frames, per augmentation and strength.

    videos: uint8 [V, T, S, S, 3] at the teacher's crop. Embeddings are centred on the plain frames' mean
    (and standardised with their std, as training does with the KEY's stats) before the cosine; a raw
    cosine is ~1 for anything with a tiny random teacher. Scale: the same statistic between frames of one
    video 1 and T // 2 apart, and between videos. Crops (with a teacher loaded with patch_grid > 0) are
    measured three ways: embedding target unchanged, patch-mean target unchanged, and patch-mean target
    pooled from the plain frame's grid under the box (the design used; compared with the teacher's full-grid
    patch mean on the cropped frame, which is what an online teacher would give).
    """
    if videos.dtype != np.uint8 or videos.ndim != 5:
        raise ValueError(f"expected uint8 videos [V, T, S, S, 3], got {videos.dtype} {videos.shape}")
    v, t, s = videos.shape[:3]
    if v < 2 or t < 2:
        raise ValueError("need at least 2 videos of at least 2 frames")
    frames = videos.reshape(v * t, s, s, 3)
    rng = np.random.default_rng(seed)

    def embed(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = teacher.embed_batched(np.ascontiguousarray(x), batch_size)
        return out.embeds, out.patch_grid

    plain, plain_grid = embed(frames)
    mean, std = _stats(plain)
    rows: list[dict[str, Any]] = []

    def add(name: str, params: str, a: torch.Tensor, b: torch.Tensor, space: str = "embeds",
            target: str = "unchanged", stats: tuple[torch.Tensor, torch.Tensor] = (mean, std)) -> None:
        rows.append({"augmentation": name, "parameters": params, "space": space, "target": target,
                     **_cosines(a, b, *stats)})

    per_video = plain.view(v, t, -1)
    gap = max(1, t // 2)
    reference = {
        "adjacent frame, same video": _cosines(per_video[:, 1:].reshape(-1, plain.shape[-1]),
                                               per_video[:, :-1].reshape(-1, plain.shape[-1]), mean, std),
        f"frame {gap} apart, same video": _cosines(per_video[:, gap:].reshape(-1, plain.shape[-1]),
                                                   per_video[:, :-gap].reshape(-1, plain.shape[-1]), mean, std),
        "other video, same time": _cosines(plain, per_video.roll(1, dims=0).reshape(-1, plain.shape[-1]), mean, std),
    }
    add("identity", "-", embed(frames)[0], plain)

    for b in brightness:
        for factor in (1.0 - b, 1.0 + b):
            aug = np.clip(np.rint(frames.astype(np.float32) * factor), 0, 255).astype(np.uint8)
            add("brightness", f"b={b:g}: factor {factor:g}", embed(aug)[0], plain)

    transforms: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
        ("horizontal flip", "always", lambda x: x[:, :, ::-1]),
        ("rotation", "90 degrees", lambda x: np.rot90(x, 1, axes=(1, 2))),
        *[("hue rotation", f"{d:g} degrees", lambda x, d=d: hue_rotate(x, d)) for d in hue_degrees],
        ("JPEG re-encoding", f"quality {jpeg_quality}", lambda x: jpeg_roundtrip(x, jpeg_quality)),
        ("student resolution < teacher crop", f"1/{student_downscale} and back (bilinear)",
         lambda x: down_up(x, student_downscale)),
    ]
    for name, params, fn in transforms:
        add(name, params, embed(np.ascontiguousarray(fn(frames)))[0], plain)

    grid = int(plain_grid.shape[1]) if plain_grid is not None else 0
    if grid:
        plain_mean = grid_mean_targets(plain_grid)
        patch_stats = _stats(plain_mean)
        for scale in crop_scales:
            k = min_crop_cells(scale, grid)
            pos = rng.integers(0, grid - k + 1, size=(v, 2))  # one box per video, as in training
            crop = torch.from_numpy(np.repeat(np.concatenate([pos, np.full((v, 1), k)], axis=1), t, axis=0))
            x = torch.from_numpy(frames).float()[:, None]  # [N, 1, S, S, 3]: one "clip" per frame, its own box
            aug = crop_frames(x, crop, grid)[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
            aug_embeds, aug_grid = embed(aug)
            params = f"{k}x{k} of {grid}x{grid} cells (scale {scale:g})"
            add("random resized crop", params, aug_embeds, plain)
            add("random resized crop", params, grid_mean_targets(aug_grid), plain_mean, space="patch_mean",
                stats=patch_stats)
            pooled = crop_targets(plain_grid[:, None], crop)[:, 0]
            add("random resized crop", params, grid_mean_targets(aug_grid), pooled, space="patch_mean",
                target="pooled under the crop", stats=patch_stats)
    return {"teacher": getattr(teacher, "model_class", type(teacher).__name__),
            "output": getattr(teacher, "output_used", None), "patch_grid": grid, "videos": v,
            "frames_per_video": t, "size": s, "reference": reference, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    lines = ["| augmentation | parameters | space | target | cos centred | cos standardised (p05) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["reference"].items():
        lines.append(f"| (scale) {name} | - | embeds | - | {r['cos_centred']:.4f} | "
                     f"{r['cos_standardised']:.4f} ({r['cos_standardised_p05']:.4f}) |")
    for r in result["rows"]:
        lines.append(f"| {r['augmentation']} | {r['parameters']} | {r['space']} | {r['target']} | "
                     f"{r['cos_centred']:.4f} | {r['cos_standardised']:.4f} ({r['cos_standardised_p05']:.4f}) |")
    return "\n".join(lines)


def save_random_clip(folder: str, *, image_size: int, seed: int = 0) -> str:
    """A tiny randomly initialised CLIPVisionModelWithProjection checkpoint (the contrast to a trained one)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure the teacher's cosine between plain and augmented frames "
                                            "of demo videos (subsume.sample_data).")
    p.add_argument("--teacher", help="teacher checkpoint folder (or hub id); omit with --random-teacher")
    p.add_argument("--random-teacher", action="store_true", help="a tiny random CLIP instead")
    p.add_argument("--patch-grid", type=int, default=8, help="G for the crop rows (0: no crop rows)")
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    if bool(args.teacher) == args.random_teacher:
        p.error("give exactly one of --teacher or --random-teacher")

    from feature_store.spec import TeacherSpec
    from feature_store.teacher import load_teacher
    from subsume.sample_data import render_video, video_params

    params = video_params(args.videos, seed=args.seed + 1000, size=args.size, frames=args.frames)
    videos = np.stack([render_video(vp) for vp in params])
    with tempfile.TemporaryDirectory() as tmp:
        model = args.teacher or save_random_clip(tmp, image_size=args.size, seed=args.seed)
        teacher = load_teacher(TeacherSpec(model=model, patch_grid=args.patch_grid), size=args.size, device="cpu")
        result = measure_consistency(teacher, videos, seed=args.seed)
    result["teacher_model"] = "random tiny CLIP" if args.random_teacher else args.teacher
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
