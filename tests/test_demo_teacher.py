"""The demo teacher: a real, tiny CLIP pretrained on images of another world (supervised on that world's own
shapes, or SimCLR), saved and reloaded like a hub checkpoint, and probed on frames of the evaluation videos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from subsume import demo_teacher as dt
from subsume import frame_probe as fp
from subsume import pretrain_images as pi
from subsume import sample_data as sd

QUICK = dict(batch_size=16, train_images=48, hidden_size=32, num_layers=1, num_heads=2, projection_dim=16,
             head_hidden=32, head_dim=16, probe=fp.ProbeConfig(train_frames=36, test_frames=18))


# --- the pretraining images --------------------------------------------------------------------------------

def test_pretrain_images_are_deterministic_and_varied():
    a = pi.render_pretrain_images(12, seed=4, size=32)
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pi.render_pretrain_images(12, seed=4, size=32))
    assert not np.array_equal(a, pi.render_pretrain_images(12, seed=5, size=32))
    assert len({img.tobytes() for img in a}) == 12


def test_pretrain_world_is_not_the_evaluation_world():
    assert not set(pi.PRETRAIN_SHAPES) & set(sd.SHAPES)
    assert min(pi.ELONGATION) >= 1.5  # ellipses are never circles, rectangles never squares
    # Every shape draws something of roughly the requested size, and each one differently.
    ys, xs = np.mgrid[0:64, 0:64].astype(np.float32) - 32
    masks = {s: pi.shape_distance(s, xs, ys, 16.0, 2.0) < 0 for s in pi.PRETRAIN_SHAPES}
    for shape, mask in masks.items():
        assert 60 < mask.sum() < np.pi * 16 ** 2, shape
    assert len({m.tobytes() for m in masks.values()}) == len(masks)
    # Object hues cover the whole circle, not the evaluation's three colours.
    hues = np.random.default_rng(0).uniform(0, 1, 1000)
    rgb = pi.hsv_to_rgb(hues, np.ones(1000), np.ones(1000))
    assert np.allclose(pi.hsv_to_rgb(np.array([0.0, 1 / 3, 2 / 3]), np.ones(3), np.ones(3)),
                       [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
    assert len({tuple(c) for c in np.round(rgb / 32)}) > 20


# --- the probe has teeth -----------------------------------------------------------------------------------

def test_probes_tell_separable_from_random_features():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    informative = np.eye(3)[y] * 2.0 + rng.normal(0, 0.3, (300, 3))
    features = np.concatenate([informative, rng.normal(0, 1, (300, 13))], axis=1)
    noise = rng.normal(0, 1, (300, 16))
    assert fp.linear_probe_accuracy(features[:200], y[:200], features[200:], y[200:]) > 0.95
    assert fp.knn_accuracy(features[:200], y[:200], features[200:], y[200:]) > 0.9
    assert fp.linear_probe_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.55
    assert fp.knn_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.55


def test_probe_frames_carry_true_labels():
    frames = fp.probe_frames(36, seed=3, size=64)
    assert frames.images.shape == (36, 64, 64, 3)
    for name in ("shape", "colour"):
        assert np.bincount(frames.labels[name], minlength=3).tolist() == [12, 12, 12]
    assert np.bincount(frames.labels["position"], minlength=4).min() >= 4  # every quadrant
    channel = {"red": 0, "green": 1, "blue": 2}
    cells = []
    for img, c in zip(frames.images, frames.labels["colour"]):
        f = img.astype(np.int16)
        mask = (f.max(-1) - f.min(-1)) > 120
        assert int(np.argmax(img[mask].mean(0))) == channel[sd.COLOUR_NAMES[c]]
        ys, xs = np.nonzero(mask)
        cells.append(fp.position_cell((xs.mean() + 0.5, ys.mean() + 0.5), 64))
    # The mask's centroid is a pixel or two off a triangle's centre: near a cell border the cell may differ.
    assert np.mean(np.array(cells) == frames.labels["position"]) > 0.85


# --- the checkpoint ----------------------------------------------------------------------------------------

def test_demo_teacher_saves_and_reloads_like_a_hub_checkpoint(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    cfg = dt.DemoTeacherConfig(seed=11, steps=3, **QUICK)
    model, report = dt.train_demo_teacher(cfg, log=lambda _: None)
    fresh = dt.build_model(cfg)
    assert not torch.equal(fresh.visual_projection.weight, model.visual_projection.weight)
    dt.save_demo_teacher(model, report, tmp_path)

    loaded, info = CLIPVisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.architectures == ["CLIPVisionModelWithProjection"]
    assert torch.equal(loaded.visual_projection.weight, model.visual_projection.weight)

    images = fp.probe_frames(6, seed=99, size=cfg.image_size).images
    pixels = dt.normalize_images(images)
    with torch.no_grad():
        before = model.eval()(pixel_values=pixels).image_embeds
        after = loaded.eval()(pixel_values=pixels).image_embeds
    assert before.shape == (6, cfg.projection_dim)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    # The saved processor is the one the training used: same size, same normalisation.
    processor = CLIPImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"shortest_edge": cfg.image_size}
    assert processor.crop_size == {"height": cfg.image_size, "width": cfg.image_size}
    from_processor = processor(images=list(images), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_processor, pixels, rtol=0, atol=1e-4)

    saved = json.loads((tmp_path / dt.INFO_FILE).read_text())
    assert saved["config"]["seed"] == 11 and saved["config"]["steps"] == 3
    probe = saved["probe"]
    assert probe["config"]["seed"] != 0  # not the demo's videos
    assert probe["config"]["train_frames"] == 36 and probe["config"]["test_frames"] == 18
    for who in ("teacher", "random_init"):
        for label in ("shape", "colour", "position"):
            for kind in ("linear", "knn"):
                acc = probe["results"][who][label][kind]
                assert 0.0 <= acc <= 1.0 and acc * 18 == pytest.approx(round(acc * 18))  # a count of 18


def test_labelled_pretrain_images_are_deterministic_and_cover_every_shape():
    data = pi.render_labelled_images(64, seed=3, size=32)
    assert data.images.shape == (64, 32, 32, 3) and data.shape.shape == (64,) and data.shape.dtype == np.int64
    again = pi.render_labelled_images(64, seed=3, size=32)
    assert np.array_equal(data.images, again.images) and np.array_equal(data.shape, again.shape)
    assert set(data.shape.tolist()) == set(range(len(pi.PRETRAIN_SHAPES)))
    assert data.centre.shape == (64, 2) and data.radius.shape == (64,)
    lo, hi = (32 * f for f in pi.SIZE_RANGE)
    assert ((data.radius >= lo - 1e-4) & (data.radius <= hi + 1e-4)).all()


def test_painted_object_is_where_its_labels_say():
    rng = np.random.default_rng(7)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    for _ in range(24):
        img = np.zeros((64, 64, 3), np.float32)
        obj = pi.paint_object(img, rng)
        mask = img.max(-1) > 0.5 * img.max()
        dist = np.hypot(xs - obj.centre[0], ys - obj.centre[1])[mask]
        assert dist.max() < 1.25 * obj.radius + 1.0, pi.PRETRAIN_SHAPES[obj.shape]
        centroid = (xs[mask].mean(), ys[mask].mean())
        assert np.hypot(centroid[0] - obj.centre[0], centroid[1] - obj.centre[1]) < 0.6 * obj.radius


def test_crops_move_the_geometry_with_the_view():
    # An object's labelled centre, moved by Crops.geometry, is where the view shows the object.
    cfg = dt.DemoTeacherConfig(crop_scale=(0.5, 1.0), jitter=0.0)
    size = cfg.image_size
    img = np.zeros((4, size, size, 3), np.uint8)
    centres = np.array([[20.0, 40.0], [44.0, 18.0], [32.0, 32.0], [25.0, 27.0]], np.float32)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    for k, (cx, cy) in enumerate(centres):
        img[k][np.hypot(xs - cx, ys - cy) < 6] = 255
    views, crops = dt.augment_with_crops(img, cfg, torch.Generator().manual_seed(3))
    where = crops.geometry(centres, np.full(4, 6.0, np.float32), size).numpy()
    for k in range(4):
        bright = views[k].mean(0).numpy() > 0.5
        if not bright.any():
            assert np.abs(where[k, :2]).max() > 0.9  # cropped away: the label says it is outside
            continue
        vy, vx = np.nonzero(bright)
        seen = ((vx.mean() + 0.5) * 2 / size - 1, (vy.mean() + 0.5) * 2 / size - 1)
        assert np.allclose(seen, where[k, :2], atol=0.12), (seen, where[k])
        area = bright.sum() / size ** 2 * 4  # in normalised units, [-1, 1]^2 has area 4
        assert np.exp(where[k, 2]) ** 2 * np.pi * 4 == pytest.approx(area, rel=0.35)


def test_supervised_pretraining_learns_its_own_labels():
    # A few images, many steps: naming the pretraining world's shapes must be learnable (the loss falls well
    # below chance); the other terms are off here so that they do not slow it down.
    cfg = dt.DemoTeacherConfig(objective="supervised", seed=0, steps=60, lr=3e-3, warmup_steps=5,
                               crop_scale=(1.0, 1.0), jitter=0.0, geometry_weight=0.0, silhouette_weight=0.0,
                               patch_weight=0.0, **{**QUICK, "batch_size": 16})
    data = pi.render_labelled_images(16, seed=0, size=cfg.image_size)
    losses = dt.pretrain_supervised(dt.build_model(cfg), data, cfg, log=lambda _: None)
    assert np.mean(losses[:3]) > 1.5 and np.mean(losses[-5:]) < 0.5 * np.log(len(pi.PRETRAIN_SHAPES))


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective"):
        dt.train_demo_teacher(dt.DemoTeacherConfig(objective="dino", steps=1, **QUICK), log=lambda _: None)


@pytest.mark.parametrize("objective", ["supervised", "simclr"])
def test_demo_teacher_training_is_deterministic(objective):
    cfg = dt.DemoTeacherConfig(seed=5, steps=2, objective=objective, **QUICK)
    a, ra = dt.train_demo_teacher(cfg, log=lambda _: None)
    b, rb = dt.train_demo_teacher(cfg, log=lambda _: None)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert ra["probe"] == rb["probe"]


def test_build_demo_teacher_does_not_retrain(tmp_path):
    lines: list[str] = []
    out = dt.build_demo_teacher(tmp_path / "teacher", seed=1, image_size=32, steps=2, log=lines.append, **QUICK)
    assert (out / dt.INFO_FILE).is_file() and (out / "model.safetensors").is_file()
    assert any("probe on held-out frames" in line for line in lines)
    weights = (out / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert dt.build_demo_teacher(out, seed=1, image_size=32, steps=2, log=lines.append, **QUICK) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert lines and "not retraining" in lines[0]


# --- the pretraining objective -----------------------------------------------------------------------------

def test_nt_xent_rewards_matching_partners():
    z = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    matched = dt.nt_xent(z, z, temperature=0.1)
    shuffled = dt.nt_xent(z, z.roll(1, dims=0), temperature=0.1)
    assert matched < 0.1 < np.log(15) < shuffled


def test_augmentations_keep_hue_and_change_the_view():
    frames = fp.probe_frames(12, seed=2, size=64)
    gen = torch.Generator().manual_seed(0)
    a, b = (dt.augment(frames.images, dt.DemoTeacherConfig(), gen) for _ in range(2))
    assert a.shape == (12, 3, 64, 64) and (a - b).abs().mean() > 0.1
    # Whole-image crops (aspect jitter only), so the shape stays in view: the jitter keeps its colour.
    cfg = dt.DemoTeacherConfig(crop_scale=(1.0, 1.0), jitter=0.4)
    mean, std = torch.tensor(dt.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(dt.CLIP_STD).view(1, 3, 1, 1)
    for view in (dt.augment(frames.images, cfg, gen) for _ in range(3)):
        rgb = (view * std + mean).permute(0, 2, 3, 1).numpy()
        for img, c in zip(rgb, frames.labels["colour"]):
            spread = img.max(-1) - img.min(-1)
            strong = spread > np.quantile(spread, 0.9)  # the shape's most saturated pixels
            assert int(np.argmax(img[strong].mean(0))) == c  # still red, green or blue


def test_greyscale_views_when_asked():
    images = fp.probe_frames(8, seed=2, size=64).images
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(dt.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(dt.CLIP_STD).view(1, 3, 1, 1)
    grey = dt.augment(images, dt.DemoTeacherConfig(greyscale_p=1.0), gen) * std + mean
    colour = dt.augment(images, dt.DemoTeacherConfig(), gen) * std + mean
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    assert (colour[:, 0] - colour[:, 2]).abs().max() > 0.3


def test_sincos_positions_are_distinct():
    code = dt.sincos_2d(8, 48)
    assert code.shape == (64, 48)
    dist = torch.cdist(code, code) + torch.eye(64) * 1e9
    assert dist.min() > 0.1  # every patch position gets its own code


def test_teacher_probe_script_reads_a_saved_teacher(tmp_path, capsys):
    from benchmarks import teacher_probe

    out = dt.build_demo_teacher(tmp_path / "teacher", seed=2, steps=2, log=lambda _: None, **QUICK)
    assert teacher_probe.main(["--teacher", str(out), "--random-seeds", "3,4", "--probe-seeds", "7,8",
                               "--train-frames", "24", "--test-frames", "12", "--json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    report = json.loads(printed[-1])
    assert report["probe_seeds"] == [7, 8] and len(report["results"]) == 2
    assert set(report["results"][0]) == {"teacher", "random_init_seed3", "random_init_seed4"}
    assert report["config"]["train_frames"] == 24 and report["config"]["test_frames"] == 12
    assert "24 train / 12 test per probe seed (7,8)" in printed[0]
    mean = np.mean([r["random_init_seed3"]["shape"]["linear"] for r in report["results"]])
    assert any(line.startswith("random_init_seed3") and f"{mean:>9.3f}" in line for line in printed)
    # The script's teacher is the saved one: its probe on the saved config's frames matches the build's.
    saved = json.loads((out / dt.INFO_FILE).read_text())["probe"]
    assert teacher_probe.main(["--teacher", str(out), "--random-seeds", ""]) == 0
    assert f"{saved['results']['teacher']['shape']['linear']:>9.3f}" in capsys.readouterr().out
