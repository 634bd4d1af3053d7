"""Decode memory: peak RSS of the decode stage on a long video against a 1-minute one (target <= 1.5).

Two H.264 videos of the same small frame size are generated with PyAV, one `decode_short_s` long (60 s)
and one `decode_long_s` long. Each is run, in a fresh Python process, through the decode stage exactly as
extraction runs it (`pipeline.stages.DecodeStage.video_rows`: the decoder child streams frame chunks, the
parent cuts segments and JPEG-encodes/decodes them) with every row dropped once made, as Ray Data would
take it. Figures: the parent's and the decoder child's peak RSS (`ru_maxrss`, each process's own), and the
ratio long / short of each; the benchmark's value is the larger of the two ratios. Beside it, for contrast,
the same videos collected whole in one process (`decode_video`), which is what a whole-video decoder holds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import BenchResult, Target, sig
from benchmarks.session import BenchSession

NAME = "decode_memory"
TARGET = Target(1.5, higher_is_better=False)
WIDTH, HEIGHT = 96, 64


def write_long_video(path: Path, seconds: float, fps: float) -> Path:
    """An H.264 MP4 of moving gradients and a moving square, encoded one frame at a time (nothing held)."""
    import av

    n = int(round(seconds * fps))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast", "bf": "0"}
        frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        for i in range(n):
            frame[..., 0] = (xx * 2 + i * 3) % 256
            frame[..., 1] = (yy * 3 + i * 5) % 256
            frame[..., 2] = 90
            x0, y0 = (i * 2) % (WIDTH - 16), (i * 3) % (HEIGHT - 16)
            frame[y0:y0 + 16, x0:x0 + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _specs(fps: float, segment: int, size: int) -> tuple[Any, Any, Any]:
    from feature_store.spec import PreprocessSpec, SamplingSpec, StorageSpec

    pre = PreprocessSpec(resize=size, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="bicubic")
    return SamplingSpec(fps=fps, segment_frames=segment), pre, StorageSpec()


def probe_stream(video: str, fps: float, segment: int, size: int) -> dict[str, Any]:
    """The decode stage on one video in this (fresh) process; rows are dropped as soon as they are made."""
    import dataclasses

    from pipeline.stages import DecodeStage, _WorkRow

    sampling, pre, storage = _specs(fps, segment, size)
    stage = DecodeStage(dataclasses.asdict(sampling), dataclasses.asdict(pre), dataclasses.asdict(storage),
                        timeout_s=3600, limits={"max_duration_s": 0, "max_frames": 0})
    batch = {"source": np.array([video], object), "sha256": np.array(["0" * 64], object),
             "video_id": np.array(["v"], object), "labels": np.array(["{}"], object), "size": np.array([0]),
             "mtime": np.array([0.0]), "have_segments": np.array(["[]"], object)}
    t0 = time.perf_counter()
    segments = failed = 0
    for rows in stage.video_rows(_WorkRow(batch, 0)):
        segments += sum(not r.failed for r in rows)
        failed += sum(r.failed for r in rows)
    wall = time.perf_counter() - t0
    child = stage.proc.child_peak_rss
    stage.proc.close()
    return {"segments": segments, "failed": failed, "wall_s": wall, "child_peak_rss": child,
            "parent_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def probe_whole(video: str, fps: float, segment: int, size: int) -> dict[str, Any]:
    """The whole sampled video collected in this process (what a non-streaming decoder holds)."""
    import torch

    from feature_store.preprocess import resize_crop
    from pipeline.decode import DecodeLimits, decode_video

    sampling, pre, _ = _specs(fps, segment, size)
    t0 = time.perf_counter()
    video_ = decode_video(video, sampling, transform=lambda f: resize_crop(torch.from_numpy(f), pre).numpy(),
                          limits=DecodeLimits(max_duration_s=0, max_frames=0))
    return {"frames": len(video_.frames), "wall_s": time.perf_counter() - t0,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _run_probe(mode: str, video: Path, session: BenchSession) -> dict[str, Any]:
    cfg = session.cfg
    cmd = [sys.executable, "-m", "benchmarks.decode_memory", mode, str(video), "--fps", str(cfg.fps),
           "--segment", str(cfg.segment_frames), "--size", str(cfg.image_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(x: float) -> float | None:
    return sig(x / 2**20, 4)


def run(session: BenchSession) -> BenchResult:
    cfg = session.cfg
    folder = session.workdir / "decode-memory"
    folder.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for label, seconds in (("short", cfg.decode_short_s), ("long", cfg.decode_long_s)):
        path = folder / f"{label}.mp4"
        if not path.exists():
            session.log(f"{NAME}: writing a {seconds:g} s {WIDTH}x{HEIGHT} video at {cfg.decode_video_fps:g} fps")
            write_long_video(path, seconds, cfg.decode_video_fps)
        session.log(f"{NAME}: decode stage on the {label} video (fresh process)")
        stream = _run_probe("stream", path, session)
        session.log(f"{NAME}: whole-video decode of the {label} video (fresh process)")
        whole = _run_probe("whole", path, session)
        runs[label] = {"seconds": seconds, "bytes": path.stat().st_size, "segments": stream["segments"],
                       "sampled_frames": whole["frames"], "stream_wall_s": sig(stream["wall_s"]),
                       "parent_peak_mib": _mib(stream["parent_peak_rss"]),
                       "child_peak_mib": _mib(stream["child_peak_rss"]),
                       "whole_video_peak_mib": _mib(whole["peak_rss"])}
    s, l_ = runs["short"], runs["long"]
    parent = sig(l_["parent_peak_mib"] / s["parent_peak_mib"])
    child = sig(l_["child_peak_mib"] / s["child_peak_mib"])
    whole = sig(l_["whole_video_peak_mib"] / s["whole_video_peak_mib"])
    value = max(parent, child)
    summary = (f"{cfg.decode_long_s:g} s vs {cfg.decode_short_s:g} s video: parent {l_['parent_peak_mib']:.0f} vs "
               f"{s['parent_peak_mib']:.0f} MiB, child {l_['child_peak_mib']:.0f} vs {s['child_peak_mib']:.0f} MiB "
               f"(whole-video decode {whole:.2f}x)")
    notes = [] if l_["segments"] > s["segments"] > 0 else ["the long video gave no more segments than the short one"]
    figures = {"runs": runs, "parent_ratio": parent, "child_ratio": child, "whole_video_ratio": whole,
               "frame_size": f"{WIDTH}x{HEIGHT}", "teacher_size": cfg.image_size}
    return BenchResult(NAME, value, TARGET, summary, figures, notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one decode-memory probe (run by the benchmark in a fresh process)")
    p.add_argument("mode", choices=("stream", "whole"))
    p.add_argument("video")
    p.add_argument("--fps", type=float, required=True)
    p.add_argument("--segment", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    a = p.parse_args(argv)
    probe = probe_stream if a.mode == "stream" else probe_whole
    print(json.dumps(probe(a.video, a.fps, a.segment, a.size)))


if __name__ == "__main__":
    main()
