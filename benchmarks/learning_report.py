"""The learning benchmark's outputs: aggregated rows (mean and 95% t-interval over seeds, per label, split
and probe), the markdown table, the target check and the PNG curves (validation accuracy against steps and
against training compute)."""

from __future__ import annotations

import math
import os
from typing import Any

from benchmarks.learning_stats import first_step_reaching, fmt_ci, mean_ci, mean_curve

PROBES = ("knn", "linear")


def aggregate(finals: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per split / label / probe: mean_ci over the seeds' final scores."""
    return {split: {n: {p: mean_ci([f[split][n][p] for f in finals]) for p in PROBES} for n in labels}
            for split in ("val", "test")}


def markdown_table(rows: dict[str, dict[str, Any]], labels: list[str], split: str = "test") -> str:
    """Rows x labels, each cell 'kNN / linear' as mean ± 95% half-interval, with the seed count."""
    head = "| configuration | seeds | " + " | ".join(f"{n} kNN / linear" for n in labels) + " |"
    out = [head, "|" + "---|" * (len(labels) + 2)]
    for name, row in rows.items():
        agg = row["scores"][split]
        cells = [f"{fmt_ci(agg[n]['knn'])} / {fmt_ci(agg[n]['linear'])}" for n in labels]
        out.append(f"| {name} | {agg[labels[0]]['knn']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def reach_ratios(headline: dict[str, Any], baseline: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Per label: the baseline's final validation kNN (mean over its seeds) and, for each seed of the
    headline run, the fraction of the baseline's steps it took to reach it (None: never reached)."""
    steps = baseline["curves"][0]["step"][-1]
    out = {}
    for n in labels:
        level = mean_ci([c[n][-1] for c in baseline["curves"]])["mean"]
        reached = [first_step_reaching(c["step"], c[n], level) for c in headline["curves"]]
        fractions = [None if r is None else r / steps for r in reached]
        mean_steps, mean_vals = mean_curve(headline["curves"], n)
        mean_reach = first_step_reaching(mean_steps, mean_vals["mean"], level)
        out[n] = {"baseline_final_val_knn": level, "steps_per_seed": reached, "fraction_per_seed": fractions,
                  "worst_fraction": None if None in fractions else max(fractions),
                  "mean_curve_fraction": None if mean_reach is None else mean_reach / steps}
    return out


def target_value(ratios: dict[str, Any], appearance: list[str], motion: list[str]) -> float | None:
    """The worse of (best appearance label, best motion label), each label at its worst seed: <= 1/3 means
    the headline run reached the baseline's final validation accuracy within a third of its steps on both
    kinds of label, for every seed."""
    def best(names: list[str]) -> float:
        vals = [ratios[n]["worst_fraction"] for n in names if n in ratios]
        vals = [v for v in vals if v is not None]
        return min(vals) if vals else math.inf

    if not appearance or not motion:
        return None
    value = max(best(appearance), best(motion))
    return None if math.isinf(value) else value


def plot_curves(runs: dict[str, dict[str, Any]], labels: list[str], out_dir: str) -> list[str]:
    """Two PNGs: validation kNN per label against steps, and against training compute (FLOPs, teacher
    extraction included for iBoot); mean over seeds with the 95% interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis in ("steps", "compute"):
        fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.4), squeeze=False)
        for ax, n in zip(axes[0], labels):
            for name, run in runs.items():
                steps, stats = mean_curve(run["curves"], n)
                x = steps if axis == "steps" else [run["compute_offset"] + s * run["step_flops"] for s in steps]
                lo = [m if v is None else v for m, v in zip(stats["mean"], stats["lo"])]
                hi = [m if v is None else v for m, v in zip(stats["mean"], stats["hi"])]
                line, = ax.plot(x, stats["mean"], label=name, lw=1.4)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
            ax.set_title(n)
            ax.set_xlabel("training step" if axis == "steps" else "training FLOPs (incl. teacher extraction)")
            ax.set_ylabel("validation kNN accuracy")
            ax.set_ylim(0, 1.02)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out_dir, f"learning-{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
