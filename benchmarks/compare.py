"""What the image teacher buys: steps each objective needs to reach a held-out kNN accuracy.

Trains the same student with the iBoot objective (cached teacher targets) and with the video-only BYOL
baseline (EMA target, no teacher) on the same KEY, seed and data order, logging held-out kNN every
`eval_every` steps, and reports the first step at which each reaches `threshold` (mean over label columns
and per label).

    python -m benchmarks.compare --config configs/demo.yaml --store demo-work/store --key fk-... --out runs/compare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from training.config import TrainConfig, load_config
from training.train import run_train


def read_knn_curve(run_dir: str) -> list[dict[str, Any]]:
    """The knn_* records of a run's metrics.jsonl, last record per step."""
    rows: dict[int, dict[str, Any]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if any(k.startswith("knn_") for k in r):
                rows[r["step"]] = {k: v for k, v in r.items() if k == "step" or k.startswith("knn_")}
    return [rows[s] for s in sorted(rows)]


def steps_to_reach(curve: list[dict[str, Any]], field: str, threshold: float) -> int | None:
    for r in curve:
        if r.get(field, -1.0) >= threshold:
            return r["step"]
    return None


def compare(base: TrainConfig, root: str, key: str, out: str, *, threshold: float) -> dict[str, Any]:
    results: dict[str, Any] = {"threshold": threshold, "key": key, "steps": base.steps}
    for objective in ("iboot", "byol"):
        cfg = dataclasses.replace(base, objective=objective, workers=1)
        run_dir = os.path.join(out, objective)
        summary = run_train(cfg, root, key, run_dir, in_process=True, log=lambda m: None)
        curve = read_knn_curve(run_dir)
        fields = [k for k in curve[-1] if k.startswith("knn_")] if curve else []
        results[objective] = {
            "final": {k: curve[-1][k] for k in fields} if curve else {},
            "steps_to_threshold": {k: steps_to_reach(curve, k, threshold) for k in fields},
            "loss_last": summary["loss_last"],
        }
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--out", required=True, help="folder for the two runs")
    p.add_argument("--config", default=None, help="training config YAML (default: TrainConfig's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threshold", type=float, default=0.7, help="held-out kNN accuracy to reach (default 0.7)")
    a = p.parse_args(argv)
    base = load_config(a.config, a.set)
    base = dataclasses.replace(base, steps=a.steps, eval_every=a.eval_every, checkpoint_every=a.steps)
    print(json.dumps(compare(base, a.store, a.key, a.out, threshold=a.threshold), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
