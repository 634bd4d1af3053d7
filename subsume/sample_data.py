"""Synthetic labelled videos for the demo: one coloured shape moving along a line over a flickering texture.

Labels: `shape` and `colour` are appearance (any single frame tells them); `direction` and `speed` are
motion only. The shape goes from a start point to an end point: once at constant speed (`slow`), or there,
back and there again at three times the speed (`fast`). Both visit the points of the same segment evenly
and pass its midpoint halfway through the clip; the midpoint is drawn from the same distribution for
every direction, and a left-moving clip has exactly the same SET of positions as a right-moving one played
backwards. So any order-free pooling of per-frame features (e.g. the mean of per-frame image embeddings)
can tell neither direction nor speed; at best the spread of positions hints at the axis (horizontal vs
vertical). Only a model that sees the order of frames can.

The background texture is drawn anew for every frame (its grey level, blotches and grain), so two clips
of one video share nothing but the shape and its motion: a video-only method cannot match views of one
video by their background.

Everything is drawn from `numpy.random.default_rng` seeded by the seed (and the video's index), so the same
(seed, n_videos) gives the same labels and frames. Rendering is pure numpy; PyAV encodes H.264 (.mp4),
single-threaded, which on the same library versions also gives the same bytes.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 200, 55),
    "blue": (40, 75, 235),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
DIRECTIONS: dict[str, tuple[int, int]] = {  # unit step as (dx, dy); image y grows downwards
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
# Passes over the segment start -> end in one clip (odd: every clip starts at the start and ends at the end).
SPEEDS: dict[str, int] = {"slow": 1, "fast": 3}
SPEED_NAMES: tuple[str, ...] = tuple(SPEEDS)
MANIFEST_COLUMNS = ("path", "video_id", "shape", "colour", "direction", "speed")

# Size of the shape (circle radius) as a fraction of the frame side, and how far it travels over the clip
# as a fraction of the free room along its axis.
RADIUS_RANGE = (0.14, 0.18)
TRAVEL_RANGE = (0.45, 0.75)
TRIANGLE_SCALE = 1.45  # circumradius of the triangle relative to the circle radius (similar areas)
SQUARE_SCALE = 0.89  # half-side of the square relative to the circle radius (equal areas)
NOISE_STD_RANGE = (4.0, 9.0)  # per-frame pixel noise, grey levels


@dataclass(frozen=True)
class VideoParams:
    """Everything that determines one video's frames (positions in pixels, (x, y), origin top-left)."""

    shape: str
    colour: str
    direction: str
    speed: str
    size: int
    frames: int
    radius: float
    start: tuple[float, float]
    end: tuple[float, float]
    noise_std: float
    texture_seed: int

    def progress(self, t: float) -> float:
        """Where on the segment start -> end the shape is at frame t: 0 at the start, 1 at the end.

        A triangle wave with SPEEDS[speed] passes over the clip, so `fast` reverses twice."""
        phase = (SPEEDS[self.speed] * t / (self.frames - 1)) % 2.0
        return phase if phase <= 1.0 else 2.0 - phase

    def centre(self, t: float) -> tuple[float, float]:
        u = self.progress(t)
        return (self.start[0] + u * (self.end[0] - self.start[0]), self.start[1] + u * (self.end[1] - self.start[1]))


# --- rendering (pure) ----------------------------------------------------------------------------------

def _extent(radius: float) -> float:
    """Farthest any shape reaches from its centre along x or y."""
    return radius * max(1.0, TRIANGLE_SCALE, SQUARE_SCALE)


