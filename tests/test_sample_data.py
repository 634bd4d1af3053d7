"""The demo's sample videos: real H.264 files whose labels are true, and whose shortcuts are closed."""

from __future__ import annotations

import collections
import csv
import hashlib
import json

import numpy as np
import pytest

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
    for p in sd.video_params(2, seed=3, size=32, frames=8):
        video = sd.render_video(p)
        assert all(np.array_equal(sd.render_video_frame(p, t), video[t]) for t in (0, 5, 7))


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
    assert list(raw[0]) == ["path", "video_id", "shape", "colour", "direction", "speed"]
    assert len(raw) == N_VIDEOS and len({r["video_id"] for r in raw}) == N_VIDEOS
    for r in raw:
        assert r["path"] == f"videos/{r['video_id']}.mp4"  # relative to the manifest's folder
        assert (manifest.parent / r["path"]).is_file()
        assert all(r[c] not in r["video_id"] for c in ("shape", "colour", "direction", "speed"))
    assert not list((manifest.parent / "videos").glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("n", [1, 5, 12, 13, 40, 97, 288])
def test_labels_balanced(n):
    tuples = sd.balanced_labels(n, np.random.default_rng(0))
    for k, classes in enumerate((sd.SHAPES, sd.COLOUR_NAMES, sd.DIRECTION_NAMES, sd.SPEED_NAMES)):
        counts = collections.Counter(t[k] for t in tuples)
        assert set(counts) <= set(classes)
        if n >= len(classes):
            assert set(counts) == set(classes)
        assert max(counts.values()) - min(counts.get(c, 0) for c in classes) <= 1
    if n >= 72:
        assert len(set(tuples)) == 72  # every shape/colour/direction/speed combination occurs
    if n >= 9:
        assert len({t[:2] for t in tuples}) == 9  # shape never tied to colour
    if n >= 8:
        assert len({t[2:] for t in tuples}) == 8  # speed never tied to direction


def test_manifest_labels_balanced(dataset):
    _, rows, _ = dataset
    for column, classes in (("shape", sd.SHAPES), ("colour", sd.COLOUR_NAMES), ("direction", sd.DIRECTION_NAMES),
                            ("speed", sd.SPEED_NAMES)):
        counts = collections.Counter(r[column] for r in rows)
        assert set(counts) == set(classes)
        assert max(counts.values()) - min(counts.values()) <= 1


# --- what the videos show -------------------------------------------------------------------------------

def test_videos_decode_with_decord(dataset):
    _, _, decoded = dataset
    for frames, fps in decoded:
        assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8
        assert fps == pytest.approx(FPS, rel=1e-3)


def _reversals(along: np.ndarray, min_step: float = 0.01) -> int:
    """How often the motion along the axis changes sign (steps smaller than `min_step` are ignored)."""
    steps = np.diff(along)
    signs = np.sign(steps[np.abs(steps) > min_step])
    return int((signs[1:] != signs[:-1]).sum())


def test_shape_moves_in_labelled_direction_at_labelled_speed(dataset):
    _, rows, decoded = dataset
    params = sd.video_params(N_VIDEOS, seed=SEED, size=SIZE, frames=FRAMES)
    for row, p, (frames, _) in zip(rows, params, decoded):
        assert (row["direction"], row["speed"]) == (p.direction, p.speed)
        c = centroids(frames)
        # The decoded shape moves as the parameters say, frame by frame (up to a constant offset: the mask's
        # centroid is not the shape's centre, and pixel centres are at +0.5).
        error = c - np.array([p.centre(t) for t in range(FRAMES)])
        assert np.abs(error - error.mean(0)).max() < 1.0, row
        ux, uy = sd.DIRECTIONS[row["direction"]]
        along, across = c @ np.array([ux, uy]), c @ np.array([uy, -ux])
        assert along[-1] - along[0] > 10.0, row  # net motion in the labelled direction, pixels
        assert np.ptp(across) < 1.5 and abs(np.polyfit(np.arange(FRAMES), across, 1)[0]) < 0.02, row  # a line
        # slow: one pass, never turning back; fast: three passes, turning back twice (the path's length
        # is the same, so the distance covered is three times as long).
        # Every 4th frame: the decoded centroid wobbles by a few tenths of a pixel.
        assert _reversals(along[::4], min_step=0.5) == {"slow": 0, "fast": 2}[row["speed"]], row
        covered = np.abs(np.diff(along)).sum() / (along.max() - along.min())
        assert covered == pytest.approx(sd.SPEEDS[row["speed"]], rel=0.1), row


def test_background_changes_every_frame():
    """Two frames of one video share no background: a video-only method cannot match views by it."""
    for p in sd.video_params(6, seed=SEED, size=SIZE, frames=FRAMES):
        video = sd.render_video(p).astype(np.float32)
        background = ~shape_mask(video).any(0)  # pixels the shape never covers
        a, b = video[0][background], video[FRAMES // 2][background]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.5, p
        # Within one frame the texture is smooth (neighbours agree): the low correlation is not just noise.
        left, right = video[0, :, :-1][background[:, :-1]], video[0, :, 1:][background[:, :-1]]
        assert np.corrcoef(left.ravel(), right.ravel())[0, 1] > 0.6, p


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
    assert all(p.progress((FRAMES - 1) / 2) == pytest.approx(0.5) for p in params)  # slow and fast alike
    for axis in (0, 1):
        by_direction = [mids[[p.direction == d for p in params], axis] for d in sd.DIRECTION_NAMES]
        spread = mids[:, axis].std()
        assert max(m.mean() for m in by_direction) - min(m.mean() for m in by_direction) < 0.15 * spread


@pytest.mark.parametrize("stride", [1, 3])  # every frame, and the demo's 4 fps out of 12
def test_speed_is_not_in_the_set_of_positions(stride):
    """The same video slow or fast visits the same stretch of its path, evenly, with the same midpoint:
    the mean and spread of positions over the clip (what order-free pooling sees) barely move."""
    from dataclasses import replace

    t = np.arange(0, FRAMES, stride)
    for p in sd.video_params(24, seed=SEED, size=SIZE, frames=FRAMES):
        slow, fast = (np.array([replace(p, speed=v).progress(i) for i in t]) for v in ("slow", "fast"))
        assert fast.mean() == pytest.approx(slow.mean(), abs=0.02)
        assert fast.std() == pytest.approx(slow.std(), rel=0.1)
        assert (slow.min(), slow.max(), fast.min(), fast.max()) == pytest.approx((0, 1, 0, 1), abs=0.07)
        assert _reversals(slow) == 0 and _reversals(fast) == 2  # the order tells them apart
