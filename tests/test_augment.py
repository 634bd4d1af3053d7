"""Spatial augmentation consistent with cached targets (training/augment.py): pure logic on synthetic tensors,
plus the consistency measurement on a tiny real (random) CLIP loaded from disk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks import augment_consistency as consistency
from training import augment
from training.config import AugmentConfig


def _batch(b=3, length=4, s=32, g=4, dp=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (b, length, s, s, 3), generator=gen, dtype=torch.uint8)
    targets = torch.randn(b, length, 7, generator=gen)
    patches = torch.randn(b, length, g, g, dp, generator=gen)
    return frames, targets, patches


def test_off_is_the_identity_and_draws_nothing():
    frames, targets, patches = _batch()
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    f, y = augment.augment_views(frames, targets, patches, AugmentConfig(), gen)
    assert f is frames and y is targets
    assert torch.equal(gen.get_state(), state)
    assert augment.target_space(AugmentConfig()) == "embeds"


@pytest.mark.parametrize("cfg", [AugmentConfig(brightness=0.2), AugmentConfig(random_crop_scale=0.5),
                                 AugmentConfig(brightness=0.1, random_crop_scale=0.75)])
def test_deterministic_given_the_generator(cfg):
    frames, targets, patches = _batch(b=6)
    a = augment.augment_views(frames, targets, patches, cfg, torch.Generator().manual_seed(5))
    b = augment.augment_views(frames, targets, patches, cfg, torch.Generator().manual_seed(5))
    c = augment.augment_views(frames, targets, patches, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_brightness_keeps_shape_dtype_targets_and_one_factor_per_view():
    b, length, s = 8, 5, 16
    # Each frame of a clip a different flat grey: per-frame factors would show as different ratios.
    levels = torch.linspace(60, 180, length).round()
    frames = levels.view(1, length, 1, 1, 1).expand(b, length, s, s, 3).to(torch.uint8).contiguous()
    targets = torch.randn(b, length, 7)
    cfg = AugmentConfig(brightness=0.3)
    f, y = augment.augment_views(frames, targets, None, cfg, torch.Generator().manual_seed(0))
    assert f.dtype == torch.uint8 and f.shape == frames.shape
    assert y is targets  # brightness never touches targets
    params = augment.sample_view_params(b, cfg, torch.Generator().manual_seed(0))
    factors = params.brightness
    assert factors.shape == (b,) and ((factors >= 0.7) & (factors <= 1.3)).all()
    assert factors.std() > 0.01  # different clips, different factors
    expected = (levels.view(1, length) * factors.view(b, 1)).round().clamp(0, 255)
    assert torch.equal(f[..., 0, 0, 0].float(), expected)  # the same factor for every frame of a clip
    assert (f == f[:, :, :1, :1, :1]).all()  # and every pixel and channel


def _cell_id_frames(b, length, s, g):
    """Frames whose pixels in grid cell (r, c) all have the value 10 * r + c + 1."""
    ids = (10 * torch.arange(g)[:, None] + torch.arange(g)[None, :] + 1).to(torch.uint8)
    cell = s // g
    img = ids.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # [S, S]
    return img.view(1, 1, s, s, 1).expand(b, length, s, s, 3).contiguous(), ids


def test_crop_frames_and_targets_come_from_the_same_cells():
    b, length, s, g, dp = 16, 3, 32, 4, 6
    frames, ids = _cell_id_frames(b, length, s, g)
    # Integer-valued patch grids, different per frame: the mean of any cells is exact in float32.
    patches = torch.randint(-50, 50, (b, length, g, g, dp)).float()
    cfg = AugmentConfig(random_crop_scale=0.5)
    f, y = augment.augment_views(frames, torch.zeros(b, length, 9), patches, cfg, torch.Generator().manual_seed(3))
    params = augment.sample_view_params(b, cfg, torch.Generator().manual_seed(3), grid=g)
    assert y.shape == (b, length, dp) and y.dtype == torch.float32
    seen_k = set()
    for i in range(b):
        row, col, k = (int(v) for v in params.crop[i])
        assert 2 <= k <= g and 0 <= row <= g - k and 0 <= col <= g - k
        seen_k.add(k)
        expected = patches[i, :, row:row + k, col:col + k].mean(dim=(1, 2))
        torch.testing.assert_close(y[i], expected, rtol=0, atol=1e-6)
        # The centre of output cell (u, v) shows input cell (row + u, col + v).
        for u in range(k):
            for v in range(k):
                py, px = int((u + 0.5) * s / k), int((v + 0.5) * s / k)
                assert f[i, 0, py, px, 0] == ids[row + u, col + v]
    assert seen_k == {2, 3, 4}


def test_crop_targets_exact_mean_of_selected_cells():
    patches = torch.arange(2 * 1 * 3 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 3, 2)
    crop = torch.tensor([[1, 0, 2], [0, 0, 3]])
    y = augment.crop_targets(patches, crop)
    assert torch.equal(y[0, 0], patches[0, 0, 1:3, 0:2].reshape(-1, 2).mean(0))
    assert torch.equal(y[1, 0], augment.grid_mean_targets(patches[1, 0]))


def test_crop_needs_patch_grids_and_changes_the_target_space():
    frames, targets, _ = _batch()
    cfg = AugmentConfig(random_crop_scale=0.75)
    with pytest.raises(ValueError, match="patch grids"):
        augment.augment_views(frames, targets, None, cfg, torch.Generator().manual_seed(0))
    assert augment.target_space(cfg) == "patch_mean"
    with pytest.raises(ValueError):
        augment.target_space(AugmentConfig(brightness=1.5))


def test_no_flip_rotation_or_colour_jitter_is_offered():
    names = {f.name for f in dataclasses.fields(AugmentConfig)}
    for word in ("flip", "hue", "rot", "colour", "color", "saturation"):
        assert not any(word in n for n in names), f"AugmentConfig offers {word!r}"
    assert {"horizontal flip", "colour jitter / hue"} <= set(augment.FORBIDDEN)
    # Behaviour: a left-to-right ramp stays increasing under any drawn crop + brightness (a flip would not).
    s, b = 32, 32
    ramp = torch.arange(s, dtype=torch.float32).mul(7).view(1, 1, 1, s, 1).expand(b, 2, s, s, 3)
    ramp = ramp.to(torch.uint8).contiguous()
    cfg = AugmentConfig(brightness=0.2, random_crop_scale=0.5)
    f, _ = augment.augment_views(ramp, torch.zeros(b, 2, 3), torch.zeros(b, 2, 4, 4, 3), cfg,
                                 torch.Generator().manual_seed(0))
    rows = f[:, :, :, :, 0].float()
    assert (rows[..., 1:] >= rows[..., :-1]).all()
    assert (rows[..., -1] > rows[..., 0]).all()
    assert (rows[:, :, 1:] == rows[:, :, :1]).all()  # nothing vertical either


def test_min_crop_cells():
    assert augment.min_crop_cells(0.75, 8) == 6
    assert augment.min_crop_cells(0.7, 8) == 6
    assert augment.min_crop_cells(0.01, 8) == 1
    assert augment.min_crop_cells(1.0, 8) == 8


def test_measure_consistency_on_a_tiny_random_clip(tiny_teacher):
    from feature_store.spec import TeacherSpec
    from feature_store.teacher import load_teacher
    from subsume.sample_data import render_video, video_params

    teacher = load_teacher(TeacherSpec(model=str(tiny_teacher), patch_grid=4), size=32, device="cpu")
    videos = np.stack([render_video(p) for p in video_params(3, seed=2, size=32, frames=4)])
    result = consistency.measure_consistency(teacher, videos, brightness=(0.2,), crop_scales=(0.5,),
                                         hue_degrees=(120.0,), batch_size=64)
    rows = {(r["augmentation"], r["parameters"], r["space"], r["target"]): r for r in result["rows"]}
    assert rows[("identity", "-", "embeds", "unchanged")]["cos_standardised"] == pytest.approx(1.0, abs=1e-6)
    crop = [r for r in result["rows"] if r["augmentation"] == "random resized crop"]
    assert {(r["space"], r["target"]) for r in crop} == {("embeds", "unchanged"), ("patch_mean", "unchanged"),
                                                          ("patch_mean", "pooled under the crop")}
    for r in result["rows"]:
        assert -1.0 <= r["cos_standardised"] <= 1.0 and -1.0 <= r["cos_centred"] <= 1.0
    flip = rows[("horizontal flip", "always", "embeds", "unchanged")]
    assert flip["cos_standardised"] < 0.999  # the teacher does see a flip (the frames are not symmetric)
    ref = result["reference"]
    assert ref["other video, same time"]["cos_standardised"] < ref["adjacent frame, same video"]["cos_standardised"]
    assert "| brightness |" in consistency.format_table(result)
