"""What an image teacher knows about the evaluation videos: frozen probes on its embeddings of single frames.

Frames come from the demo's video generator (`subsume.sample_data`) at a seed the demo does not use, one
frame per video at a random time. The teacher is frozen; a linear probe (multinomial logistic regression
on standardised embeddings, L2-regularised) and a kNN (cosine, after centring on the probe-train mean) are fitted on the
first part of the frames and scored on the rest. Appearance labels (shape, colour) and where the shape is
(`position`: the quadrant of the frame its centre is in; the student learns motion as change of position) are
probed; a single frame cannot show direction or speed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from subsume import sample_data

GRID = 2  # quadrants: the shape's centre is drawn symmetrically about the frame's, so they are near balanced
PROBE_LABELS: dict[str, tuple[str, ...]] = {"shape": sample_data.SHAPES, "colour": sample_data.COLOUR_NAMES,
                                            "position": tuple(f"cell{i}" for i in range(GRID * GRID))}


@dataclass(frozen=True)
class ProbeConfig:
    seed: int = 1001  # the demo's videos use seed 0
    train_frames: int = 432
    test_frames: int = 216
    size: int = 64
    k: int = 5
    l2: float = 1e-3  # weight decay of the linear probe


@dataclass(frozen=True)
class ProbeFrames:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: dict[str, np.ndarray]  # int64 [N] per label, indices into PROBE_LABELS[label]


def position_cell(centre: tuple[float, float], size: int) -> int:
    """Row-major index of the GRID x GRID cell holding `centre` (x, y)."""
    col = min(int(centre[0] * GRID / size), GRID - 1)
    row = min(int(centre[1] * GRID / size), GRID - 1)
    return row * GRID + col


def probe_frames(n: int, *, seed: int, size: int = 64, frames: int = 48) -> ProbeFrames:
    """One frame at a random time from each of n videos of the evaluation generator (shape and colour
    balanced; position as it falls)."""
    rng = np.random.default_rng([seed, 0xF4A3E])
    params = sample_data.video_params(n, seed=seed, size=size, frames=frames)
    times = rng.integers(frames, size=n)
    images = np.stack([sample_data.render_video_frame(p, int(t)) for p, t in zip(params, times)])
    labels = {name: np.array([PROBE_LABELS[name].index(getattr(p, name)) for p in params], np.int64)
              for name in ("shape", "colour")}
    labels["position"] = np.array([position_cell(p.centre(int(t)), size) for p, t in zip(params, times)], np.int64)
    return ProbeFrames(images, labels)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, *, l2: float = 1e-3, steps: int = 30) -> np.ndarray:
    """Multinomial logistic regression (mean cross-entropy + l2 * |W|^2, bias unpenalised) by Newton's
    method, in float64 numpy (small and exact; a torch optimiser's per-step overhead dominates here).
    x: [N, D]; returns W [D + 1, K], the last row the bias."""
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    n, d = xb.shape
    onehot = np.eye(classes)[y]
    penalty = np.full(d, 2 * l2)
    penalty[-1] = 1e-8
    w = np.zeros((d, classes))
    for _ in range(steps):
        p = _softmax(xb @ w)
        grad = xb.T @ (p - onehot) / n + penalty[:, None] * w
        # Hessian over (feature, class) pairs: block (k, l) is sum_n (p_nk [k == l] - p_nk p_nl) x_n x_n^T / n.
        hess = np.empty((d, classes, d, classes))
        for k in range(classes):
            for m in range(classes):
                weight = p[:, k] * ((k == m) - p[:, m])
                hess[:, k, :, m] = (xb * weight[:, None]).T @ xb / n
        hess = hess.reshape(d * classes, d * classes) + np.diag(np.repeat(penalty, classes))
        step = np.linalg.solve(hess, grad.reshape(-1)).reshape(d, classes)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          *, l2: float = 1e-3) -> float:
    """Logistic regression on features standardised with the train split's mean/std; test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = fit_logistic((train_x - mean) / std, train_y, classes, l2=l2)
    xte = (test_x - mean) / std
    logits = xte @ w[:-1] + w[-1]
    return float((logits.argmax(1) == test_y).mean())


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 *, k: int = 5) -> float:
    """Majority vote of the k nearest probe-train frames by cosine, after centring on the train mean (a
    teacher's embeddings share a large common direction)."""
    mean = train_x.mean(0)
    a = train_x - mean
    b = test_x - mean
    a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-8)
    b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-8)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    votes = train_y[nearest]
    predicted = np.array([np.bincount(v, minlength=int(train_y.max()) + 1).argmax() for v in votes])
    return float((predicted == test_y).mean())


def probe_embeddings(embeds: np.ndarray, frames: ProbeFrames, cfg: ProbeConfig) -> dict[str, dict[str, float]]:
    """{label: {"linear": acc, "knn": acc}}: fitted on the first cfg.train_frames, scored on the rest."""
    n = cfg.train_frames
    out = {}
    for name in PROBE_LABELS:
        y = frames.labels[name]
        out[name] = {
            "linear": linear_probe_accuracy(embeds[:n], y[:n], embeds[n:], y[n:], l2=cfg.l2),
            "knn": knn_accuracy(embeds[:n], y[:n], embeds[n:], y[n:], k=cfg.k),
        }
    return out


def probe_models(models: dict[str, Callable[[np.ndarray], np.ndarray]], cfg: ProbeConfig = ProbeConfig()) -> dict:
    """Probe each `name -> embed(images uint8 [N,H,W,3]) -> [N, D]` on the same frames; a JSON-able report
    with sample counts and chance levels."""
    frames = probe_frames(cfg.train_frames + cfg.test_frames, seed=cfg.seed, size=cfg.size)
    test = {name: y[cfg.train_frames:] for name, y in frames.labels.items()}
    return {
        "frames": "one frame at a random time per video of subsume.sample_data (the evaluation generator)",
        "config": asdict(cfg),
        "chance": {name: float(np.bincount(y).max() / len(y)) for name, y in test.items()},  # majority class
        "results": {name: probe_embeddings(embed(frames.images), frames, cfg) for name, embed in models.items()},
    }
