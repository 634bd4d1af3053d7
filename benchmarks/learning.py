"""Learning: what the image teacher buys, with baselines that share the readout, ablations, seeds and a
validation split (issue 13). `python -m benchmarks --only learning [--set learning_preset=quick]`.

Builds the demo data once in the work folder (videos, demo teacher, a KEY through `run_extract`), then trains
in-process, from the KEY held in memory, with the product's training step and evaluation
(benchmarks/learning_runs.py):

- the iBoot ablation ladder, one switch at a time (`learning_runs.LADDER`); the headline row is the default;
- the video-only BYOL student (same architecture, EMA 0.996 -> 1 cosine, brightness jitter);
- the same architecture at random init; the teacher's frame embeddings read out as a plain mean, with the
  students' temporal readout (mean and temporal derivative) and as concatenated frames.

The learning rate of the headline iBoot config and of BYOL is each chosen on the validation split from
`lrs` (seed 0); every other choice is fixed before the run. Reported numbers are the test split's; the
curves (and the target) are on validation. Each run's result is cached in the work folder, so a rerun with
the same --workdir only trains what is missing. Writes learning.json, learning.md and two PNGs to
`learning_out` (default: WORKDIR/learning/out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.learning_data import DataSpec, LearningData, prepare
from subsume.frame_probe import ProbeConfig
from benchmarks.learning_report import aggregate, markdown_table, plot_curves, reach_ratios, target_value
from benchmarks.learning_runs import (BYOL, LADDER, Probe, Variant, random_init_scores, step_flops,
                                      teacher_scores, train_and_evaluate, train_config)
from benchmarks.report import BenchResult, Target, clean
from benchmarks.session import BenchSession

NAME = "learning"
# The headline iBoot run reaches BYOL's final validation kNN within a third of BYOL's steps (worst seed),
# on an appearance and on a motion label.
TARGET = Target(1 / 3, higher_is_better=False)
REPO = Path(__file__).resolve().parents[1]
TEACHER_ROWS = {"teacher frames: mean": "mean", "teacher frames: mean + derivative": "mean_derivative",
                "teacher frames: concatenated": "concat"}


@dataclass(frozen=True)
class LearningPreset:
    data: DataSpec
    steps: int
    eval_every: int
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]  # swept on validation (seed 0) for the headline iBoot config and for BYOL
    batch_size: int = 16
    warmup_steps: int = 20
    headline: str = "+ derivative readout"  # the default path: the ladder without offset conditioning


PRESETS: dict[str, LearningPreset] = {
    # CI-sized: every row once, a handful of steps, a teacher trained for a few steps on few images.
    "quick": LearningPreset(
        data=DataSpec(videos=36, teacher_steps=20,
                      teacher_overrides=(("train_images", 256), ("batch_size", 32),
                                         ("probe", ProbeConfig(train_frames=64, test_frames=32)))),
        steps=4, eval_every=2, seeds=(0,), lrs=(2e-3,), batch_size=8, warmup_steps=2),
    # The demo's data (288 videos, the demo teacher), 3 seeds per configuration.
    # 20 training runs of 150 steps (~19 GFLOP a step for iBoot, ~26 for BYOL, flop_counter).
    "full": LearningPreset(data=DataSpec(videos=288), steps=150, eval_every=25, seeds=(0, 1, 2), lrs=(1e-3, 3e-3)),
}


def preset_of(cfg: Any) -> LearningPreset:
    if cfg.learning_preset not in PRESETS:
        raise ValueError(f"unknown learning_preset {cfg.learning_preset!r}; known: {sorted(PRESETS)}")
    p = PRESETS[cfg.learning_preset]
    if cfg.learning_steps:
        p = dataclasses.replace(p, steps=cfg.learning_steps, eval_every=max(1, cfg.learning_steps // 8))
    if cfg.learning_eval_every:
        p = dataclasses.replace(p, eval_every=cfg.learning_eval_every)
    if cfg.learning_seeds:
        p = dataclasses.replace(p, seeds=tuple(range(cfg.learning_seeds)))
    if cfg.learning_lrs:
        p = dataclasses.replace(p, lrs=tuple(float(x) for x in cfg.learning_lrs))
    return p


class Runner:
    """Trains (variant, lr, seed) once: results are cached as JSON beside the data, keyed by the config."""

    def __init__(self, data: LearningData, preset: LearningPreset, folder: Path, log: Any):
        from training.config import load_config

        self.data, self.preset, self.folder, self.log = data, preset, folder, log
        self.base = load_config(str(REPO / "configs" / "demo.yaml"))
        self.probe = Probe(data, self.base.student.frames)
        self.flops: dict[str, float] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def config(self, v: Variant, lr: float, seed: int):
        p = self.preset
        return train_config(self.base, v, seed=seed, steps=p.steps, lr=lr, batch_size=p.batch_size,
                            warmup_steps=p.warmup_steps)

    def one(self, v: Variant, lr: float, seed: int) -> dict[str, Any]:
        cfg = self.config(v, lr, seed)
        ident = json.dumps({"cfg": cfg.to_dict(), "key": self.data.key, "eval_every": self.preset.eval_every},
                           sort_keys=True)
        path = self.folder / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
        if path.exists():
            return json.loads(path.read_text())
        self.log(f"learning: training {v.name!r} lr {lr:g} seed {seed} ({cfg.steps} steps)")
        result = train_and_evaluate(self.data, self.probe, cfg, self.preset.eval_every, self.log)
        result.update(variant=v.name, lr=lr, seed=seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(clean(result)))
        os.replace(tmp, path)
        return result

    def choose_lr(self, v: Variant) -> tuple[float, dict[str, float]]:
        """The learning rate with the best mean validation kNN over labels (seed 0 of the preset)."""
        scores = {}
        for lr in self.preset.lrs:
            final = self.one(v, lr, self.preset.seeds[0])["final"]["val"]
            scores[f"{lr:g}"] = sum(r["knn"] for r in final.values()) / len(final)
        best = max(self.preset.lrs, key=lambda lr: scores[f"{lr:g}"])
        self.log(f"learning: {v.name!r}: validation kNN by lr {scores} -> lr {best:g}")
        return best, scores

    def seeds(self, v: Variant, lr: float) -> dict[str, Any]:
        runs = [self.one(v, lr, s) for s in self.preset.seeds]
        if v.name not in self.flops:
            self.flops[v.name] = step_flops(self.data, self.config(v, lr, 0))
        labels = sorted(self.data.labels)
        teacher = self.data.teacher_flops_per_frame * self.data.frames.shape[0] * self.data.frames.shape[1]
        return {"variant": dataclasses.asdict(v), "lr": lr, "curves": [r["curve"] for r in runs],
                "finals": [r["final"] for r in runs], "scores": aggregate([r["final"] for r in runs], labels),
                "step_flops": self.flops[v.name], "compute_offset": teacher if v.objective == "iboot" else 0.0,
                "wall_s": [r["wall_s"] for r in runs], "loss_last": [r["loss_last"] for r in runs]}


def fixed_rows(runner: Runner, headline: Variant, lr: float) -> dict[str, Any]:
    """The rows that train nothing: random init (per seed) and the teacher's three readouts."""
    data, probe, labels = runner.data, runner.probe, sorted(runner.data.labels)
    rand = [random_init_scores(data, probe, runner.config(headline, lr, s)) for s in runner.preset.seeds]
    rows = {"same architecture, random init": {"scores": aggregate(rand, labels), "finals": rand}}
    for name, kind in TEACHER_ROWS.items():
        final = teacher_scores(data, probe, runner.base.student.frames, kind)
        rows[name] = {"scores": aggregate([final], labels), "finals": [final]}
    return rows


