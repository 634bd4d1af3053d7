"""feature_store.teacher on real (tiny, random) transformers models saved to and loaded from temp folders.

Each family's model and a matching image processor are `save_pretrained`-ed, loaded back through
`load_teacher`, and `Teacher.embed` is compared with the model's own output on pixel values made by the
checkpoint's image processor (not by our normalize).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from feature_store.spec import TeacherSpec  # noqa: E402
from feature_store.teacher import (  # noqa: E402
    describe_teacher,
    load_teacher,
    select_weight_files,
    weights_fingerprint,
)

CROP, PATCH, HIDDEN = 32, 8, 32
GRID = CROP // PATCH  # native 4 x 4 patch grid
ATOL = 1e-5
_VISION = dict(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               image_size=CROP, patch_size=PATCH)
_TEXT = dict(vocab_size=99, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=16)
_IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


@dataclass
class Family:
    """A tiny checkpoint, what load_teacher should make of it, and the model's own reference outputs."""

    build: Callable[[], tuple[torch.nn.Module, object]]  # -> (model, image processor)
    output_used: str
    reference: Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, processor outputs) -> embeds
    hidden: Callable[[torch.nn.Module, dict], torch.Tensor]  # -> the vision tower's last hidden state
    prefix: int  # leading non-patch tokens in `hidden`
    output: str = "auto"


def _clip():
    cfg = transformers.CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=24)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})
    return transformers.CLIPModel(cfg), proc


def _clip_vision_proj():
    cfg = transformers.CLIPVisionConfig(**_VISION, projection_dim=24)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})
    return transformers.CLIPVisionModelWithProjection(cfg), proc


def _siglip():
    cfg = transformers.SiglipConfig(text_config=_TEXT, vision_config=_VISION)
    return transformers.SiglipModel(cfg), transformers.SiglipImageProcessor(size={"height": CROP, "width": CROP})


def _siglip_vision():
    cfg = transformers.SiglipVisionConfig(**_VISION)
    return transformers.SiglipVisionModel(cfg), transformers.SiglipImageProcessor(size={"height": CROP, "width": CROP})


def _siglip2():
    vision = {k: v for k, v in _VISION.items() if k != "image_size"} | {"num_patches": GRID * GRID}
    cfg = transformers.Siglip2Config(text_config=_TEXT, vision_config=vision)
    # max_num_patches 20 on a square frame gives the full 4 x 4 grid plus 4 padding patches in the reference,
    # which the teacher leaves out: the comparison also checks that padding does not change the result.
    proc = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=20)
    return transformers.Siglip2Model(cfg), proc


def _dinov2():
    cfg = transformers.Dinov2Config(**{k: v for k, v in _VISION.items() if k != "intermediate_size"})
    proc = transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": CROP, "width": CROP},
                                          **_IMAGENET)
    return transformers.Dinov2Model(cfg), proc


def _dinov2_registers():
    cfg = transformers.Dinov2WithRegistersConfig(
        **{k: v for k, v in _VISION.items() if k != "intermediate_size"}, num_register_tokens=4)
    proc = transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": CROP, "width": CROP},
                                          **_IMAGENET)
    return transformers.Dinov2WithRegistersModel(cfg), proc


def _vit():
    cfg = transformers.ViTConfig(**_VISION)
    return transformers.ViTModel(cfg), transformers.ViTImageProcessor(size={"height": CROP, "width": CROP})


def _vit_classifier():
    cfg = transformers.ViTConfig(**_VISION, num_labels=3)
    proc = transformers.ViTImageProcessor(size={"height": CROP, "width": CROP})
    return transformers.ViTForImageClassification(cfg), proc


def _deit():  # the "anything else" fallback: pooler_output; CLS + distillation token before the patches
    cfg = transformers.DeiTConfig(**_VISION)
    proc = transformers.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": CROP, "width": CROP})
    return transformers.DeiTModel(cfg), proc


def _lhs(module, inputs):
    return module(**inputs).last_hidden_state


