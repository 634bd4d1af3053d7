"""Still images for pretraining the demo teacher: a world other than the evaluation videos'.

A real image teacher (CLIP, DINOv2) was trained on photographs, not on the videos it is later asked about.
The demo teacher's stand-in for "photographs" is this generator: one or two objects from a shape set that
the evaluation videos never draw (ellipses and rectangles that are clearly not round or square, pentagons,
hexagons, stars, crosses, rings, crescents), in any colour of the hue circle, over gradients, stripes,
checkerboards or coloured blotches (muted, lower in contrast than the objects). It draws no circle, no square,
no triangle. `render_labelled_images` also gives this world's own labels - which of its shapes, where, how
big, its outline, which pixels it covers - for the supervised teacher; `render_pretrain_images` gives
unlabelled images (one or two objects) for the SimCLR option (`subsume.demo_teacher`). Neither ever carries
an evaluation label.

Pure numpy, drawn from `numpy.random.default_rng([seed, ...])`: the same seed gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRETRAIN_SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "pentagon", "hexagon", "star", "cross", "ring",
                                    "crescent")
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "checker", "blotches")
ELONGATION = (1.6, 2.6)  # long/short side of ellipses and rectangles: never round, never square
SIZE_RANGE = (0.14, 0.26)  # object "radius" as a fraction of the image side
SILHOUETTE = 16  # side of the object-centred silhouette grid
SILHOUETTE_REACH = 1.3  # the grid spans +-1.3 object radii, so every shape fits


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[..., 3] RGB in [0, 255] from hue, saturation, value in [0, 1]."""
    k = (np.stack([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    rgb = v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return 255.0 * rgb


def _polygon_dist(x: np.ndarray, y: np.ndarray, sides: int, radius: float) -> np.ndarray:
    apothem = radius * np.cos(np.pi / sides)
    angles = 2 * np.pi * np.arange(sides) / sides
    return np.max([np.cos(a) * x + np.sin(a) * y for a in angles], axis=0) - apothem


def shape_distance(shape: str, x: np.ndarray, y: np.ndarray, r: float, elong: float) -> np.ndarray:
    """Signed distance (pixels, approximately) to `shape` of size `r`, in the object's own frame."""
    if shape == "ellipse":
        a, b = r, r / elong
        return (np.hypot(x / a, y / b) - 1.0) * b
    if shape == "rectangle":
        return np.maximum(np.abs(x) - r, np.abs(y) - r / elong)
    if shape in ("pentagon", "hexagon"):
        return _polygon_dist(x, y, 5 if shape == "pentagon" else 6, r)
    if shape == "star":
        theta = np.arctan2(y, x)
        return np.hypot(x, y) - r * (0.62 + 0.38 * np.cos(5 * theta))
    if shape == "cross":
        arm = r / 3.0
        return np.minimum(np.maximum(np.abs(x) - r, np.abs(y) - arm), np.maximum(np.abs(x) - arm, np.abs(y) - r))
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.75 * r) - 0.25 * r
    if shape == "crescent":
        return np.maximum(np.hypot(x, y) - r, 0.8 * r - np.hypot(x - 0.45 * r, y))
    raise ValueError(f"unknown shape {shape!r}; expected one of {PRETRAIN_SHAPES}")


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two muted background colours (saturation <= 0.35), the second halfway to the first: the pattern
    has less contrast than the objects do."""
    hsv = rng.uniform((0.0, 0.0, 0.3), (1.0, 0.35, 0.8), size=(2, 3))
    rgb = hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2])
    return rgb[0], 0.5 * (rgb[0] + rgb[1])


def render_pretrain_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size, 3] in one of BACKGROUNDS."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * xs + np.sin(angle) * ys
    c0, c1 = _two_colours(rng)
    if kind == "gradient":
        w = (along - along.min()) / max(1e-6, float(along.max() - along.min()))
    elif kind == "stripes":
        w = 0.5 + 0.5 * np.sin(2 * np.pi * along * size / rng.uniform(5.0, 16.0))
    elif kind == "checker":
        cell = rng.uniform(4.0, 12.0) / size
        w = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)
    else:
        coarse = rng.uniform(0.0, 1.0, size=(5, 5))
        idx = np.minimum((np.arange(size) * 5) // size, 4)
        w = coarse[idx][:, idx]
    return (c0 * (1.0 - w[..., None]) + c1 * w[..., None]).astype(np.float32)


@dataclass(frozen=True)
class PaintedObject:
    """What `paint_object` drew: the pretraining world's own labels of one object."""

    shape: int  # index into PRETRAIN_SHAPES
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float  # pixels
    silhouette: np.ndarray  # float32 [SILHOUETTE, SILHOUETTE], see `silhouette`
    coverage: np.ndarray  # float32 [H, W] in [0, 1]: how much of each pixel the object covers


@dataclass(frozen=True)
class LabelledImages:
    """Still images of the pretraining world, one object each, with that world's labels (never the
    evaluation's): which of its shapes, where, how big."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    shape: np.ndarray  # int64 [N], index into PRETRAIN_SHAPES
    centre: np.ndarray  # float32 [N, 2], (x, y) in pixels
    radius: np.ndarray  # float32 [N], pixels
    silhouette: np.ndarray  # float32 [N, SILHOUETTE, SILHOUETTE], each object's own `silhouette`
    coverage: np.ndarray  # uint8 [N, H, W]: 255 * how much of each pixel the object covers


def _rotated(dx: np.ndarray, dy: np.ndarray, rot: float) -> tuple[np.ndarray, np.ndarray]:
    return np.cos(rot) * dx + np.sin(rot) * dy, -np.sin(rot) * dx + np.cos(rot) * dy


def silhouette(shape: str, r: float, elong: float, rot: float, grid: int = SILHOUETTE) -> np.ndarray:
    """float32 [grid, grid] in [0, 1]: the object's coverage on a grid centred on it, spanning
    +-SILHOUETTE_REACH radii along the image's axes (row-major, y down like the image): its outline,
    orientation included, whatever its position and size."""
    g = ((np.arange(grid) + 0.5) / grid * 2 - 1) * SILHOUETTE_REACH * r
    dy, dx = np.meshgrid(g, g, indexing="ij")
    x, y = _rotated(dx, dy, rot)
    return np.clip(0.5 - shape_distance(shape, x, y, r, elong), 0.0, 1.0).astype(np.float32)


def paint_object(img: np.ndarray, rng: np.random.Generator) -> PaintedObject:
    """Paint one random object of PRETRAIN_SHAPES, in a saturated random colour, into `img` (in place)."""
    size = img.shape[0]
    index = int(rng.integers(len(PRETRAIN_SHAPES)))
    shape = PRETRAIN_SHAPES[index]
    r = float(rng.uniform(*SIZE_RANGE) * size)
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)
    rot = float(rng.uniform(0, 2 * np.pi))
    elong = float(rng.uniform(*ELONGATION))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    x, y = _rotated(xs - cx, ys - cy, rot)
    alpha = np.clip(0.5 - shape_distance(shape, x, y, r, elong), 0.0, 1.0)[..., None]
    colour = hsv_to_rgb(np.array(rng.uniform(0, 1)), np.array(rng.uniform(0.45, 1.0)),
                        np.array(rng.uniform(0.45, 1.0)))
    img *= 1.0 - alpha
    img += alpha * colour.astype(np.float32)
    return PaintedObject(index, (float(cx), float(cy)), r, silhouette(shape, r, elong, rot), alpha[..., 0])


def render_pretrain_images(n: int, *, seed: int = 0, size: int = 64) -> np.ndarray:
    """uint8 [n, size, size, 3]: unlabelled still images, one or two objects each."""
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, 0x5EED, i])
        img = render_pretrain_background(size, rng)
        for _ in range(1 + int(rng.uniform() < 0.4)):
            paint_object(img, rng)
        out[i] = _finish(img, rng)
    return out


def render_labelled_images(n: int, *, seed: int = 0, size: int = 64) -> LabelledImages:
    """n images of one object each, with this world's own labels (which of its shapes, where, how big),
    never the evaluation's."""
    out = np.empty((n, size, size, 3), np.uint8)
    drawn = []
    for i in range(n):
        rng = np.random.default_rng([seed, 0x1ABE1, i])
        img = render_pretrain_background(size, rng)
        drawn.append(paint_object(img, rng))
        out[i] = _finish(img, rng)
    return LabelledImages(
        images=out, shape=np.array([d.shape for d in drawn], np.int64),
        centre=np.array([d.centre for d in drawn], np.float32).reshape(n, 2),
        radius=np.array([d.radius for d in drawn], np.float32),
        silhouette=np.stack([d.silhouette for d in drawn]).reshape(n, SILHOUETTE, SILHOUETTE),
        coverage=np.rint(255 * np.stack([d.coverage for d in drawn])).astype(np.uint8).reshape(n, size, size))


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor grain, then uint8."""
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
