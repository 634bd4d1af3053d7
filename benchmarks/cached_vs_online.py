"""Cached vs online training: samples/s of the same student step with cached targets and with the teacher in
the loop, at each teacher size, against the ideal speed-up from the two costs measured alone.

ideal = (teacher forward + student step) / student step, per sample; the measured speed-up is
online time / cached time. value = measured / ideal (the smallest over teachers); 1.0 means caching saves
exactly the teacher's cost, less means the online path was cheaper than its parts (or noise), more that
it cost more than its parts.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.measure import median, timed
from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession
from benchmarks.student_step import StudentStep, bench_train_config
from training.objective import target_stats

NAME = "cached_vs_online"
TARGET = Target(0.9)
CHEAP_TEACHER_IDEAL = 1.2  # below this ideal speed-up the ratio compares two nearly equal times


def _batch(session: BenchSession, teacher: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed batch of samples and their cached targets (float16, as stored), plus the target stats."""
    cfg = session.cfg
    b, t, s = cfg.batch_size, cfg.segment_frames, cfg.image_size
    frames = session.frames(b * t, seed=1)
    emb = teacher.embed_batched(frames, cfg.extract_batch).embeds.to(torch.float16).float()
    mean, std = target_stats(emb)
    return frames.reshape(b, t, s, s, 3), emb.reshape(b, t, -1), mean, std


def _step(session: BenchSession, teacher: Any, mean: torch.Tensor, std: torch.Tensor) -> StudentStep:
    cfg = session.cfg
    tcfg = bench_train_config(arch=cfg.student_arch, size=cfg.student_size, frames=cfg.view_frames,
                              image_size=cfg.image_size, patch=cfg.student_patch, batch_size=cfg.batch_size,
                              seed=cfg.seed)
    return StudentStep(tcfg, teacher.embed_dim, session.device, mean, std)


def measure_teacher(session: BenchSession, name: str) -> dict[str, Any]:
    cfg, dev = session.cfg, session.device
    teacher, load_s = session.teacher(name)
    frames, targets, mean, std = _batch(session, teacher)
    step = _step(session, teacher, mean, std)
    session.log(f"{NAME}: {name} teacher, {cfg.repeats * cfg.steps} steps of {cfg.batch_size} samples per mode")

    def cached(i: int) -> None:
        step(frames, targets, i)

    def online(i: int) -> None:
        step(frames, targets, i, teacher=teacher)

    def teacher_alone(i: int) -> None:
        step.teacher_only(teacher, frames, targets, i)

    modes = (cached, teacher_alone, online)
    for i in range(cfg.warmup_steps):
        for fn in modes:
            timed(lambda: fn(i), dev)
    # Interleaved step by step, so a change in the machine's speed (other work on it) hits all three alike;
    # per-sample costs are medians over all steps (a burst of other work spoils a few steps, not the median).
    times: list[list[float]] = [[], [], []]
    for i in range(cfg.repeats * cfg.steps):
        for k, fn in enumerate(modes):
            times[k].append(timed(lambda: fn(i), dev))
    b = cfg.batch_size
    s, t, o = (median(ts) / b for ts in times)
    ideal = (t + s) / s
    speedup = o / s
    per_repeat = []  # the same ratio from each repeat's sums, to show the spread
    for r in range(cfg.repeats):
        tc, tt, to = (sum(ts[r * cfg.steps:(r + 1) * cfg.steps]) for ts in times)
        per_repeat.append((to / tc) / ((tt + tc) / tc))
    session.student_rates[name] = 1 / s
    return {
        "teacher_params_m": sig((session.teacher_dir(name) / "model.safetensors").stat().st_size / 4e6, 3),  # fp32
        "embed_dim": teacher.embed_dim,
        "teacher_frames_per_sample": 2 * cfg.view_frames,
        "teacher_load_s": sig(load_s, 3),
        "cached_samples_per_s": sig(1 / s),
        "online_samples_per_s": sig(1 / o),
        "student_step_ms_per_sample": sig(1e3 * s),
        "teacher_fwd_ms_per_sample": sig(1e3 * t),
        "speedup": sig(speedup),
        "ideal_speedup": sig(ideal),
        "of_ideal": sig(speedup / ideal),
        "of_ideal_per_repeat": [sig(x) for x in per_repeat],
    }


def student_rate(session: BenchSession, name: str) -> float:
    """Cached samples/s of the student step (measured here unless cached_vs_online already did)."""
    if name not in session.student_rates:
        cfg, dev = session.cfg, session.device
        teacher, _ = session.teacher(name)
        frames, targets, mean, std = _batch(session, teacher)
        step = _step(session, teacher, mean, std)
        timed(lambda: [step(frames, targets, i) for i in range(cfg.warmup_steps)], dev)
        times = [timed(lambda: [step(frames, targets, i) for i in range(cfg.steps)], dev) for _ in range(cfg.repeats)]
        session.student_rates[name] = cfg.steps * cfg.batch_size / median(times)
    return session.student_rates[name]


def run(session: BenchSession) -> BenchResult:
    cfg = session.cfg
    per_teacher = {name: measure_teacher(session, name) for name in cfg.teachers}
    value = min(f["of_ideal"] for f in per_teacher.values())
    summary = "; ".join(f"{n}: {f['speedup']:.2f}x of ideal {f['ideal_speedup']:.2f}x" for n, f in per_teacher.items())
    notes = []
    for n, f in per_teacher.items():
        if f["ideal_speedup"] < CHEAP_TEACHER_IDEAL:
            notes.append(f"with the {n} teacher the ideal speed-up is only {f['ideal_speedup']:.2f}x (its forward "
                         f"costs {f['teacher_fwd_ms_per_sample'] / f['student_step_ms_per_sample']:.0%} of a student "
                         "step), so its ratio compares two nearly equal times: it shows that the online step costs "
                         "what its two parts cost alone, not a saving")
    figures = {"teachers": per_teacher, "device": str(session.device), "batch_size": cfg.batch_size,
               "view_frames": cfg.view_frames, "student": f"{cfg.student_arch}-{cfg.student_size}",
               "image_size": cfg.image_size, "torch_threads": torch.get_num_threads()}
    return BenchResult(NAME, value, TARGET, summary, figures, notes)
