"""`subsume demo`: the whole path on the embedded default, explained in plain words.

1. generate labelled sample videos (shape, colour: appearance; direction, speed: motion) as real H.264 .mp4 files
2. build the demo teacher: a small CLIPVisionModelWithProjection trained on still images of another world (naming
   that world's own shapes, none of them the videos'), never on the sample videos or their labels
3. extract: decode, sample, run the teacher once, write shards to a local store (Ray Data)
4. train a video student on the cached targets (Ray Train, 2 workers)
5. evaluate: kNN / linear probe on held-out videos, student vs random student vs teacher
Steps 1-2 are skipped when their outputs exist; 3 reuses the store (nothing is recomputed on a rerun).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from feature_store.spec import SamplingSpec, StorageSpec, TeacherSpec

DEMO_VIDEOS = 288  # 3 shapes x 3 colours x 4 directions x 2 speeds, 4 of each
VIDEO_FPS = 12.0  # the sample videos: 48 frames at 12 fps, the shape crossing much of the frame
DEMO_FPS = 4.0  # sampled at 4 fps: one 16-frame segment spans the whole motion, so views far apart differ
DEMO_SEGMENT = 16


def demo_train_config(steps: int | None = None, workers: int | None = None):
    from training.config import DataConfig, LoaderConfig, OptimConfig, TrainConfig
    from training.models import StudentConfig
    from training.objective import LossWeights

    # coord_channels: the student can say where the shape is (the teacher's frames are mostly about where);
    # temporal_derivative: its clip embedding keeps the order of frames (a plain mean cannot tell left from
    # right on these videos). The frame term weighs more than the default: on the demo data it is what
    # teaches position (and shape) per frame, and direction then shows in the derivative (docs/method.md).
    return TrainConfig(
        steps=steps or 500, workers=workers or 2, seed=0, checkpoint_every=100, log_every=20,
        student=StudentConfig(arch="r2plus1d", size="tiny", frames=8, image_size=64, coord_channels=True,
                              temporal_derivative=True),
        data=DataConfig(batch_size=16, shuffle_buffer=128),
        loader=LoaderConfig(num_workers=1),  # one decoder process per worker: the demo's 2 cores are shared
        optim=OptimConfig(lr=2e-3, warmup_steps=20),
        loss=LossWeights(cross=0.2, frame=1.0),
    )


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(workdir: str, *, steps: int | None = None, workers: int | None = None,
             quiet_json: bool = False) -> dict[str, Any]:
    from pipeline.extract import ExtractConfig, run_extract
    from subsume.commands import ensure_ray, format_eval
    from subsume.demo_teacher import build_demo_teacher
    from subsume.sample_data import generate_videos
    from training.evaluate import evaluate
    from training.locate import save_eval
    from training.train import run_train

    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    videos_dir, teacher_dir = os.path.join(workdir, "data"), os.path.join(workdir, "teacher")
    store_root, run_dir = os.path.join(workdir, "store"), os.path.join(workdir, "run")

    manifest = os.path.join(videos_dir, "manifest.csv")
    if not os.path.exists(manifest):
        say(f"[1/5] generating {DEMO_VIDEOS} labelled sample videos (H.264 .mp4) in {videos_dir}")
        generate_videos(videos_dir, DEMO_VIDEOS, seed=0, size=64, frames=48, fps=VIDEO_FPS)
    else:
        say(f"[1/5] sample videos already in {videos_dir}")
    say(f"[2/5] demo teacher in {teacher_dir} (trained once on still images of other shapes, never these videos)")
    build_demo_teacher(teacher_dir, seed=0, image_size=64, log=say)
    say("      " + teacher_probe_line(teacher_dir))

    say("[3/5] extracting: decode -> sample at 4 fps -> 16-frame segments -> teacher (once) -> shards")
    extract = run_extract(ExtractConfig(
        videos=manifest, store=store_root, teacher=TeacherSpec(model=os.path.abspath(teacher_dir)),
        sampling=SamplingSpec(fps=DEMO_FPS, segment_frames=DEMO_SEGMENT), storage=StorageSpec(),
        samples_per_shard=48, batch_size=128, progress=not quiet_json), connect=ensure_ray)
    key = extract["key"]
    say(f"      KEY {key}: {extract['videos_ok']} videos, {extract['samples']} samples, "
        f"{extract['frames_computed']} frames computed, {extract['frames_reused']} reused")

    cfg = demo_train_config(steps, workers)
    say(f"[4/5] training a tiny R(2+1)D student for {cfg.steps} steps on {cfg.workers} Ray Train worker(s), "
        "cached targets only (the teacher is not loaded)")
    if cfg.workers > 1:
        ensure_ray()
        train = run_train(cfg, store_root, key, run_dir, in_process=False)
    else:
        train = run_train(cfg, store_root, key, run_dir)
    say(f"      loss {train['loss_first']:.3f} -> {train['loss_last']:.3f}; checkpoint {train['checkpoint']}")

    say("[5/5] evaluating on held-out videos (kNN and linear probe)")
    ev = evaluate(train["checkpoint"])  # the checkpoint names its store, KEY snapshot and held-out fraction
    ev["eval_json"] = save_eval(ev)
    say(format_eval(ev))
    say(_story(ev))
    say(f"done in {time.perf_counter() - t0:.0f} s. Store: {store_root} (try: subsume store inspect {store_root} {key})")
    return {"workdir": os.path.abspath(workdir), "key": key, "extract": extract, "train": train, "eval": ev,
            "wall_s": round(time.perf_counter() - t0, 1)}


def teacher_probe_line(teacher_dir: str) -> str:
    """What the demo teacher knows about the videos' frames, as measured when it was built."""
    from subsume.demo_teacher import INFO_FILE

    probe = json.loads(Path(teacher_dir, INFO_FILE).read_text())["probe"]
    res, cfg = probe["results"], probe["config"]
    parts = [f"{name} {res['teacher'][name]['linear']:.2f} (random init {res['random_init'][name]['linear']:.2f}, "
             f"chance {probe['chance'][name]:.2f})" for name in res["teacher"]]
    return (f"teacher's frozen linear probe on {cfg['test_frames']} held-out frames of the sample generator "
            f"(trained on {cfg['train_frames']}): " + ", ".join(parts))


def _story(ev: dict[str, Any]) -> str:
    lines = ["What happened:"]
    for name, row in ev["per_label"].items():
        s, r, t = row["student_knn"], row["random_student_knn"], row["teacher_knn"]
        kind = "motion" if name in ("direction", "speed") else "appearance"
        lines.append(f"  {name} ({kind}): trained student {s:.2f} vs random student {r:.2f} vs image teacher's frame "
                     f"mean {t:.2f} (chance {row['chance']:.2f})")
    lines.append("  The image teacher sees one frame at a time and never saw these videos or their labels: it was "
                 "trained on still images of other shapes (what it knows about these frames was measured when it "
                 "was built, above, and is in teacher/demo_teacher.json). Its average over a clip cannot tell "
                 "direction or speed: a left-moving clip shows the same frames as a right-moving one played "
                 "backwards, a fast one the same stretch of path as a slow one. The student is trained only to "
                 "predict the teacher's embeddings of its frames; its clip embedding keeps how its features "
                 "change over the clip (their temporal derivative), which is where motion can show. No labels "
                 "are used in training. The comparison with the teacher is not like for like (its frame mean "
                 "against the student's own readout, one seed); `python -m benchmarks --only learning` reads the "
                 "teacher's frames out the students' ways too, beside a video-only baseline, over 3 seeds.")
    return "\n".join(lines)
