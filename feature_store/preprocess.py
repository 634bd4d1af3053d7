"""The teacher's resize / centre-crop / normalise, batched in torch.

`resolve_preprocess` turns a checkpoint's `preprocessor_config.json` into a `PreprocessSpec`. It lets
transformers' own image processor read the file (hub id or local folder), so legacy forms (`"size": 224`),
class defaults for missing keys and per-class conventions are interpreted by the library, then maps the
processor's settings onto the two geometries we support:

- "shortest_edge" (CLIP, DINOv2/BiT): shorter side to `resize` (aspect kept), centre crop `crop` x `crop`.
- "square" (SigLIP, ViT, DeiT): both sides to `resize` (aspect not kept), centre crop (often a no-op).
- SigLIP2 NaFlex processors pick an aspect-preserving patch grid per image; on our square frames that grid
  is square with side patch_size * floor(sqrt(max_num_patches)), so it maps to "square" too.

Anything else (crop_pct conventions, padding, non-square outputs, Lanczos/box filters) raises instead of
being approximated silently.

`resize_crop` replicates the Pillow backend's geometry with `torch.nn.functional.interpolate(antialias=True)`,
whose bilinear/bicubic kernels follow Pillow's (bicubic a = -0.5, filter support widened when
downscaling), in two separable passes rounded to uint8 in between as Pillow does. What remains is rounding:
at most 2 uint8 levels, usually none (tests/test_preprocess.py measures it against transformers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from feature_store.spec import PreprocessSpec

# Pillow's integer filter codes (PIL.Image.Resampling) as stored in preprocessor configs.
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Pillow's NEAREST samples the source pixel whose centre is nearest, which is torch's "nearest-exact".
_TORCH_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}
RESIZE_MODES = ("shortest_edge", "square")

# Frames per interpolate call: bounds the float32 copy of full-resolution video frames.
_RESIZE_CHUNK = 16


def resolve_preprocess(model: str, *, size: int | None = None, revision: str | None = None) -> PreprocessSpec:
    """The preprocessing `model`'s own image processor applies, as a PreprocessSpec.

    size: input size override (the crop); the resize grows in proportion, e.g. DINOv2's 256/224.
    """
    from transformers import AutoImageProcessor

    # The Pillow backend: its geometry is what resize_crop mirrors (the settings read are the same in both).
    processor = AutoImageProcessor.from_pretrained(model, revision=revision, backend="pil")
    spec = spec_from_image_processor(processor)
    return spec if size is None else with_input_size(spec, size, patch_size=_naflex_patch_size(processor))


def spec_from_image_processor(processor: Any) -> PreprocessSpec:
    """Map a transformers (Pillow-backend) image processor's settings onto a PreprocessSpec."""
    name = type(processor).__name__
    if getattr(processor, "do_pad", False):
        raise ValueError(f"{name}: padding image processors are not supported")
    if getattr(processor, "crop_pct", None) is not None:
        raise ValueError(f"{name}: the crop_pct convention is not supported")
    if not getattr(processor, "do_resize", True):
        raise ValueError(f"{name}: do_resize=False gives frame-size-dependent inputs; not supported")

    patch_size = _naflex_patch_size(processor)
    if patch_size is not None:
        side = patch_size * math.isqrt(int(processor.max_num_patches))
        resize, crop, mode = side, side, "square"
    else:
        _check_plain_geometry(processor)
        resize, mode = _resize_from_size(name, processor.size)
        crop_size = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop_size is not None:
            if crop_size.height != crop_size.width:
                raise ValueError(f"{name}: non-square crop {crop_size.height}x{crop_size.width} is not supported")
            crop = int(crop_size.height)
        elif mode == "square":
            crop = resize
        else:
            raise ValueError(f"{name}: shortest-edge resize without a centre crop gives non-square inputs")
        if crop > resize:
            raise ValueError(f"{name}: crop {crop} larger than resize {resize} (the processor would zero-pad)")

    if getattr(processor, "do_rescale", True):
        if not math.isclose(float(processor.rescale_factor), 1 / 255, rel_tol=1e-6):
            raise ValueError(f"{name}: rescale_factor {processor.rescale_factor} != 1/255 is not supported")
    else:
        raise ValueError(f"{name}: do_rescale=False is not supported")
    if getattr(processor, "do_normalize", True):
        mean, std = _triple(processor.image_mean), _triple(processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    return PreprocessSpec(resize=resize, crop=crop, mean=mean, std=std,
                          resample=resample_name(processor.resample), resize_mode=mode)


def with_input_size(spec: PreprocessSpec, size: int, *, patch_size: int | None = None) -> PreprocessSpec:
    """`spec` with crop `size` and the resize scaled by the same factor (round half to even)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if patch_size is not None and size % patch_size:
        raise ValueError(f"size {size} must be a multiple of the patch size {patch_size}")
    resize = max(size, round(spec.resize * size / spec.crop))
    return PreprocessSpec(resize=resize, crop=size, mean=spec.mean, std=spec.std,
                          resample=spec.resample, resize_mode=spec.resize_mode)


def resample_name(resample: Any) -> str:
    """A Pillow filter code (int or PIL.Image.Resampling) or a name as one of bilinear/bicubic/nearest."""
    if isinstance(resample, str):
        name = resample.lower()
    elif getattr(resample, "value", None) is not None and isinstance(resample.value, str):
        name = resample.value.lower()  # torchvision InterpolationMode
    else:
        name = PIL_RESAMPLE_NAMES.get(int(resample), str(resample))
    if name not in _TORCH_MODES:
        raise ValueError(f"resample filter {name!r} is not supported (only {sorted(_TORCH_MODES)})")
    return name


def output_size(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(height, width) after the resize step, as transformers computes it (long side truncated)."""
    if spec.resize_mode == "square":
        return spec.resize, spec.resize
    if spec.resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {spec.resize_mode!r}; expected one of {RESIZE_MODES}")
    short, long = min(height, width), max(height, width)
    new_long = int(spec.resize * long / short)
    return (new_long, spec.resize) if height > width else (spec.resize, new_long)


def resize_crop(frames: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, crop, crop, 3] on the same device: resize, then centre crop."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    n, height, width, _ = frames.shape
    out_h, out_w = output_size(height, width, spec)
    if spec.crop > min(out_h, out_w):
        raise ValueError(f"crop {spec.crop} larger than the resized frame {out_h}x{out_w}")
    top, left = (out_h - spec.crop) // 2, (out_w - spec.crop) // 2
    mode = _TORCH_MODES[resample_name(spec.resample)]
    out = torch.empty((n, spec.crop, spec.crop, 3), dtype=torch.uint8, device=frames.device)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = frames[start:start + _RESIZE_CHUNK].permute(0, 3, 1, 2).float()
        chunk = _resize(chunk, out_h, out_w, mode)
        chunk = chunk[:, :, top:top + spec.crop, left:left + spec.crop]
        out[start:start + _RESIZE_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def _resize(x: torch.Tensor, out_h: int, out_w: int, mode: str) -> torch.Tensor:
    """Pillow-like separable resize of float [N, 3, H, W] in 0..255.

    Pillow resizes 8-bit images in two passes and rounds/clamps to uint8 between them; doing the same keeps
    bicubic overshoot on high-contrast detail within a level of Pillow's (one float pass differed by up to
    ~20 levels on noise). A pass along an unchanged axis is skipped (it would be the identity).
    """
    if mode == "nearest-exact":
        return F.interpolate(x, size=(out_h, out_w), mode=mode) if x.shape[-2:] != (out_h, out_w) else x
    height, width = x.shape[-2:]
    passes = [(height, out_w), (out_h, out_w)]
    if _vertical_first(height, width, out_h, out_w):
        passes = [(out_h, width), (out_h, out_w)]
    for i, size in enumerate(passes):
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
            if i == 0:
                x = x.round_().clamp_(0, 255)
    return x


def _vertical_first(height: int, width: int, out_h: int, out_w: int) -> bool:
    """Which pass Pillow (13) runs first; only matters for rounding between the passes.

    Fitted on Pillow 13.0 outputs, as its C code does not document the rule: vertical first when the height
    shrinks and the width grows (exact on every case tried); when both shrink, when the height shrinks
    clearly more (factor 1.4). That is horizontal first for landscape frames and vertical first for portrait
    frames squashed to a square, as Pillow does; on other shapes a wrong guess costs about one level on a
    fraction of pixels.
    """
    if out_h >= height:
        return False
    if out_w > width:
        return True
    return height * out_w > 1.4 * out_h * width


def normalize(frames: torch.Tensor, spec: PreprocessSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> [N, 3, S, S] as (x / 255 - mean) / std, on the frames' device."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [N, S, S, 3], got {frames.dtype} {tuple(frames.shape)}")
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(mean).div_(std).to(dtype).contiguous()


def _naflex_patch_size(processor: Any) -> int | None:
    """The patch size of a SigLIP2-style (max_num_patches) processor, else None."""
    if getattr(processor, "max_num_patches", None) is None or getattr(processor, "patch_size", None) is None:
        return None
    return int(processor.patch_size)


def _check_plain_geometry(processor: Any) -> None:
    """Only processors that use their backend's own resize / crop / pipeline are understood here."""
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    cls = type(processor)
    backend = next((b for b in (PilBackend, TorchvisionBackend) if isinstance(processor, b)), None)
    if backend is None:
        raise ValueError(f"{cls.__name__}: not a transformers Pillow or torchvision image processor")
    for method in ("resize", "center_crop", "_preprocess"):
        if getattr(cls, method) is not getattr(backend, method):
            raise ValueError(f"{cls.__name__} overrides {method}(); its preprocessing is not supported")


def _resize_from_size(name: str, size: Any) -> tuple[int, str]:
    if size is None:
        raise ValueError(f"{name}: no size in the preprocessor config")
    if size.shortest_edge and not size.longest_edge:
        return int(size.shortest_edge), "shortest_edge"
    if size.height and size.width and not size.shortest_edge:
        if size.height != size.width:
            raise ValueError(f"{name}: non-square resize {size.height}x{size.width} is not supported")
        return int(size.height), "square"
    raise ValueError(f"{name}: unsupported size {size}")


def _triple(value: Any) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {value}")
    return values[0], values[1], values[2]
