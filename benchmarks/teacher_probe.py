"""What the demo teacher knows about the evaluation videos, next to random teachers of the same architecture.

`python -m benchmarks.teacher_probe [--teacher DIR | --teacher-seeds 0,1,2] [--random-seeds 0,1,2]
[--probe-seeds 1001,1002] [--train-frames N --test-frames M] [--json]`

Not one of `python -m benchmarks`' default benchmarks: a measurement, run by hand. It loads a saved demo
teacher (`subsume demo` writes one to demo-work/teacher), or pretrains one per --teacher-seeds with the
default configuration (a few minutes each on 2 cores), builds the same architecture at random init from
several seeds, and fits frozen probes (logistic regression, and kNN with k=5) on each one's embeddings of
single frames of the evaluation generator at seeds the demo does not use (one frame set per --probe-seeds).
Prints accuracy per label (mean over the probe seeds) with the sample counts and chance; --json adds one
JSON object as the last line, with every (model, probe seed) result.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.teacher_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="", help="a saved demo teacher folder")
    p.add_argument("--teacher-seeds", default="", help="without --teacher: pretrain one teacher per seed now")
    p.add_argument("--random-seeds", default="0,1,2", help="seeds of the random-init teachers")
    p.add_argument("--probe-seeds", default="", help="seeds of the probe's videos (default: the config's)")
    p.add_argument("--train-frames", type=int, default=None)
    p.add_argument("--test-frames", type=int, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def load_teacher(folder: str):
    """(model, DemoTeacherConfig) from a folder that `subsume.demo_teacher.save_demo_teacher` wrote."""
    from transformers import CLIPVisionModelWithProjection

    from subsume import demo_teacher as dt
    from subsume import frame_probe as fp

    saved = json.loads((Path(folder) / dt.INFO_FILE).read_text())["config"]
    saved["probe"] = fp.ProbeConfig(**saved["probe"])
    saved["crop_scale"] = tuple(saved["crop_scale"])
    cfg = dt.DemoTeacherConfig(**saved)
    return CLIPVisionModelWithProjection.from_pretrained(folder).eval(), cfg


def teachers(args: argparse.Namespace) -> tuple[dict, object]:
    """{name: embed} of the teachers to probe, and the configuration they share."""
    from subsume import demo_teacher as dt

    if args.teacher:
        model, cfg = load_teacher(args.teacher)
        return {"teacher": dt.embedder(model)}, cfg
    out, cfg = {}, dt.DemoTeacherConfig()
    for seed in _seeds(args.teacher_seeds) or [cfg.seed]:
        model, _ = dt.train_demo_teacher(replace(cfg, seed=seed), log=lambda m: print(m, file=sys.stderr))
        out[f"teacher_seed{seed}"] = dt.embedder(model)
    return out, cfg


def main(argv: list[str] | None = None) -> int:
    from subsume import demo_teacher as dt
    from subsume import frame_probe as fp

    args = parse_args(argv)
    models, cfg = teachers(args)
    for seed in _seeds(args.random_seeds):
        models[f"random_init_seed{seed}"] = dt.embedder(dt.build_model(replace(cfg, seed=seed)).eval())
    sizes = {k: v for k, v in (("train_frames", args.train_frames), ("test_frames", args.test_frames))
             if v is not None}
    reports = [fp.probe_models(models, replace(cfg.probe, size=cfg.image_size, seed=seed, **sizes))
               for seed in (_seeds(args.probe_seeds) or [cfg.probe.seed])]
    print(format_table(reports))
    if args.json:
        print(json.dumps({"config": reports[0]["config"], "probe_seeds": [r["config"]["seed"] for r in reports],
                          "chance": [r["chance"] for r in reports], "results": [r["results"] for r in reports]},
                         sort_keys=True))
    return 0


def format_table(reports: list[dict]) -> str:
    cfg = reports[0]["config"]
    labels = list(reports[0]["chance"])
    seeds = ",".join(str(r["config"]["seed"]) for r in reports)
    lines = [f"probe frames: {cfg['train_frames']} train / {cfg['test_frames']} test per probe seed ({seeds}), one "
             f"per video of subsume.sample_data; accuracy linear / kNN (k={cfg['k']}), mean over probe seeds",
             f"{'model':<22}" + "".join(f"{lab:>16}" for lab in labels)]

    def row(name: str, results: list[dict]) -> str:
        return f"{name:<22}" + "".join(
            f"{np.mean([r[lab]['linear'] for r in results]):>9.3f} /{np.mean([r[lab]['knn'] for r in results]):.3f}"
            for lab in labels)

    for who in reports[0]["results"]:
        lines.append(row(who, [r["results"][who] for r in reports]))
    for kind in ("teacher", "random_init"):
        group = [r["results"][w] for r in reports for w in r["results"] if w.startswith(kind)]
        if len(group) > len(reports):
            lines.append(row(f"{kind} mean", group))
    lines.append(f"{'chance':<22}" + "".join(f"{np.mean([r['chance'][lab] for r in reports]):>16.3f}"
                                            for lab in labels))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
