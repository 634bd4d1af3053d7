"""The demo's sample videos (real H.264 files) and the demo teacher (a real, tiny CLIP saved and reloaded)."""

from __future__ import annotations

import collections
import csv
import hashlib
import json

import numpy as np
import pytest
import torch

from subsume import demo_teacher as dt
from subsume import sample_data as sd

N_VIDEOS, SEED, SIZE, FRAMES, FPS = 40, 7, 64, 48, 12.0
SATURATION = 120  # the background is near-grey (max - min channel < ~90 even with noise); shapes are > 150


def shape_mask(frames: np.ndarray) -> np.ndarray:
    """bool [..., H, W]: strongly coloured pixels, i.e. the shape."""
    f = frames.astype(np.int16)
    return (f.max(-1) - f.min(-1)) > SATURATION


def centroids(frames: np.ndarray) -> np.ndarray:
    """float [T, 2]: (x, y) centroid of the shape in each frame."""
    mask = shape_mask(frames)
    ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    count = mask.sum((1, 2))
    assert (count > 20).all(), "shape not found in some frame"
    return np.stack([(mask * xs).sum((1, 2)) / count, (mask * ys).sum((1, 2)) / count], axis=1)


def shape_from_mask(frame: np.ndarray) -> str:
    """Tell the drawn shape from its pixels (64 px frames): a triangle fills about half its bounding box
    (square ~1, circle ~0.79); a square's corners reach farther from its centroid than a circle's edge,
    relative to the square root of the area (~0.71 vs ~0.56)."""
    ys, xs = np.nonzero(shape_mask(frame))
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    reach = np.sqrt(((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2).max() / len(xs))
    if fill < 0.65:
        return "triangle"
    return "circle" if reach < 0.61 else "square"


def frames_hash(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 real .mp4 files, decoded back with decord: (manifest rows, decoded frames per video)."""
    decord = pytest.importorskip("decord")
    out = tmp_path_factory.mktemp("sample")
    manifest = sd.generate_videos(out, N_VIDEOS, seed=SEED, size=SIZE, frames=FRAMES, fps=FPS)
    assert manifest == out / "manifest.csv"
    rows = sd.read_manifest(manifest)
    decoded = []
    for row in rows:
        reader = decord.VideoReader(row["path"])
        decoded.append((reader.get_batch(list(range(len(reader)))).asnumpy(), reader.get_avg_fps()))
    return manifest, rows, decoded


# --- determinism and files ------------------------------------------------------------------------------

def test_same_seed_same_frames_other_seed_other_frames():
    a = [frames_hash(sd.render_video(p)) for p in sd.video_params(4, seed=3, size=32, frames=8)]
    b = [frames_hash(sd.render_video(p)) for p in sd.video_params(4, seed=3, size=32, frames=8)]
    c = [frames_hash(sd.render_video(p)) for p in sd.video_params(4, seed=4, size=32, frames=8)]
    assert a == b
    assert not set(a) & set(c)
    assert len(set(a)) == 4
    im1, lab1 = sd.render_training_images(16, seed=2, size=32)
    im2, lab2 = sd.render_training_images(16, seed=2, size=32)
    im3, _ = sd.render_training_images(16, seed=3, size=32)
    assert frames_hash(im1) == frames_hash(im2) and frames_hash(im1) != frames_hash(im3)
    assert all((lab1[k] == lab2[k]).all() for k in lab1)


def test_encoder_is_deterministic_too(tmp_path):
    m1 = sd.generate_videos(tmp_path / "a", 3, seed=1, size=32, frames=6)
    m2 = sd.generate_videos(tmp_path / "b", 3, seed=1, size=32, frames=6)
    assert m1.read_bytes() == m2.read_bytes()
    for name in ("synth00000.mp4", "synth00001.mp4", "synth00002.mp4"):
        assert (tmp_path / "a" / "videos" / name).read_bytes() == (tmp_path / "b" / "videos" / name).read_bytes()


def test_manifest_columns_and_relative_paths(dataset):
    manifest, rows, _ = dataset
    with open(manifest, newline="") as f:
        raw = list(csv.DictReader(f))
    assert list(raw[0]) == ["path", "video_id", "shape", "colour", "direction"]
    assert len(raw) == N_VIDEOS and len({r["video_id"] for r in raw}) == N_VIDEOS
    for r in raw:
        assert r["path"] == f"videos/{r['video_id']}.mp4"  # relative to the manifest's folder
        assert (manifest.parent / r["path"]).is_file()
        assert r["shape"] not in r["video_id"] and r["direction"] not in r["video_id"]
    assert not list((manifest.parent / "videos").glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("n", [1, 5, 12, 13, 40, 97])
def test_labels_balanced(n):
    triples = sd.balanced_labels(n, np.random.default_rng(0))
    for k, classes in enumerate((sd.SHAPES, sd.COLOUR_NAMES, sd.DIRECTION_NAMES)):
        counts = collections.Counter(t[k] for t in triples)
        assert set(counts) <= set(classes)
        if n >= len(classes):
            assert set(counts) == set(classes)
        assert max(counts.values()) - min(counts.get(c, 0) for c in classes) <= 1
    if n >= 36:
        assert len(set(triples)) == 36  # every shape/colour/direction combination occurs
    elif n >= 9:
        assert len({t[:2] for t in triples}) == 9  # shape never tied to colour


def test_manifest_labels_balanced(dataset):
    _, rows, _ = dataset
    for column, classes in (("shape", sd.SHAPES), ("colour", sd.COLOUR_NAMES), ("direction", sd.DIRECTION_NAMES)):
        counts = collections.Counter(r[column] for r in rows)
        assert set(counts) == set(classes)
        assert max(counts.values()) - min(counts.values()) <= 1


# --- what the videos show -------------------------------------------------------------------------------

def test_videos_decode_with_decord(dataset):
    _, _, decoded = dataset
    for frames, fps in decoded:
        assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8
        assert fps == pytest.approx(FPS, rel=1e-3)


def test_shape_moves_in_labelled_direction(dataset):
    _, rows, decoded = dataset
    t = np.arange(FRAMES)
    for row, (frames, _) in zip(rows, decoded):
        c = centroids(frames)
        vx, vy = np.polyfit(t, c[:, 0], 1)[0], np.polyfit(t, c[:, 1], 1)[0]
        ux, uy = sd.DIRECTIONS[row["direction"]]
        along, across = (vx * ux + vy * uy), (vx * uy - vy * ux)
        assert along > 0.2, (row, vx, vy)  # pixels per frame in the labelled direction
        assert abs(across) < 0.05, (row, vx, vy)
        # Straight line, constant speed: the centroid stays on the fitted line.
        pos = c[:, 0] if ux else c[:, 1]
        residual = pos - np.polyval(np.polyfit(t, pos, 1), t)
        assert np.abs(residual).max() < 1.0


def test_colour_and_shape_match_labels(dataset):
    _, rows, decoded = dataset
    channel = {"red": 0, "green": 1, "blue": 2}
    for row, (frames, _) in zip(rows, decoded):
        mean_rgb = frames[shape_mask(frames)].reshape(-1, 3).mean(0)
        assert int(np.argmax(mean_rgb)) == channel[row["colour"]], (row, mean_rgb)
    # Shapes are judged on the rendered frames: the codec's 4:2:0 chroma blurs their edges.
    for params in sd.video_params(N_VIDEOS, seed=SEED, size=SIZE, frames=2):
        assert shape_from_mask(sd.render_video(params)[0]) == params.shape, params


def _direction_correlation(positions: np.ndarray, directions: list[str]) -> float:
    """Correlation between the position along each video's axis of motion and the sign of the motion
    (left/up -1, right/down +1): how well position alone would tell the direction."""
    along = [pos[0] if sd.DIRECTIONS[d][0] else pos[1] for pos, d in zip(positions, directions)]
    sign = [sum(sd.DIRECTIONS[d]) for d in directions]
    return float(np.corrcoef(along, sign)[0, 1])


def test_clip_mean_position_does_not_tell_direction(dataset):
    _, rows, decoded = dataset
    directions = [r["direction"] for r in rows]
    tracks = np.stack([centroids(frames) for frames, _ in decoded])  # [V, T, 2]
    # 40 videos: chance alone gives |r| ~ 0.16; a generator that starts shapes near an edge gives ~0.9.
    r_mean = _direction_correlation(tracks.mean(1), directions)
    assert abs(r_mean) < 0.4, r_mean
    # The same measure on the first frame's position does see the direction: the check has teeth.
    r_first = _direction_correlation(tracks[:, 0], directions)
    assert r_first < -0.8, r_first
    # Many draws, no rendering: the trajectories' midpoints are independent of the direction.
    params = sd.video_params(4000, seed=SEED, size=SIZE, frames=FRAMES)
    mids = np.array([p.centre((FRAMES - 1) / 2) for p in params])
    r_many = _direction_correlation(mids, [p.direction for p in params])
    assert abs(r_many) < 0.06, r_many  # ~4 standard errors
    for axis in (0, 1):
        by_direction = [mids[[p.direction == d for p in params], axis] for d in sd.DIRECTION_NAMES]
        spread = mids[:, axis].std()
        assert max(m.mean() for m in by_direction) - min(m.mean() for m in by_direction) < 0.15 * spread


def test_training_images_labels_are_true():
    images, labels = sd.render_training_images(180, seed=5, size=SIZE)
    assert images.shape == (180, SIZE, SIZE, 3) and images.dtype == np.uint8
    for name, k in (("shape", 3), ("colour", 3), ("position", 9)):
        assert labels[name].dtype == np.int64
        assert np.bincount(labels[name], minlength=k).tolist() == [180 // k] * k
    for i in range(len(images)):
        cx, cy = centroids(images[i:i + 1])[0]
        assert sd.position_cell((cx, cy), SIZE) == labels["position"][i]
        mean_rgb = images[i][shape_mask(images[i])].mean(0)
        assert int(np.argmax(mean_rgb)) == labels["colour"][i]
        assert shape_from_mask(images[i]) == sd.SHAPES[labels["shape"][i]]


# --- the demo teacher -----------------------------------------------------------------------------------

QUICK = dict(batch_size=16, train_images=48, eval_images=32, hidden_size=32, num_layers=1,
             num_heads=2, projection_dim=16)


def test_demo_teacher_saves_and_reloads_like_a_hub_checkpoint(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    cfg = dt.DemoTeacherConfig(seed=11, steps=3, **QUICK)
    model, _, report = dt.train_demo_teacher(cfg, log=lambda _: None)
    fresh = CLIPVisionModelWithProjection(dt.clip_vision_config(cfg))
    assert not torch.equal(fresh.visual_projection.weight, model.visual_projection.weight)
    dt.save_demo_teacher(model, report, tmp_path)

    loaded, info = CLIPVisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.architectures == ["CLIPVisionModelWithProjection"]
    assert torch.equal(loaded.visual_projection.weight, model.visual_projection.weight)

    images, _ = sd.render_training_images(6, seed=99, size=cfg.image_size)
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
    assert set(saved["held_out_accuracy"]) == {"shape", "colour", "position"}
    assert saved["held_out_seed"] != saved["config"]["seed"]


def test_demo_teacher_training_is_deterministic():
    cfg = dt.DemoTeacherConfig(seed=5, steps=2, **QUICK)
    a, _, _ = dt.train_demo_teacher(cfg, log=lambda _: None)
    b, _, _ = dt.train_demo_teacher(cfg, log=lambda _: None)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_build_demo_teacher_does_not_retrain(tmp_path):
    lines: list[str] = []
    out = dt.build_demo_teacher(tmp_path / "teacher", seed=1, image_size=32, steps=2, log=lines.append, **QUICK)
    assert (out / dt.INFO_FILE).is_file() and (out / "model.safetensors").is_file()
    assert any("held-out accuracy" in line for line in lines)
    weights = (out / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert dt.build_demo_teacher(out, seed=1, image_size=32, steps=2, log=lines.append, **QUICK) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert lines and "not retraining" in lines[0]


def test_sincos_positions_are_distinct():
    code = dt.sincos_2d(8, 48)
    assert code.shape == (64, 48)
    dist = torch.cdist(code, code) + torch.eye(64) * 1e9
    assert dist.min() > 0.1  # every patch position gets its own code