FAMILIES = {
    "CLIPModel": Family(_clip, "image_embeds", lambda m, i: m.get_image_features(**i).pooler_output,
                        lambda m, i: _lhs(m.vision_model, i), prefix=1),
    "CLIPVisionModelWithProjection": Family(_clip_vision_proj, "image_embeds", lambda m, i: m(**i).image_embeds,
                                            lambda m, i: _lhs(m, i), prefix=1),
    "SiglipModel": Family(_siglip, "image_embeds", lambda m, i: m.get_image_features(**i).pooler_output,
                          lambda m, i: _lhs(m.vision_model, i), prefix=0),
    "SiglipVisionModel": Family(_siglip_vision, "pooler", lambda m, i: m(**i).pooler_output,
                                lambda m, i: _lhs(m, i), prefix=0),
    "Siglip2Model": Family(_siglip2, "image_embeds", lambda m, i: m.get_image_features(**i).pooler_output,
                           lambda m, i: _lhs(m.vision_model, i), prefix=0),
    "Dinov2Model": Family(_dinov2, "cls", lambda m, i: _lhs(m, i)[:, 0], lambda m, i: _lhs(m, i), prefix=1),
    "Dinov2WithRegistersModel": Family(
        _dinov2_registers, "cls+mean_patch",
        lambda m, i: torch.cat([_lhs(m, i)[:, 0], _lhs(m, i)[:, 5:].mean(1)], dim=-1),
        lambda m, i: _lhs(m, i), prefix=5, output="cls+mean_patch"),
    "ViTModel": Family(_vit, "cls", lambda m, i: _lhs(m, i)[:, 0], lambda m, i: _lhs(m, i), prefix=1),
    "ViTForImageClassification": Family(_vit_classifier, "cls", lambda m, i: _lhs(m.vit, i)[:, 0],
                                        lambda m, i: _lhs(m.vit, i), prefix=1),
    "DeiTModel": Family(_deit, "pooler", lambda m, i: m(**i).pooler_output, lambda m, i: _lhs(m, i), prefix=2),
}


def _frames(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, CROP, CROP, 3), dtype=np.uint8)