def shape_coverage(shape: str, centre: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """float32 [size, size] in [0, 1]: how much of each pixel the shape covers (1-pixel soft edge).

    The shape's centroid is at `centre` for all three shapes, so a tracker sees the labelled motion.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        dist = np.hypot(dx, dy) - radius
    elif shape == "square":
        dist = np.maximum(np.abs(dx), np.abs(dy)) - radius * SQUARE_SCALE
    elif shape == "triangle":
        # Equilateral, apex up, centroid at the centre: the largest of three edge half-plane distances.
        inradius = radius * TRIANGLE_SCALE / 2.0
        normals = ((0.0, 1.0), (np.sqrt(3) / 2, -0.5), (-np.sqrt(3) / 2, -0.5))
        dist = np.max([nx * dx + ny * dy for nx, ny in normals], axis=0) - inradius
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)


def render_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size, 3]: a low-saturation, blotchy grey texture with grain.

    Low saturation keeps the shapes' pure colours distinct; the blotches make the background non-trivial.
    """
    coarse = rng.uniform(-1.0, 1.0, size=(6, 6, 1))
    tint = rng.uniform(-0.15, 0.15, size=(6, 6, 3))
    grid = np.linspace(0, 5, size)
    i0 = np.floor(grid).astype(int).clip(0, 4)
    w = (grid - i0)[:, None]
    # Separable bilinear upsampling of the coarse grid.
    field = coarse + tint
    rows = field[i0] * (1 - w[..., None]) + field[i0 + 1] * w[..., None]
    smooth = rows[:, i0] * (1 - w[None, :, :]) + rows[:, i0 + 1] * w[None, :, :]
    base = rng.uniform(100.0, 150.0)
    fine = rng.normal(0.0, 6.0, size=(size, size, 1))  # grain
    return (base + 30.0 * smooth + fine).astype(np.float32)


def render_frame(
    background: np.ndarray,
    shape: str,
    colour: str,
    centre: tuple[float, float],
    radius: float,
    *,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 [H, W, 3]: `shape` in `colour` painted at `centre` over `background` (float [H, W, 3]).

    `noise` (float [H, W, 3]) is added last, over shape and background alike, like sensor noise.
    """
    size = background.shape[0]
    alpha = shape_coverage(shape, centre, radius, size)[..., None]
    rgb = np.asarray(COLOURS[colour], np.float32)
    img = background * (1.0 - alpha) + rgb * alpha
    if noise is not None:
        img = img + noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_video_frame(params: VideoParams, t: int) -> np.ndarray:
    """uint8 [H, W, 3]: frame t alone (the same pixels as `render_video(params)[t]`).

    Each frame draws its own background and noise from (texture_seed, t): nothing but the shape and its
    motion stays the same from frame to frame."""
    rng = np.random.default_rng([params.texture_seed, t])
    background = render_background(params.size, rng)
    noise = rng.normal(0.0, params.noise_std, size=background.shape).astype(np.float32)
    return render_frame(background, params.shape, params.colour, params.centre(t), params.radius, noise=noise)


def render_video(params: VideoParams) -> np.ndarray:
    """uint8 [T, H, W, 3], fully determined by `params`."""
    return np.stack([render_video_frame(params, t) for t in range(params.frames)])


# --- parameters ----------------------------------------------------------------------------------------

def balanced_labels(n: int, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """n (shape, colour, direction, speed) tuples; each label's class counts differ by at most one.

    Index i gets shape i % 3, colour (i + i // 3) % 3 (all 9 shape/colour pairs every 9 videos, colours
    distinct within each aligned run of 3), direction i % 4 and speed (i + i // 4) % 2 (all 8
    direction/speed pairs every 8 videos); 9 and 8 being coprime, all 72 combinations occur every 72
    videos (Chinese remainder theorem). Then the order is shuffled.
    """
    tuples = []
    for i in range(n):
        s = i % len(SHAPES)
        c = (i + i // 3) % len(COLOUR_NAMES)
        d = i % len(DIRECTION_NAMES)
        v = (i + i // 4) % len(SPEED_NAMES)
        tuples.append((SHAPES[s], COLOUR_NAMES[c], DIRECTION_NAMES[d], SPEED_NAMES[v]))
    order = rng.permutation(n)
    return [tuples[k] for k in order]


def sample_video_params(shape: str, colour: str, direction: str, speed: str = "slow", *, size: int,
                        frames: int, rng: np.random.Generator) -> VideoParams:
    """Random size, segment, midpoint and noise for one video with the given labels."""
    if frames < 2:
        raise ValueError("a moving shape needs at least 2 frames")
    radius = float(rng.uniform(*RADIUS_RANGE) * size)
    margin = _extent(radius) + 1.0
    room = size - 2 * margin
    travel = float(rng.uniform(*TRAVEL_RANGE) * room)
    # The midpoint is drawn the same way for every direction, on both axes: the clip-average position
    # carries no information about the direction (see the module docstring).
    lo, hi = margin + travel / 2, size - margin - travel / 2
    mid = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    ux, uy = DIRECTIONS[direction]
    if speed not in SPEEDS:
        raise ValueError(f"unknown speed {speed!r}; expected one of {SPEED_NAMES}")
    start = (mid[0] - ux * travel / 2, mid[1] - uy * travel / 2)
    end = (mid[0] + ux * travel / 2, mid[1] + uy * travel / 2)
    return VideoParams(
        shape=shape, colour=colour, direction=direction, speed=speed, size=size, frames=frames, radius=radius,
        start=start, end=end,
        noise_std=float(rng.uniform(*NOISE_STD_RANGE)),
        texture_seed=int(rng.integers(0, 2**63 - 1)),
    )


def video_params(n_videos: int, *, seed: int = 0, size: int = 64, frames: int = 48) -> list[VideoParams]:
    """The parameters of the videos `generate_videos` writes, in order (no rendering)."""
    labels = balanced_labels(n_videos, np.random.default_rng([seed, 0x1ABE1]))
    return [
        sample_video_params(s, c, d, v, size=size, frames=frames, rng=np.random.default_rng([seed, i]))
        for i, (s, c, d, v) in enumerate(labels)
    ]


def video_id(index: int) -> str:
    # Ids carry no labels: nothing downstream can read the answer off a file name.
    return f"synth{index:05d}"


# --- files ---------------------------------------------------------------------------------------------

def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Encode uint8 [T, H, W, 3] RGB as H.264 (yuv420p) in an .mp4; H and W must be even.

    Single-threaded x264, so the same frames give the same bytes on the same library versions.
    """
    import av  # imported here so rendering works without PyAV

    path = Path(path)
    t, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 4:2:0 needs even sides, got {w}x{h}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        # High quality so the shapes' colours survive; no B-frames keeps decode order simple.
        stream.options = {"crf": "18", "preset": "medium", "bf": "0", "threads": "1"}
        for i in range(t):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def generate_videos(out_dir: str | Path, n_videos: int, *, seed: int = 0, size: int = 64, frames: int = 48,
                    fps: float = 12.0) -> Path:
    """Write `out_dir/videos/<video_id>.mp4` and `out_dir/manifest.csv`; return the manifest's path.

    Manifest columns: path,video_id,shape,colour,direction,speed (every column but path and video_id is
    a label to the pipeline). `path` is RELATIVE to the manifest's folder
    (e.g. `videos/synth00000.mp4`), so the folder can be moved or synced as a whole.
    Classes are balanced per label (counts differ by at most one). The manifest is written last, through
    a temporary name, so its presence means every listed video is complete.
    """
    if n_videos < 1:
        raise ValueError("n_videos must be >= 1")
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, params in enumerate(video_params(n_videos, seed=seed, size=size, frames=frames)):
        vid = video_id(i)
        rel = f"videos/{vid}.mp4"
        tmp = out_dir / "videos" / f".{vid}.tmp.mp4"
        write_mp4(tmp, render_video(params), fps)
        os.replace(tmp, out_dir / rel)
        rows.append({"path": rel, "video_id": vid, "shape": params.shape, "colour": params.colour,
                     "direction": params.direction, "speed": params.speed})
    manifest = out_dir / "manifest.csv"
    tmp = out_dir / ".manifest.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


def read_manifest(manifest: str | Path) -> list[dict[str, str]]:
    """The manifest's rows, with `path` resolved against the manifest's folder."""
    manifest = Path(manifest)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["path"] = str((manifest.parent / row["path"]).resolve())
    return rows
