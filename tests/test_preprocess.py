"""feature_store.preprocess against transformers' own image processors (Pillow backend), plus unit tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from feature_store.preprocess import (  # noqa: E402
    normalize,
    output_size,
    resample_name,
    resize_crop,
    resolve_preprocess,
    with_input_size,
)
from feature_store.spec import PreprocessSpec  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_SQUARE_32 = {"height": 32, "width": 32}

# Tiny versions of each family's processor settings (the real ones differ only in the numbers).
PROCESSORS = {
    "clip": lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=_SQUARE_32),
    "siglip": lambda: transformers.SiglipImageProcessor(size=_SQUARE_32),
    "dinov2": lambda: transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size=_SQUARE_32,
                                                     image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)),
    "vit": lambda: transformers.ViTImageProcessor(size=_SQUARE_32),
    "deit": lambda: transformers.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size=_SQUARE_32),
}
# Landscape and portrait downscales, a strong downscale and an upscale.
FRAME_SIZES = [(48, 64), (90, 60), (240, 320), (20, 24)]

# Measured on this machine (Pillow 13.0, torch 2.13) over PROCESSORS x FRAME_SIZES x {random, smooth}:
# mean |ours - transformers| <= 7.2e-4 in normalised units (most cases below 1e-4), max 2 uint8 levels.
# The differences are rounding: Pillow resamples with fixed-point coefficients and rounds to uint8
# between its two passes, and the order of its passes is only approximated here (see
# preprocess._vertical_first). The bound leaves ~3x headroom on the mean, while a one-pixel crop shift
# or a swapped channel order gives a mean difference of at least 0.03 (0.2+ on the smooth images;
# heavily downscaled noise is nearly flat grey).
MEAN_TOL = 2e-3
MAX_LEVELS = 3


def _random(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _smooth(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Sums of low-frequency sinusoids per channel: photo-like gradients with no aliasing."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, 3))
    for i in range(n):
        freq, phase = rng.uniform(1, 4, size=(3, 2)), rng.uniform(0, 2 * np.pi, size=3)
        for c in range(3):
            out[i, ..., c] = 127.5 + 120 * np.sin(2 * np.pi * (freq[c, 0] * xx + freq[c, 1] * yy) + phase[c])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def saved_processors(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("processors")
    out = {}
    for name, make in PROCESSORS.items():
        processor = make()
        processor.save_pretrained(root / name)
        out[name] = (root / name, processor)
    return out


@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_matches_transformers_image_processor(saved_processors, name, kind):
    folder, processor = saved_processors[name]
    spec = resolve_preprocess(str(folder))
    rng = np.random.default_rng(0)
    for h, w in FRAME_SIZES:
        frames = (_random if kind == "random" else _smooth)(3, h, w, rng)
        expected = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        ours = normalize(resize_crop(torch.from_numpy(frames), spec), spec)
        assert ours.shape == expected.shape == (3, 3, 32, 32)
        diff = (ours - expected).abs()
        assert diff.mean() <= MEAN_TOL, (h, w, diff.mean())
        levels = diff * torch.tensor(spec.std).view(1, 3, 1, 1) * 255
        assert levels.max() <= MAX_LEVELS + 1e-3, (h, w, levels.max())


def test_nearest_matches_pillow_exactly(tmp_path):
    processor = transformers.ViTImageProcessor(size=_SQUARE_32, resample=0)
    processor.save_pretrained(tmp_path)
    spec = resolve_preprocess(str(tmp_path))
    assert spec.resample == "nearest"
    frames = _random(2, 90, 60, np.random.default_rng(1))
    expected = processor(images=list(frames), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalize(resize_crop(torch.from_numpy(frames), spec), spec), expected,
                               atol=1e-6, rtol=0)


def _write_config(folder: Path, preprocessor: dict, model_type: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(folder)


def test_resolve_clip_legacy_config(tmp_path):
    # openai/clip-vit-base-patch16's preprocessor_config.json: ints for size and crop_size.
    folder = _write_config(tmp_path, {
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 3, "size": 224}, "clip")
    assert resolve_preprocess(folder) == PreprocessSpec(
        resize=224, crop=224, mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic", resize_mode="shortest_edge")
    assert resolve_preprocess(folder, size=336).resize == resolve_preprocess(folder, size=336).crop == 336


def test_resolve_siglip_resizes_to_a_square_without_crop(tmp_path):
    folder = _write_config(tmp_path, {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 384, "width": 384},
        "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, "siglip")
    spec = resolve_preprocess(folder)
    assert (spec.resize, spec.crop, spec.resize_mode, spec.resample) == (384, 384, "square", "bicubic")
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert (resolve_preprocess(folder, size=224).resize, resolve_preprocess(folder, size=224).crop) == (224, 224)


def test_resolve_dinov2_scales_resize_with_size(tmp_path):
    # facebook/dinov2-small's preprocessor_config.json.
    folder = _write_config(tmp_path, {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(IMAGENET_MEAN),
        "image_processor_type": "BitImageProcessor", "image_std": list(IMAGENET_STD), "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 256}}, "dinov2")
    spec = resolve_preprocess(folder)
    assert (spec.resize, spec.crop, spec.resize_mode) == (256, 224, "shortest_edge")
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    small = resolve_preprocess(folder, size=112)
    assert (small.resize, small.crop) == (128, 112)
    assert resolve_preprocess(folder, size=518).resize == 592  # 256 / 224 * 518 = 591.9


def test_resolve_vit_legacy_int_size_is_square(tmp_path):
    # google/vit-base-patch16-224: "size": 224 means 224 x 224 for ViT (default_to_square).
    folder = _write_config(tmp_path, {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2, "size": 224}, "vit")
    assert resolve_preprocess(folder) == PreprocessSpec(
        resize=224, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3, resample="bilinear", resize_mode="square")


def test_resolve_siglip2_naflex(tmp_path):
    folder = _write_config(tmp_path, {
        "image_processor_type": "Siglip2ImageProcessor", "patch_size": 16, "max_num_patches": 256}, "siglip2")
    spec = resolve_preprocess(folder)
    assert (spec.resize, spec.crop, spec.resize_mode, spec.resample) == (256, 256, "square", "bilinear")
    assert resolve_preprocess(folder, size=384).crop == 384
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resolve_preprocess(folder, size=200)


@pytest.mark.parametrize("preprocessor, model_type, message", [
    ({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.875},
     "convnext", "crop_pct"),
    ({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
      "crop_size": {"height": 224, "width": 224}, "resample": 1}, "clip", "lanczos"),
    ({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}, "do_center_crop": False},
     "clip", "non-square"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 320}}, "vit", "non-square"),
])
def test_resolve_refuses_what_it_cannot_reproduce(tmp_path, preprocessor, model_type, message):
    folder = _write_config(tmp_path, preprocessor, model_type)
    with pytest.raises(ValueError, match=message):
        resolve_preprocess(folder)


def test_resample_names_and_input_size():
    assert [resample_name(code) for code in (0, 2, 3)] == ["nearest", "bilinear", "bicubic"]
    assert resample_name("BICUBIC") == "bicubic"
    with pytest.raises(ValueError, match="lanczos"):
        resample_name(1)
    spec = PreprocessSpec(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert with_input_size(spec, 448) == PreprocessSpec(resize=512, crop=448, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError):
        with_input_size(spec, 0)


def test_output_size_follows_transformers():
    spec = PreprocessSpec(resize=224, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert output_size(720, 1280, spec) == (224, 398)  # long side truncated: 398.2
    assert output_size(1280, 720, spec) == (398, 224)
    assert output_size(100, 100, spec) == (224, 224)
    square = PreprocessSpec(resize=224, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="square")
    assert output_size(720, 1280, square) == (224, 224)


def test_resize_crop_shapes_and_errors():
    spec = PreprocessSpec(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    frames = torch.from_numpy(_random(40, 50, 70, np.random.default_rng(2)))  # more than one internal chunk
    out = resize_crop(frames, spec)
    assert out.dtype == torch.uint8 and out.shape == (40, 32, 32, 3)
    torch.testing.assert_close(out[17:18], resize_crop(frames[17:18], spec))  # frames are independent
    # A frame already at the crop size passes through unchanged.
    same = torch.from_numpy(_random(2, 32, 32, np.random.default_rng(3)))
    assert torch.equal(resize_crop(same, PreprocessSpec(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)),
                       same)
    with pytest.raises(ValueError, match="uint8"):
        resize_crop(frames.float(), spec)
    with pytest.raises(ValueError, match="uint8"):
        resize_crop(frames.permute(0, 3, 1, 2), spec)
    with pytest.raises(ValueError, match="larger than"):
        resize_crop(frames, PreprocessSpec(resize=32, crop=40, mean=(0.5,) * 3, std=(0.5,) * 3,
                                           resize_mode="square"))


def test_normalize_layout_and_values():
    spec = PreprocessSpec(resize=2, crop=2, mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.125))
    frames = torch.zeros((1, 2, 2, 3), dtype=torch.uint8)
    frames[0, 0, 1] = torch.tensor([255, 0, 51], dtype=torch.uint8)  # one pixel: red plus a little blue
    out = normalize(frames, spec)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([(1 - 0.25) / 0.5, (0 - 0.5) / 0.25,
                                                              (0.2 - 0.75) / 0.125]))
    torch.testing.assert_close(out[0, :, 1, 0], torch.tensor([-0.5, -2.0, -6.0]))
    assert normalize(frames, spec, dtype=torch.float16).dtype == torch.float16