def _reference_inputs(processor, frames: np.ndarray) -> dict:
    """The checkpoint's own image processor on frames that are already at the crop size."""
    kwargs = {} if "Siglip2" in type(processor).__name__ else {"do_resize": False, "do_center_crop": False}
    return dict(processor(images=list(frames), return_tensors="pt", **kwargs))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module, object]]:
    """Every family saved once per module: name -> (folder, model in eval mode, image processor)."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    out = {}
    for name, family in FAMILIES.items():
        model, processor = family.build()
        model.eval()
        folder = root / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        out[name] = (folder, model, processor)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_embed_matches_the_models_own_output(saved, name):
    family = FAMILIES[name]
    folder, model, processor = saved[name]
    teacher = load_teacher(TeacherSpec(model=str(folder), output=family.output), device="cpu")
    assert teacher.model_class == name
    assert teacher.output_used == family.output_used

    frames = _frames()
    out = teacher.embed(frames)
    with torch.inference_mode():
        expected = family.reference(model, _reference_inputs(processor, frames))
    assert out.embeds.dtype == torch.float32 and out.embeds.device.type == "cpu"
    assert out.embeds.shape == expected.shape == (3, teacher.embed_dim)
    assert out.patch_grid is None and teacher.patch_dim is None
    torch.testing.assert_close(out.embeds, expected, atol=ATOL, rtol=0)
    # Distinct random frames give distinct embeddings (a constant output would pass the shape checks).
    assert (out.embeds[0] - out.embeds[1]).abs().max() > 1e-3


def test_embed_accepts_tensors_and_batches(saved):
    folder = saved["CLIPVisionModelWithProjection"][0]
    teacher = load_teacher(TeacherSpec(model=str(folder)), device="cpu")
    frames = _frames(5, seed=1)
    whole = teacher.embed(frames)
    torch.testing.assert_close(teacher.embed(torch.from_numpy(frames)).embeds, whole.embeds)
    torch.testing.assert_close(teacher.embed_batched(frames, batch_size=2).embeds, whole.embeds,
                               atol=ATOL, rtol=0)
    assert teacher.embed(frames[:0]).embeds.shape == (0, teacher.embed_dim)
    with pytest.raises(ValueError, match="uint8"):
        teacher.embed(frames[:, :16, :16])  # not resize_crop'd to the teacher's input size
    with pytest.raises(ValueError, match="uint8"):
        teacher.embed(frames.astype(np.float32))


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel", "Siglip2Model", "Dinov2WithRegistersModel",
                                  "ViTModel", "DeiTModel"])
def test_patch_grid_pools_the_patch_tokens(saved, name):
    family = FAMILIES[name]
    folder, model, processor = saved[name]
    frames = _frames(2, seed=2)
    with torch.inference_mode():
        hidden = family.hidden(model, _reference_inputs(processor, frames))
    # (SigLIP2's reference input carries 4 padding patches after the 16 real ones.)
    patches = hidden[:, family.prefix:family.prefix + GRID * GRID].reshape(2, GRID, GRID, -1)
    # 4 x 4 -> 2 x 2 by hand: average each 2 x 2 block of patch tokens.
    manual = patches.reshape(2, 2, 2, 2, 2, -1).mean(dim=(2, 4))

    teacher = load_teacher(TeacherSpec(model=str(folder), output=family.output, patch_grid=2), device="cpu")
    out = teacher.embed(frames)
    assert teacher.patch_dim == hidden.shape[-1]
    assert out.patch_grid.shape == (2, 2, 2, teacher.patch_dim)
    torch.testing.assert_close(out.patch_grid, manual, atol=ATOL, rtol=0)

    full = load_teacher(TeacherSpec(model=str(folder), output=family.output, patch_grid=GRID), device="cpu")
    torch.testing.assert_close(full.embed(frames).patch_grid, patches, atol=ATOL, rtol=0)


def test_describe_teacher_matches_the_loaded_teacher(saved):
    folder = saved["DeiTModel"][0]
    spec = TeacherSpec(model=str(folder), patch_grid=2)
    info, teacher = describe_teacher(spec, size=48), load_teacher(spec, size=48, device="cpu")
    assert (info.fingerprint, info.model_class, info.output_used, info.embed_dim, info.patch_dim, info.preprocess) == (
        teacher.fingerprint, "DeiTModel", "pooler", HIDDEN, HIDDEN, teacher.preprocess)
    assert (info.preprocess.resize, info.preprocess.crop) == (54, 48)  # DeiT's 36/32, scaled


def test_patch_grid_larger_than_the_native_grid_is_refused(saved):
    folder = saved["ViTModel"][0]
    with pytest.raises(ValueError, match="exceeds"):
        load_teacher(TeacherSpec(model=str(folder), patch_grid=GRID + 1), device="cpu")


def test_explicit_outputs(saved):
    folder, model, processor = saved["CLIPModel"]
    frames = _frames(2, seed=3)
    inputs = _reference_inputs(processor, frames)
    with torch.inference_mode():
        vision = model.vision_model(**inputs)
    pooler = load_teacher(TeacherSpec(model=str(folder), output="pooler"), device="cpu")
    assert pooler.output_used == "pooler" and pooler.embed_dim == HIDDEN
    torch.testing.assert_close(pooler.embed(frames).embeds, vision.pooler_output, atol=ATOL, rtol=0)
    cls = load_teacher(TeacherSpec(model=str(folder), output="cls"), device="cpu")
    torch.testing.assert_close(cls.embed(frames).embeds, vision.last_hidden_state[:, 0], atol=ATOL, rtol=0)

    siglip = saved["SiglipVisionModel"][0]
    with pytest.raises(ValueError, match="no CLS token"):
        load_teacher(TeacherSpec(model=str(siglip), output="cls"), device="cpu")
    with pytest.raises(ValueError, match="unknown output"):
        load_teacher(TeacherSpec(model=str(folder), output="mean"), device="cpu")


def test_size_override_interpolates_position_embeddings(saved):
    folder, model, processor = saved["ViTModel"]
    teacher = load_teacher(TeacherSpec(model=str(folder)), size=48, device="cpu")
    assert teacher.preprocess.crop == 48
    frames = np.random.default_rng(4).integers(0, 256, size=(2, 48, 48, 3), dtype=np.uint8)
    inputs = _reference_inputs(processor, frames)
    with torch.inference_mode():
        expected = model(**inputs, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    torch.testing.assert_close(teacher.embed(frames).embeds, expected, atol=ATOL, rtol=0)


def test_bf16_autocast_stays_close_to_fp32(saved):
    folder = saved["ViTModel"][0]
    frames = _frames(4, seed=5)
    fp32 = load_teacher(TeacherSpec(model=str(folder)), device="cpu").embed(frames).embeds
    bf16 = load_teacher(TeacherSpec(model=str(folder)), device="cpu", precision="bf16").embed(frames).embeds
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # autocast really ran in reduced precision
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.99


def test_fingerprint_is_stable_and_follows_the_weights(saved, tmp_path):
    folder, model, processor = saved["ViTModel"]
    first = load_teacher(TeacherSpec(model=str(folder)), device="cpu")
    second = load_teacher(TeacherSpec(model=str(folder)), device="cpu")
    assert first.fingerprint == second.fingerprint == weights_fingerprint(folder)
    assert len(first.fingerprint) == 64

    changed = transformers.ViTModel.from_pretrained(folder)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3  # one number in one tensor
    changed.save_pretrained(tmp_path / "changed")
    processor.save_pretrained(tmp_path / "changed")
    assert load_teacher(TeacherSpec(model=str(tmp_path / "changed")), device="cpu").fingerprint != first.fingerprint

    # Files transformers would not load are not part of the fingerprint.
    (tmp_path / "changed" / "training_args.bin").write_bytes(b"not weights")
    assert weights_fingerprint(tmp_path / "changed") == weights_fingerprint(tmp_path / "changed")
    unchanged = tmp_path / "copy"
    unchanged.mkdir()
    for f in folder.iterdir():
        (unchanged / f.name).write_bytes(f.read_bytes())
    (unchanged / "training_args.bin").write_bytes(b"not weights")
    assert weights_fingerprint(unchanged) == first.fingerprint


def test_select_weight_files_follows_transformers_preference():
    hub = ["model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "tf_model.h5",
           "onnx/model.safetensors", "config.json"]
    assert select_weight_files(hub) == ["model.safetensors"]
    sharded = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors",
               "model.safetensors.index.json", "training_args.bin"]
    assert select_weight_files(sharded) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert select_weight_files(["pytorch_model.bin", "training_args.bin"]) == ["pytorch_model.bin"]
    assert select_weight_files(["weights.safetensors", "readme.md"]) == ["weights.safetensors"]
    assert select_weight_files(["config.json"]) == []


_REMOTE_CONFIG = """
    from transformers import PretrainedConfig

    class TinyPatchConfig(PretrainedConfig):
        model_type = "tiny-patch-test"

        def __init__(self, hidden_size=16, patch_size=8, image_size=32, **kwargs):
            super().__init__(**kwargs)
            self.hidden_size, self.patch_size, self.image_size = hidden_size, patch_size, image_size
