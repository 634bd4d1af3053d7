"""Results, targets and their presentation: one `BenchResult` per benchmark, a text table, the JSON object.

Pure: nothing here measures anything, so it is what tests/test_benchmarks.py checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class Target:
    """A ratio's goal: `value >= threshold` (higher is better) or `value <= threshold`."""

    threshold: float
    higher_is_better: bool = True

    @property
    def op(self) -> str:
        return ">=" if self.higher_is_better else "<="

    def met(self, value: float | None) -> bool | None:
        """None when there is no value (not measured here), else whether the value reaches the threshold."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return value >= self.threshold if self.higher_is_better else value <= self.threshold

    def describe(self) -> str:
        return f"{self.op} {self.threshold:g}"


@dataclass
class BenchResult:
    """One benchmark's figures, the ratio that is compared with its target, and a one-line summary."""

    name: str
    value: float | None
    target: Target
    summary: str  # the key figures, for the table
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # caveats, and why a value is missing or a target missed

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value)

    def to_json(self) -> dict[str, Any]:
        out = {**clean(self.figures), "value": clean(self.value), "target": self.target.threshold,
               "target_op": self.target.op, "met": self.met}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, NaN/inf to None, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def sig(x: float | None, digits: int = 4) -> float | None:
    """Round to `digits` significant digits (figures are measurements, not exact numbers)."""
    if x is None or not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return round(float(x), digits - 1 - int(math.floor(math.log10(abs(x)))))


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def results_json(results: Iterable[BenchResult]) -> dict[str, Any]:
    """The `--json` object: benchmark name -> figures + value, target, met."""
    return {r.name: r.to_json() for r in results}


def json_line(results: Iterable[BenchResult]) -> str:
    return json.dumps(results_json(results), sort_keys=False, separators=(",", ":"))


def _fmt_value(v: float | None, target: Target) -> str:
    """Enough decimals to compare with the threshold: two more than it has (0.9999 -> 6, 0.9 -> 3, 3 -> 2)."""
    if v is None:
        return "n/a"
    t = f"{target.threshold:g}"
    decimals = (len(t.split(".", 1)[1]) if "." in t else 0) + 2
    return f"{v:.{decimals}f}"


def _fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[met]


TABLE_HEADER = ("benchmark", "measured", "value", "target", "met")


def table_rows(results: Iterable[BenchResult]) -> list[tuple[str, str, str, str, str]]:
    return [(r.name, r.summary, _fmt_value(r.value, r.target), r.target.describe(), _fmt_met(r.met)) for r in results]


def format_table(results: Iterable[BenchResult]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    rows = [TABLE_HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: Iterable[BenchResult]) -> str:
    rows = table_rows(results)
    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(["---"] * len(TABLE_HEADER)) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)
