"""Video students: shapes, per-frame outputs, presets, input normalisation, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from training.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    R2Plus1DStudent,
    StudentConfig,
    VideoViTStudent,
    build_student,
    count_parameters,
    load_student,
    save_student,
    sincos_3d,
    video_to_input,
    with_temporal_derivative,
)


def _video(b: int = 2, t: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- config -----------------------------------------------------------------------------------------------


def test_config_roundtrip_and_resolution():
    cfg = StudentConfig(arch="vit", size="small", frames=16, image_size=224, patch=16, pool="cls")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert StudentConfig.from_dict(d) == cfg
    r = cfg.resolved()
    assert (r.dim, r.depth, r.heads) == (384, 12, 6)
    assert StudentConfig.from_dict(r.to_dict()) == r
    assert StudentConfig(arch="vit", size="small", dim=192, heads=3).resolved().dim == 192  # explicit wins
    assert StudentConfig(size="base").resolved().widths == (64, 128, 256, 512)
    assert tuple(StudentConfig().mean) == IMAGENET_MEAN


@pytest.mark.parametrize("bad", [{"arch": "resnet"}, {"size": "huge"}, {"norm": "instance"},
                                 {"pos_embed": "rope"}, {"pool": "max"}, {"std": (1.0, 0.0, 1.0)}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        StudentConfig(**bad)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown"):
        StudentConfig.from_dict({"arch": "vit", "widht": 3})


def test_vit_dim_must_split_into_heads():
    with pytest.raises(ValueError):
        StudentConfig(arch="vit", dim=100, heads=3).resolved()


# --- shapes and per-frame outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["r2plus1d", "vit"])
@pytest.mark.parametrize("frames", [7, 8, 1])
def test_tiny_student_shapes_any_frame_count(arch, frames):
    model = build_student(StudentConfig(arch=arch, size="tiny"))
    out = model(_video(t=frames))
    e = model.embed_dim
    assert out.clip.shape == (2, e) and out.frames.shape == (2, frames, e)
    assert torch.isfinite(out.clip).all() and torch.isfinite(out.frames).all()
    out.clip.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_build_student_picks_the_class():
    assert isinstance(build_student(StudentConfig(arch="r2plus1d")), R2Plus1DStudent)
    assert isinstance(build_student(StudentConfig(arch="vit")), VideoViTStudent)


def test_vit_frames_repeat_within_a_tubelet_and_differ_across():
    model = build_student(StudentConfig(arch="vit", tubelet=2)).eval()
    f = model(_video(t=7)).frames  # tubelets: (0,1) (2,3) (4,5) (6,pad)
    assert torch.equal(f[:, 0], f[:, 1]) and torch.equal(f[:, 4], f[:, 5])
    assert not torch.allclose(f[:, 1], f[:, 2]) and not torch.allclose(f[:, 5], f[:, 6])


def test_vit_odd_frames_pad_by_repeating_the_last_frame():
    model = build_student(StudentConfig(arch="vit", tubelet=2)).eval()
    v7 = _video(t=7)
    v8 = torch.cat([v7, v7[:, -1:]], dim=1)
    with torch.no_grad():
        o7, o8 = model(v7), model(v8)
    torch.testing.assert_close(o7.frames, o8.frames[:, :7])
    torch.testing.assert_close(o7.clip, o8.clip)


def test_r2plus1d_keeps_temporal_resolution():
    """Per-frame outputs follow their own frame: changing only the last frame changes the last output most."""
    model = build_student(StudentConfig(arch="r2plus1d")).eval()
    v = _video(t=8)
    v2 = v.clone()
    v2[:, -1] = torch.randn_like(v2[:, -1])
    with torch.no_grad():
        a, b = model(v).frames, model(v2).frames
    change = (a - b).norm(dim=-1).mean(dim=0)  # [T]
    assert change[-1] > 0 and change[-1] > change[0]
    assert not torch.allclose(a[:, 0], a[:, -1])


@pytest.mark.parametrize("frames", [1, 7, 8])
def test_r2plus1d_temporal_downsample_still_gives_one_output_per_frame(frames):
    strided = build_student(StudentConfig(arch="r2plus1d", temporal_downsample=3))
    plain = build_student(StudentConfig(arch="r2plus1d"))
    assert count_parameters(strided) == count_parameters(plain)  # strides change compute, not weights
    out = strided(_video(t=frames))
    assert out.frames.shape == (2, frames, strided.embed_dim)
    assert torch.isfinite(out.frames).all()
    with pytest.raises(ValueError):
        StudentConfig(arch="r2plus1d", temporal_downsample=4).resolved()


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_r2plus1d_norm_choice(norm):
    model = build_student(StudentConfig(arch="r2plus1d", norm=norm))
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("GroupNorm" in kinds) == (norm == "group") and ("BatchNorm3d" in kinds) == (norm == "batch")
    assert model(_video(t=3)).frames.shape[1] == 3


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_vit_runs_on_other_frame_counts_and_sizes(pos_embed):
    model = build_student(StudentConfig(arch="vit", pos_embed=pos_embed, pool="cls", frames=8, image_size=64))
    for t, size in [(8, 64), (4, 32), (6, 48), (16, 64)]:
        out = model(_video(b=1, t=t, size=size))
        assert out.frames.shape == (1, t, model.embed_dim)
        assert torch.isfinite(out.frames).all()


def test_vit_rejects_size_not_multiple_of_patch():
    model = build_student(StudentConfig(arch="vit", patch=8))
    with pytest.raises(ValueError, match="patch"):
        model(_video(size=36))


def test_students_reject_wrong_layout():
    model = build_student(StudentConfig())
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 8, 32, 32))  # [B, 3, T, H, W] instead of [B, T, 3, H, W]


def test_sincos_3d_positions_are_distinct():
    pe = sincos_3d(64, 4, 3, 5)
    assert pe.shape == (60, 64)
    d = torch.cdist(pe, pe) + torch.eye(60) * 1e3
    assert d.min() > 1e-3


@pytest.mark.parametrize("arch", ["r2plus1d", "vit"])
def test_grad_checkpointing_gives_the_same_result(arch):
    plain = build_student(StudentConfig(arch=arch))
    ckpt = build_student(StudentConfig(arch=arch, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    v = _video(t=4)
    a, b = plain(v), ckpt(v)
    torch.testing.assert_close(a.frames, b.frames)
    a.clip.sum().backward()
    b.clip.sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


# --- position and order: coordinate channels, temporal derivative -----------------------------------------


def test_coord_channels_give_the_stem_pixel_coordinates():
    from training.models import _coord_grid

    grid = _coord_grid(torch.zeros(2, 3, 4, 5, 7))
    assert grid.shape == (2, 2, 4, 5, 7)
    x, y = grid[0, 0, 0], grid[0, 1, 0]
    assert x[0, 0] == -1 and x[0, -1] == 1 and torch.equal(x[0], x[-1])  # x runs along the width
    assert y[0, 0] == -1 and y[-1, 0] == 1 and torch.equal(y[:, 0], y[:, -1])  # y along the height
    plain = build_student(StudentConfig())
    coord = build_student(StudentConfig(coord_channels=True))
    assert plain.stem[0].in_channels == 3 and coord.stem[0].in_channels == 5
    assert coord(_video(t=3)).frames.shape == (2, 3, coord.embed_dim)


def test_coord_channels_are_extra_stem_inputs_and_nothing_else():
    """With the coordinate weights zeroed, a coord model is exactly the plain one; with them, it differs."""
    plain = build_student(StudentConfig()).eval()
    coord = build_student(StudentConfig(coord_channels=True)).eval()
    state = dict(plain.state_dict())
    w = state["stem.0.weight"]
    state["stem.0.weight"] = torch.cat([w, torch.zeros(w.shape[0], 2, *w.shape[2:])], dim=1)
    coord.load_state_dict(state)
    v = _video(t=3)
    with torch.no_grad():
        torch.testing.assert_close(coord(v).frames, plain(v).frames)
        coord.stem[0].weight[:, 3:] = 0.1
        assert not torch.allclose(coord(v).frames, plain(v).frames)


def test_temporal_derivative_of_a_ramp_and_its_reversal():
    steps = torch.arange(5.0)[None, :, None].expand(2, 5, 3)  # [B, T, E], rising by 1 per step
    out = with_temporal_derivative(steps, dim=1)
    assert out.shape == (2, 5, 6)
    torch.testing.assert_close(out[..., 3:], torch.ones(2, 5, 3))
    rev = with_temporal_derivative(steps.flip(1), dim=1)
    torch.testing.assert_close(rev[..., 3:].mean(1), -out[..., 3:].mean(1))  # order shows in the mean
    torch.testing.assert_close(rev[..., :3].mean(1), out[..., :3].mean(1))  # the plain mean is blind to it
    chan_first = with_temporal_derivative(steps.transpose(1, 2), dim=2)  # [B, E, T]
    torch.testing.assert_close(chan_first.transpose(1, 2), out)
    single = with_temporal_derivative(steps[:, :1], dim=1)
    assert torch.equal(single[..., 3:], torch.zeros(2, 1, 3))


@pytest.mark.parametrize("arch", ["r2plus1d", "vit"])
def test_temporal_derivative_doubles_the_embedding_and_clip_is_the_frame_mean(arch):
    plain = build_student(StudentConfig(arch=arch))
    model = build_student(StudentConfig(arch=arch, temporal_derivative=True)).eval()
    assert model.embed_dim == 2 * plain.embed_dim
    assert count_parameters(model) == count_parameters(plain)  # parameter-free
    v = _video(t=8)
    with torch.no_grad():
        out = model(v)
    assert out.clip.shape == (2, model.embed_dim) and out.frames.shape == (2, 8, model.embed_dim)
    torch.testing.assert_close(out.clip, out.frames.mean(1), atol=1e-5, rtol=1e-5)
    half = plain.embed_dim
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out.frames[..., :half], plain.eval()(v).frames)  # the first half is unchanged


# --- presets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,size,embed,low,high", [
    ("r2plus1d", "small", 256, 7.0e6, 9.0e6),
    ("r2plus1d", "base", 512, 30.0e6, 33.0e6),  # torchvision's R(2+1)D-18 backbone: 31.3M
    ("vit", "small", 384, 21.0e6, 23.0e6),  # ViT-S/16: 21.7M (+ tubelet doubles the patch embedding)
    ("vit", "base", 768, 85.0e6, 88.0e6),  # ViT-B/16: 85.8M
])
def test_large_presets_on_meta_device(arch, size, embed, low, high):
    with torch.device("meta"):
        model = build_student(StudentConfig(arch=arch, size=size, frames=16, image_size=224, patch=16))
    assert model.embed_dim == embed
    assert low < count_parameters(model) < high


def test_tiny_presets_are_small():
    for arch in ("r2plus1d", "vit"):
        assert count_parameters(build_student(StudentConfig(arch=arch))) < 300_000


# --- input normalisation -------------------------------------------------------------------------------


def test_video_to_input_layout_and_values():
    frames = torch.zeros(1, 2, 4, 5, 3, dtype=torch.uint8)
    frames[..., 0] = 255  # red channel full
    frames[0, 1, 2, 3, 2] = 51  # one blue pixel in the second frame
    x = video_to_input(frames)
    assert x.shape == (1, 2, 3, 4, 5) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0, 0], torch.full((4, 5), (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]))
    torch.testing.assert_close(x[0, 0, 1], torch.full((4, 5), -IMAGENET_MEAN[1] / IMAGENET_STD[1]))
    assert x[0, 1, 2, 2, 3] == pytest.approx((0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2], rel=1e-5)
    assert x[0, 0, 2, 2, 3] == pytest.approx(-IMAGENET_MEAN[2] / IMAGENET_STD[2], rel=1e-5)


def test_video_to_input_uses_the_config_stats():
    cfg = StudentConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = video_to_input(torch.full((1, 1, 2, 2, 3), 255, dtype=torch.uint8), cfg)
    torch.testing.assert_close(x, torch.ones(1, 1, 3, 2, 2))


def test_video_to_input_rejects_float_and_wrong_layout():
    with pytest.raises(TypeError):
        video_to_input(torch.zeros(1, 2, 4, 4, 3))
    with pytest.raises(ValueError):
        video_to_input(torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8))


# --- save / load ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    StudentConfig(arch="r2plus1d", norm="batch"),
    StudentConfig(arch="r2plus1d", coord_channels=True, temporal_derivative=True),
    StudentConfig(arch="vit", pos_embed="learned", pool="cls"),
    StudentConfig(arch="vit"),
], ids=["r2plus1d-bn", "r2plus1d-coord-deriv", "vit-learned-cls", "vit-sincos"])
def test_save_load_roundtrip(tmp_path, cfg):
    model = build_student(cfg)
    model.train()
    with torch.no_grad():
        model(_video(seed=1))  # moves BatchNorm running stats away from their init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    save_student(model, cfg, tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "student" / "student_config.json").read_text())
    assert saved["arch"] == cfg.arch and saved["mean"] == list(IMAGENET_MEAN)
    loaded, loaded_cfg = load_student(tmp_path / "student")
    assert type(loaded) is type(model)
    assert loaded_cfg == cfg.resolved()
    loaded.eval()
    v = _video(seed=2)
    with torch.no_grad():
        a, b = model(v), loaded(v)
    assert torch.equal(a.clip, b.clip) and torch.equal(a.frames, b.frames)


def test_load_is_strict(tmp_path):
    cfg = StudentConfig(arch="vit")
    save_student(build_student(cfg), cfg, tmp_path)
    # A config that builds a different model must not load silently.
    (tmp_path / "student_config.json").write_text(json.dumps({**cfg.resolved().to_dict(), "pool": "cls"}))
    with pytest.raises(RuntimeError, match="cls_token"):
        load_student(tmp_path)
