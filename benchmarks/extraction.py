"""Extraction efficiency: frames/s of the Ray Data pipeline against (a) a plain single-process loop doing the
same decode-teacher-write and (b) the bound set by the slowest stage measured alone.

- Pipeline: steady state = the largest scaling run's frames over the time its teacher stage worked, from
  the first teacher call's start to the last one's end (`pipeline.extract.steady_rate`: Ray start, actor
  starts, model loads and the last shard's write are outside it; a slower decode stage would still show, as
  the teacher waiting inside the window); beside it the marginal rate of the largest run over the one before it
  (`measure.marginal_rate`; noisier, a difference of two wall times); end to end = the largest run's frames
  over its wall time, with and without starting Ray; per stage = the pipeline's own busy time per stage.
- Plain loop: `decode_video` (resize/crop in the decoder) -> `Teacher.embed` -> `encode_frames` /
  `build_sample` -> `FeatureStore.write_shard`, one video at a time in this process, over the same videos
  as the largest pipeline run (so both end-to-end figures spread their start-up over the same frames); run on one torch
  thread and on torch's default, `repeats` times each (median), and the faster setting counts (the stronger
  baseline).
- Stages alone, with the threads the pipeline gives them (one per 1-CPU actor on a CPU): decode (with the
  resize/crop and the JPEG encoding the decode stage does) and the teacher on pre-decoded frames. The bound is
  the slower of decode rate x decode actors and teacher rate x teacher actors.

- In process (`--executor local`, pipeline.local): the same stages in this process over the same videos, end
  to end (planning, the teacher's load, the commits), interleaved with the loop's runs, median of `repeats`.

Target on a CPU: `subsume extract` end to end, with the executor `--executor auto` picks for this job from a
fresh shell (in process for a job this small; else the Ray pipeline, Ray's start-up included), at least matches
the plain loop end to end (its model load included); the other executor's ratio and the Ray pipeline's
steady-state ratio are reported beside it. Where the pipeline runs on a GPU, at least
0.85 of the bound. The Ray-free (GPU) preset measures the teacher stage alone and reports no ratio.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.measure import marginal_rate, median, sync, timed, torch_threads
from benchmarks.report import BenchResult, Target, ratio, sig
from benchmarks.session import BenchSession

NAME = "extraction"
CPU_TARGET = Target(1.0)  # pipeline / plain loop
GPU_TARGET = Target(0.85)  # pipeline / bound


def plain_loop(session: BenchSession, manifest: str, store_root: str) -> dict[str, Any]:
    """Decode -> teacher -> write, one video after another, in this process. Start-up is timed apart."""
    from feature_store.preprocess import resize_crop
    from feature_store.shards import build_sample, encode_frames, sample_key
    from feature_store.spec import TeacherSpec
    from feature_store.store import FeatureStore, new_run_id
    from feature_store.teacher import load_teacher
    from pipeline.decode import decode_video
    from pipeline.extract import resolve_feature_spec
    from pipeline.sampling import cut_segments
    from pipeline.sources import hash_video, list_videos

    cfg = session.cfg
    ecfg = session.extract_config(manifest, store_root, pipeline=False)
    t0 = time.perf_counter()
    spec = resolve_feature_spec(ecfg)
    store = FeatureStore(store_root)
    key = store.ensure_key(spec)
    teacher = load_teacher(TeacherSpec(model=ecfg.teacher.model), device=str(session.device))
    startup_s = time.perf_counter() - t0
    storage, sampling, preprocess = spec.storage, spec.sampling, spec.preprocess
    run_id = new_run_id()

    def transform(frames: np.ndarray) -> np.ndarray:
        return resize_crop(torch.from_numpy(frames), preprocess).numpy()

    t1 = time.perf_counter()
    frames_done, shards, pending = 0, 0, []
    for ref in list_videos(manifest):
        sha = hash_video(ref.source)
        video = decode_video(ref.source, sampling, transform=transform)
        embeds = teacher.embed_batched(video.frames, cfg.extract_batch).embeds.numpy()
        for seg_no, pos in enumerate(cut_segments(len(video.indices), sampling)):
            blob = encode_frames(np.ascontiguousarray(video.frames[pos]), storage.frame_encoding, storage.jpeg_quality)
            skey = sample_key(sha, seg_no)
            meta = {"sample_key": skey, "source": ref.source, "segment": seg_no}
            pending.append(build_sample(skey, blob, storage.frame_encoding,
                                        embeds[pos].astype(storage.target_dtype), meta))
            frames_done += len(pos)
            if len(pending) >= cfg.samples_per_shard:
                store.write_shard(key, run_id, pending)
                shards, pending = shards + 1, []
    if pending:
        store.write_shard(key, run_id, pending)
        shards += 1
    work_s = time.perf_counter() - t1
    return {"frames": frames_done, "shards": shards, "startup_s": sig(startup_s, 3), "work_s": sig(work_s, 4),
            "frames_per_s": sig(frames_done / work_s), "e2e_frames_per_s": sig(frames_done / (work_s + startup_s)),
            "torch_threads": torch.get_num_threads()}


def decode_alone(session: BenchSession, manifest: str, preprocess: Any) -> tuple[np.ndarray, float]:
    """Every video of `manifest` decoded here, resized/cropped and JPEG-encoded per segment as the decode
    stage does. Returns (all sampled frames, frames/s)."""
    from feature_store.preprocess import resize_crop
    from feature_store.shards import encode_frames
    from feature_store.spec import SamplingSpec
    from pipeline.decode import decode_video
    from pipeline.sampling import cut_segments
    from pipeline.sources import list_videos

    sampling = SamplingSpec(fps=session.cfg.fps, segment_frames=session.cfg.segment_frames)
    refs = list_videos(manifest)

    def transform(frames: np.ndarray) -> np.ndarray:
        return resize_crop(torch.from_numpy(frames), preprocess).numpy()

    out, n = [], 0
    t0 = time.perf_counter()
    for ref in refs:
        video = decode_video(ref.source, sampling, transform=transform)
        for pos in cut_segments(len(video.indices), sampling):
            encode_frames(np.ascontiguousarray(video.frames[pos]), "jpeg", 90)
            n += len(pos)
        out.append(video.frames)
    return np.concatenate(out), n / (time.perf_counter() - t0)


def teacher_alone(session: BenchSession, teacher: Any, frames: torch.Tensor) -> float:
    """frames/s of `Teacher.embed` in batches of `extract_batch` on pre-decoded frames (median of repeats)."""
    bs = session.cfg.extract_batch
    teacher.embed(frames[:bs])  # warm-up (kernels, allocator)
    times = [timed(lambda: teacher.embed_batched(frames, bs), session.device) for _ in range(session.cfg.repeats)]
    return len(frames) / median(times)


def _ray_free(session: BenchSession) -> BenchResult:
    cfg = session.cfg
    frames = session.frames(cfg.frames_alone, seed=3)
    per_teacher = {}
    for name in cfg.teachers:
        teacher, load_s = session.teacher(name)
        session.log(f"{NAME}: teacher stage alone, {name}, {len(frames)} frames in batches of {cfg.extract_batch}")
        per_teacher[name] = {"teacher_frames_per_s": sig(teacher_alone(session, teacher, frames)),
                             "teacher_load_s": sig(load_s, 3)}
        sync(session.device)
    summary = "; ".join(f"{n} teacher alone {f['teacher_frames_per_s']:.0f} frames/s" for n, f in per_teacher.items())
    figures = {"device": str(session.device), "stages_alone": per_teacher, "batch_frames": cfg.extract_batch}
    note = "the Ray Data pipeline is not run by this preset (no Ray here): teacher-stage figures only, no ratio"
    target = GPU_TARGET if session.device.type == "cuda" else CPU_TARGET
    return BenchResult(NAME, None, target, summary, figures, [note])


def run(session: BenchSession, *, ray_free: bool = False) -> BenchResult:
    if ray_free:
        return _ray_free(session)
    cfg = session.cfg
    big = max(cfg.scales)
    # the loop and the in-process executor first, before this benchmark starts Ray: a user's fresh shell has no
    # Ray processes competing for the cores (an earlier benchmark of the same run may have started them)
    ray_up = session.ray_start_s is not None
    plain, loops, local = _loop_and_local(session, big)
    runs = {s: session.extract(s) for s in sorted(cfg.scales)}
    run_ = runs[big]
    b = run_["bench"]
    frames, wall, ray_start = run_["frames_computed"], b["wall_s"], session.ray_start_s or 0.0
    marginal = marginal_rate([(r["frames_computed"], r["bench"]["wall_s"]) for r in runs.values()])
    steady = run_.get("steady_frames_per_s")
    n_decode, n_teacher = b["decode_actors"], b["teacher_actors"]
    pipeline = {"videos": run_["videos_total"], "frames": frames, "wall_s": sig(wall),
                "steady_frames_per_s": sig(steady), "steady_from": "the teacher stage's working window, largest run",
                "marginal_frames_per_s": sig(marginal), "marginal_from": [f"{s}x" for s in sorted(cfg.scales)[-2:]],
                "e2e_frames_per_s": sig(frames / (wall + ray_start)), "e2e_frames_per_s_ray_up": sig(frames / wall),
                "ray_start_s": sig(ray_start, 3), "outside_teacher_window_s": sig(_outside_window(frames, wall, steady)),
                "stage_busy_frames_per_s": run_.get("stage_frames_per_s"),
                "shards": run_["shards_written"], "decode_actors": n_decode, "teacher_actors": n_teacher}

    auto = auto_choice(session.manifest(big))

    teacher, _ = session.teacher(cfg.extract_teacher)
    threads = 1 if session.device.type == "cpu" else 0  # a 1-CPU Ray actor runs torch on one thread
    session.log(f"{NAME}: decode alone and teacher alone (torch threads: {threads or 'default'})")
    with torch_threads(threads):
        decoded, decode_fps = decode_alone(session, session.manifest(1), teacher.preprocess)
        teacher_fps = teacher_alone(session, teacher, torch.from_numpy(decoded))
    bound = min(decode_fps * n_decode, teacher_fps * n_teacher)
    bound_stage = "decode" if decode_fps * n_decode <= teacher_fps * n_teacher else "teacher"
    stages = {"decode_frames_per_s": sig(decode_fps), "teacher_frames_per_s": sig(teacher_fps),
              "torch_threads": threads or torch.get_num_threads(), "bound_frames_per_s": sig(bound),
              "bound_stage": bound_stage}

    of_plain, of_bound = ratio(steady, plain["frames_per_s"]), ratio(steady, bound)
    # end to end: the pipeline's frames over its wall time plus Ray's start, against the plain loop's frames
    # over its work plus its own start-up (model load); on a CPU the target applies to this figure
    of_plain_e2e = ratio(frames / (wall + ray_start), plain["e2e_frames_per_s"])
    of_plain_local = ratio(local["e2e_frames_per_s"], plain["e2e_frames_per_s"])
    on_gpu = session.device.type == "cuda"
    # On a CPU the target applies to `subsume extract` end to end as a user runs it on this job: the
    # executor `auto` picks for it in a fresh shell (no cluster addressed).
    cli_e2e = of_plain_local if auto == "local" else of_plain_e2e
    value, target = (of_bound, GPU_TARGET) if on_gpu else (cli_e2e, CPU_TARGET)
    figures = {"device": str(session.device), "teacher": cfg.extract_teacher, "pipeline": pipeline,
               "local": local, "auto_picks": auto, "ray_up_during_loop_and_local": ray_up,
               "plain_loop": plain, "plain_loop_by_threads": {str(n): r["frames_per_s"] for n, r in loops.items()},
               "stages_alone": stages, "of_plain_e2e_cli": sig(cli_e2e), "of_plain_e2e_local": sig(of_plain_local),
               "of_plain_e2e": sig(of_plain_e2e), "of_plain_steady": sig(of_plain), "of_bound": sig(of_bound)}
    cli_rate = local["e2e_frames_per_s"] if auto == "local" else frames / (wall + ray_start)
    summary = (f"`subsume extract` ({auto}) {cli_rate:.0f} frames/s end to end vs plain loop "
               f"{plain['e2e_frames_per_s']:.0f}; Ray pipeline {steady or 0:.0f} "
               f"steady ({frames / (wall + ray_start):.0f} end to end), bound {bound:.0f}")
    notes = [f"`auto` runs this job ({run_['videos_total']} videos) {'in process' if auto == 'local' else 'on Ray'} "
             f"from a fresh shell; end to end over the plain loop: in process {sig(of_plain_local)}, Ray pipeline "
             f"(its start included) {sig(of_plain_e2e)}" + ("; Ray was already up (an earlier benchmark) while the "
             "loop and the in-process executor ran" if ray_up else "")]
    if steady is None:
        notes.append("no steady state: the largest run reported no teacher window")
    if not on_gpu and plain["frames_per_s"] > 0.95 * bound:
        slow = n_decode if bound_stage == "decode" else n_teacher
        why = (f": decoding runs at {decode_fps:.0f} frames/s, {decode_fps / teacher_fps:.0f}x the teacher, so "
               "overlapping the two saves little, and the decode actors' CPUs mostly wait"
               if bound_stage == "teacher" else "")
        notes.append(f"the pipeline can go no faster than its bound, the {bound_stage} stage on {slow} one-CPU "
                     f"actor(s) at {bound:.0f} frames/s, and the plain loop already gets "
                     f"{plain['frames_per_s']:.0f} frames/s on {plain['torch_threads']} torch thread(s){why}")
    busy = (run_.get("stage_frames_per_s") or {}).get("teacher")
    if busy and busy < 0.9 * teacher_fps:  # both per actor: busy sums the time of all teacher actors
        notes.append(f"inside the pipeline the teacher stage was busy at {busy:.0f} frames/s against {teacher_fps:.0f} "
                     "measured alone: there it also decodes the stored JPEG frames, and it shares the cores with "
                     "the decode actor, the driver, Ray's own processes and any other work on the machine")
    if not on_gpu and of_plain_e2e is not None and of_plain_e2e < CPU_TARGET.threshold:
        notes.append(_e2e_note(pipeline, plain))
    if not on_gpu and of_bound is not None:
        notes.append(f"the pipeline reaches {of_bound:.0%} of its bound in the steady state (on a GPU the target "
                     f"would be {GPU_TARGET.threshold:.0%})")
    return BenchResult(NAME, value, target, summary, figures, notes)


def _loop_and_local(session: BenchSession, big: int) -> tuple[dict[str, Any], dict[int, Any], dict[str, Any]]:
    """The plain loop (each torch setting) and the in-process executor over the big set, interleaved
    `repeats` times. Returns (the faster setting's median loop, the median loop by setting, the executor's)."""
    cfg = session.cfg
    # The baseline is the faster of the loop on one torch thread and on torch's default (all cores): on an idle
    # machine the latter wins; when other work competes for the cores, a multi-threaded torch process slows
    # down far more than a single-threaded one, and the pipeline's actors are single-threaded.
    # Each setting runs `repeats` times (fresh stores, settings interleaved) and its median run counts: one
    # few-second run moves by 20-30% with whatever else the machine does.
    # The in-process executor (what `subsume extract` runs for a job this small when no cluster is addressed)
    # is interleaved with the loop's runs: both see the same machine.
    tries: dict[int, list[dict[str, Any]]] = {n: [] for n in sorted({1, session.default_threads})}
    local_runs: list[dict[str, Any]] = []
    for rep in range(cfg.repeats):
        for n in tries:
            session.log(f"{NAME}: plain single-process loop over the {big}x set, {n} torch thread(s), run {rep + 1}")
            with torch_threads(n):  # the same videos as the pipeline run it is compared with
                tries[n].append(plain_loop(session, session.manifest(big),
                                           str(session.workdir / "stores" / f"plain-loop-{n}-{rep}")))
        session.log(f"{NAME}: in-process executor over the {big}x set, torch's default threads, run {rep + 1}")
        with torch_threads(session.default_threads):  # as in a fresh `subsume extract` process
            local_runs.append(session.run_extract(session.manifest(big), str(session.workdir / "stores" /
                                                                             f"local-{rep}"), executor="local"))
    loops = {n: sorted(runs, key=lambda r: r["frames_per_s"])[len(runs) // 2] for n, runs in tries.items()}
    plain = max(loops.values(), key=lambda r: r["frames_per_s"])
    return plain, loops, _local_figures(local_runs)


def _local_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The in-process executor's median run (by end-to-end rate): its wall time includes planning, the
    teacher's load, the last write and the commits, as a user's run does (the process's imports excepted,
    as for the loop)."""
    rates = [r["frames_computed"] / r["bench"]["wall_s"] for r in runs]
    mid = sorted(range(len(runs)), key=rates.__getitem__)[len(runs) // 2]
    r = runs[mid]
    return {"frames": r["frames_computed"], "wall_s": sig(r["bench"]["wall_s"]),
            "e2e_frames_per_s": sig(rates[mid]), "e2e_frames_per_s_runs": [sig(x) for x in rates],
            "steady_frames_per_s": sig(r.get("steady_frames_per_s")),
            "stage_busy_frames_per_s": r.get("stage_frames_per_s"), "executor": r.get("executor"),
            "peak_rss_bytes": r["bench"]["peak_rss_bytes"]}


def auto_choice(manifest: str) -> str:
    """What `--executor auto` picks for the videos of `manifest` from a fresh shell (no cluster addressed),
    all of them to compute."""
    import pyarrow.compute as pc

    from pipeline.extract import choose_executor
    from pipeline.sources import listing_table

    listing = listing_table(manifest)
    size = int(pc.sum(listing.column("size")).as_py() or 0)
    return choose_executor("auto", listing.num_rows, size, ray_in_use=False)


def _outside_window(frames: int, wall: float, steady: float | None) -> float | None:
    """Seconds of the pipeline run outside the teacher stage's working window: planning, actor starts and model
    loads before it; the last shard's write, the final commit and the report after it."""
    return wall - frames / steady if steady else None


def _e2e_note(pipeline: dict[str, Any], plain: dict[str, Any]) -> str:
    """Where the end-to-end time goes when the pipeline is slower than the plain loop."""
    return (f"end to end the Ray pipeline is slower than the plain loop: of its {pipeline['wall_s']} s run (plus "
            f"{pipeline['ray_start_s']} s starting Ray), {pipeline['outside_teacher_window_s']} s lie outside the "
            f"teacher's working window (planning, actor starts, model loads, the last write and commit), against "
            f"the plain loop's {plain['startup_s']} s of start-up; at {pipeline['steady_frames_per_s']} frames/s in "
            f"the window against the loop's {plain['frames_per_s']}, {pipeline['frames']} frames do not pay the "
            "fixed cost back")