"""
_REMOTE_MODEL = """
    import torch
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from .configuration_tiny_patch import TinyPatchConfig

    class TinyPatchModel(PreTrainedModel):
        config_class = TinyPatchConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size)
            self.post_init()

        def forward(self, pixel_values, **kwargs):
            tokens = self.proj(pixel_values).flatten(2).transpose(1, 2)
            return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.amax(dim=1))
"""


def test_remote_code_runs_only_when_trusted(tmp_path):
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "configuration_tiny_patch.py").write_text(textwrap.dedent(_REMOTE_CONFIG))
    (folder / "modeling_tiny_patch.py").write_text(textwrap.dedent(_REMOTE_MODEL))
    config = {"model_type": "tiny-patch-test", "architectures": ["TinyPatchModel"], "hidden_size": 16,
              "patch_size": 8, "image_size": 32,
              "auto_map": {"AutoConfig": "configuration_tiny_patch.TinyPatchConfig",
                           "AutoModel": "modeling_tiny_patch.TinyPatchModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    weight, bias = torch.randn(16, 3, 8, 8) * 0.1, torch.randn(16) * 0.1
    save_file({"proj.weight": weight, "proj.bias": bias}, str(folder / "model.safetensors"))
    transformers.ViTImageProcessor(size={"height": CROP, "width": CROP}).save_pretrained(folder)

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_teacher(TeacherSpec(model=str(folder)), device="cpu")  # the default is not to trust

    teacher = load_teacher(TeacherSpec(model=str(folder), trust_remote_code=True, patch_grid=2), device="cpu")
    assert teacher.model_class == "TinyPatchModel" and teacher.output_used == "pooler"
    frames = _frames(2, seed=6)
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # ViT mean = std = 0.5
    tokens = torch.nn.functional.conv2d(pixels, weight, bias, stride=8).flatten(2).transpose(1, 2)
    out = teacher.embed(frames)
    torch.testing.assert_close(out.embeds, tokens.amax(dim=1), atol=ATOL, rtol=0)
    assert out.patch_grid.shape == (2, 2, 2, 16)  # no prefix token: all 16 tokens are patches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the overlapped host-to-device path runs only on CUDA")
def test_overlapped_batches_on_cuda_equal_one_batch_at_a_time(saved):
    from feature_store.spec import TeacherSpec as Spec

    folder = saved[next(iter(saved))][0]
    teacher = load_teacher(Spec(model=str(folder)), device="cuda")
    frames = np.random.default_rng(0).integers(0, 256, (37, CROP, CROP, 3), dtype=np.uint8)
    together = teacher.embed_batched(frames, 8).embeds
    one_by_one = torch.cat([teacher.embed(frames[i:i + 8]).embeds for i in range(0, 37, 8)])
    torch.testing.assert_close(together, one_by_one)