def run(session: BenchSession) -> BenchResult:
    import torch

    cfg, preset = session.cfg, preset_of(session.cfg)
    torch.set_num_threads(cfg.learning_threads or os.cpu_count() or 1)
    work = session.workdir / "learning"
    data = prepare(str(work / "data"), preset.data, session.ensure_ray, session.log)
    runner = Runner(data, preset, work / "runs", session.log)
    headline = next(v for v in LADDER if v.name == preset.headline)
    lr_iboot, sweep_iboot = runner.choose_lr(headline)
    lr_byol, sweep_byol = runner.choose_lr(BYOL)
    ladder = [v for v in LADDER if v is headline or not cfg.learning_headline_only]
    trained = {v.name + (" (default)" if v is headline else ""): runner.seeds(v, lr_iboot) for v in ladder}
    trained[BYOL.name] = runner.seeds(BYOL, lr_byol)
    labels = sorted(data.labels)
    rows = {**fixed_rows(runner, headline, lr_iboot), **trained}
    ratios = reach_ratios(trained[headline.name + " (default)"], trained[BYOL.name], labels)
    value = target_value(ratios, data.appearance_labels, data.motion_labels)
    out = Path(cfg.learning_out) if cfg.learning_out else work / "out"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, labels)
    counts = data.counts()
    note = (f"test split: {counts['test']['samples']} clips of {counts['test']['videos']} videos; validation "
            f"{counts['val']['samples']}; train {counts['train']['samples']}; seeds {list(preset.seeds)}; "
            f"{preset.steps} steps of {preset.batch_size} clips"
            + ("; ablation rungs not run (learning_headline_only)" if cfg.learning_headline_only else ""))
    (out / "learning.md").write_text(f"{table}\n\n{note}\n")
    plots = plot_curves(trained, labels, str(out))
    figures = {"preset": cfg.learning_preset, "key": data.key, "labels": labels, "splits": counts,
               "steps": preset.steps, "eval_every": preset.eval_every, "seeds": list(preset.seeds),
               "batch_size": preset.batch_size, "lr": {"iboot": lr_iboot, "byol": lr_byol},
               "lr_sweep_val_knn": {"iboot": sweep_iboot, "byol": sweep_byol},
               "teacher_flops_per_frame": data.teacher_flops_per_frame, "extract": data.extract,
               "rows": rows, "reach": ratios, "table_md": table, "plots": plots}
    (out / "learning.json").write_text(json.dumps(clean(figures), indent=1))
    session.log(f"learning: wrote {out}\n{table}\n{note}")
    summary = (f"{headline.name} reaches BYOL's final val kNN at worst-seed step fraction "
               + ", ".join(f"{n} {_frac(ratios[n]['worst_fraction'])}" for n in labels))
    return BenchResult(NAME, value, TARGET, summary, figures, [note])


def _frac(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f}"
