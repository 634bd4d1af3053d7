"""What the demo teacher knows about the evaluation videos, next to random teachers of the same architecture.

`python -m benchmarks.teacher_probe [--teacher DIR] [--random-seeds 0,1,2] [--train-frames N --test-frames M]
[--json]`

Not one of `python -m benchmarks`' default benchmarks: a measurement, run by hand. It loads a saved demo
teacher (`subsume demo` writes one to demo-work/teacher; without --teacher, one is pretrained here with the
default schedule, a couple of minutes on 2 cores), builds the same architecture at random init from several
seeds, and fits frozen probes (logistic regression, and kNN with k=5) on each one's embeddings of single
frames of the evaluation generator at a seed the demo does not use. Prints accuracy per label with the
sample counts and chance; --json adds one JSON object as the last line.
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
    p.add_argument("--teacher", default="", help="a saved demo teacher folder (default: pretrain one now)")
    p.add_argument("--random-seeds", default="0,1,2", help="seeds of the random-init teachers")
    p.add_argument("--probe-seed", type=int, default=None, help="seed of the probe's videos (default: the config's)")
    p.add_argument("--train-frames", type=int, default=None)
    p.add_argument("--test-frames", type=int, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    from subsume import demo_teacher as dt
    from subsume import frame_probe as fp

    args = parse_args(argv)
    if args.teacher:
        model, cfg = load_teacher(args.teacher)
    else:
        model, _ = dt.train_demo_teacher(dt.DemoTeacherConfig(), log=lambda m: print(m, file=sys.stderr))
        cfg = dt.DemoTeacherConfig()
    probe_cfg = replace(cfg.probe, size=cfg.image_size,
                        **{k: v for k, v in (("seed", args.probe_seed), ("train_frames", args.train_frames),
                                             ("test_frames", args.test_frames)) if v is not None})
    models = {"teacher": dt.embedder(model)}
    for seed in (int(s) for s in args.random_seeds.split(",") if s):
        models[f"random_init_seed{seed}"] = dt.embedder(dt.build_model(replace(cfg, seed=seed)).eval())
    report = fp.probe_models(models, probe_cfg)
    print(format_table(report))
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0


def format_table(report: dict) -> str:
    cfg = report["config"]
    labels = list(report["chance"])
    lines = [f"probe frames: {cfg['train_frames']} train / {cfg['test_frames']} test, one per video of "
             f"subsume.sample_data seed {cfg['seed']}; accuracy linear / kNN (k={cfg['k']})",
             f"{'model':<22}" + "".join(f"{lab:>16}" for lab in labels)]
    for who, res in report["results"].items():
        lines.append(f"{who:<22}" + "".join(f"{res[lab]['linear']:>9.3f} /{res[lab]['knn']:.3f}" for lab in labels))
    randoms = [r for who, r in report["results"].items() if who.startswith("random_init")]
    if randoms:
        lines.append(f"{'random_init mean':<22}" + "".join(
            f"{np.mean([r[lab]['linear'] for r in randoms]):>9.3f} /{np.mean([r[lab]['knn'] for r in randoms]):.3f}"
            for lab in labels))
    lines.append(f"{'chance':<22}" + "".join(f"{report['chance'][lab]:>16.3f}" for lab in labels))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
