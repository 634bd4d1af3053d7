"""Statistics of the learning benchmark: mean and 95% t-interval over seeds, steps to reach a level.

Pure (math and numpy only), so tests/test_learning.py checks it directly.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np


def _t_pdf(x: float, df: int) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_upper_half(x: float, df: int, n: int = 2000) -> float:
    """P(0 <= T <= x) by Simpson's rule (the density is smooth; 2000 panels give ~1e-10 here)."""
    h = x / n
    s = _t_pdf(0.0, df) + _t_pdf(x, df)
    s += sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, n))
    return s * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom (bisection on the CDF; no scipy)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while 0.5 + _t_cdf_upper_half(hi, df) < p:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + _t_cdf_upper_half(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """{mean, lo, hi, half, n, values}: the mean over seeds and its t-interval (None bounds for n < 2)."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    n = len(v)
    if not n:
        return {"mean": None, "lo": None, "hi": None, "half": None, "n": 0, "values": []}
    mean = float(np.mean(v))
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "half": None, "n": 1, "values": v}
    half = t_quantile(0.5 + level / 2, n - 1) * float(np.std(v, ddof=1)) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half": half, "n": n, "values": v}


def first_step_reaching(steps: Sequence[int], values: Sequence[float], level: float) -> int | None:
    """The first logged step whose value is >= level (None: never)."""
    for s, v in zip(steps, values):
        if v is not None and v >= level - 1e-12:
            return int(s)
    return None


def mean_curve(curves: list[dict[str, list[float]]], field: str) -> tuple[list[int], dict[str, list]]:
    """Curves of several seeds (same steps) -> (steps, {mean, lo, hi} lists) for one field."""
    steps = curves[0]["step"]
    stats = [mean_ci([c[field][i] for c in curves]) for i in range(len(steps))]
    return steps, {k: [s[k] for s in stats] for k in ("mean", "lo", "hi")}


def fmt_ci(s: dict[str, Any]) -> str:
    """'0.84 ± 0.05' (or '0.84' for one seed, 'n/a' for none)."""
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.2f}" if s["half"] is None else f"{s['mean']:.2f} ± {s['half']:.2f}"
