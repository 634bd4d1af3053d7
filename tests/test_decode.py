"""pipeline.decode on real encoded files: decord and PyAV paths, fallback, VFR, rotation, hostile files,
and the killable DecoderProcess."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.decode as decode_mod
from feature_store.spec import PreprocessSpec, SamplingSpec
from pipeline.decode import DecodedVideo, DecodeError, DecodeLimits, DecodeTimeout, decode_video
from pipeline.decoder_process import DecoderProcess
from tests import decode_stubs
from tests import videos as V

N = 20  # frames in the regular test videos, at 10 fps
EVERY_FRAME = SamplingSpec(fps=None, stride=1)
VFR_TIMES = np.array([0.0, 0.05, 0.1, 0.4, 0.45, 1.0, 1.02, 1.5, 2.0, 2.3])
DECODERS = ["decord", "pyav"]


@pytest.fixture(scope="module")
def vids(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    frames = V.marked_frames(N)
    out = {
        "h264.mp4": V.write_video(d / "h264.mp4", frames, fps=10, codec="libx264"),
        "mpeg4.avi": V.write_video(d / "mpeg4.avi", frames, fps=10, codec="mpeg4"),
        "mjpeg.avi": V.write_video(d / "mjpeg.avi", frames, fps=10, codec="mjpeg"),
        "h264.avi": V.write_video(d / "h264.avi", frames, fps=10, codec="libx264"),
        "h264.mkv": V.write_video(d / "h264.mkv", frames, fps=10, codec="libx264"),
        "one.mp4": V.write_video(d / "one.mp4", V.marked_frames(1), fps=10),
        # A non-zero start time too, as many real streams have.
        "vfr.mp4": V.write_video(d / "vfr.mp4", V.marked_frames(len(VFR_TIMES)), vfr_timestamps=5.0 + VFR_TIMES),
        "empty.mp4": V.write_empty(d / "empty.mp4"),
        "text.mp4": V.write_text(d / "text.mp4"),
        "random.mp4": V.write_random_bytes(d / "random.mp4"),
        "header_cut.mp4": V.write_header_truncated(d / "header_cut.mp4"),
        "audio_only.mp4": write_audio_only(d / "audio_only.mp4"),
        "damaged.avi": V.write_damaged_middle(d / "damaged.avi", n_frames=N, damaged=(8, 9)),
    }
    out["cut.avi"], _ = V.write_cut_mid_stream(d / "cut.avi", n_frames=30, keep=0.5, codec="mjpeg")
    out["cut.mkv"], _ = V.write_cut_mid_stream(d / "cut.mkv", n_frames=30, keep=0.5, codec="libx264")
    for rot in (90, 180, 270):
        out[f"rot{rot}.mp4"] = V.write_video(d / f"rot{rot}.mp4", V.marked_frames(6), fps=10, rotation=rot)
    return out


def write_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for i in range(4):
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def markers(video: DecodedVideo) -> list[int]:
    return V.read_markers(video.frames)


# --- the right frames from each decoder and container --------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", ["h264.mp4", "mpeg4.avi", "mjpeg.avi", "h264.mkv"])
def test_each_decoder_returns_the_marked_frames(vids, name, decoder):
    every = decode_video(str(vids[name]), EVERY_FRAME, decoder=decoder)
    assert every.decoder == decoder
    assert every.frames.dtype == np.uint8 and every.frames.shape == (N, V.H, V.W, 3)
    assert markers(every) == list(range(N))
    assert every.indices.tolist() == list(range(N)) and every.indices.dtype == np.int64
    np.testing.assert_allclose(every.timestamps, np.arange(N) / 10, atol=1e-4)
    assert every.num_frames == N and every.fps == pytest.approx(10) and every.rotation == 0
    assert V.has_red_top_left(every.frames[0])

    at_4fps = decode_video(str(vids[name]), SamplingSpec(fps=4), decoder=decoder)
    # wanted 0, .25, .5, ...: ties (.25 between .2 and .3) go to the earlier frame
    expected = [0, 2, 5, 7, 10, 12, 15, 17]
    assert at_4fps.indices.tolist() == expected and markers(at_4fps) == expected


def test_decord_and_pyav_give_the_same_pixels(vids):
    for name in ("h264.mp4", "mpeg4.avi"):
        a = decode_video(str(vids[name]), SamplingSpec(fps=5), decoder="decord")
        b = decode_video(str(vids[name]), SamplingSpec(fps=5), decoder="pyav")
        assert a.indices.tolist() == b.indices.tolist()
        assert np.abs(a.frames.astype(np.int16) - b.frames).max() <= 2


def test_chunked_decord_reads_equal_one_get_batch(vids, monkeypatch):
    import decord

    reader = decord.VideoReader(str(vids["h264.mp4"]))
    wanted = list(range(0, N, 2))
    reference = reader.get_batch(wanted).asnumpy()
    monkeypatch.setattr(decode_mod, "CHUNK_FRAMES", 3)
    video = decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=None, stride=2), decoder="decord")
    assert video.indices.tolist() == wanted
    np.testing.assert_array_equal(video.frames, reference)


@pytest.mark.parametrize("decoder", DECODERS)
def test_transform_runs_per_chunk_and_its_output_is_returned(vids, decoder, monkeypatch):
    calls: list[tuple[int, ...]] = []

    def half(frames: np.ndarray) -> np.ndarray:
        calls.append(frames.shape)
        return np.ascontiguousarray(frames[:, ::2, ::2])

    monkeypatch.setattr(decode_mod, "CHUNK_FRAMES", 4)
    video = decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=None, stride=2), transform=half, decoder=decoder)
    assert [c[0] for c in calls] == [4, 4, 2]
    assert all(c[1:] == (V.H, V.W, 3) for c in calls)  # full resolution goes in ...
    assert video.frames.shape == (10, V.H // 2, V.W // 2, 3)  # ... the transform's output comes out

    # Large frames get smaller chunks: here two frames' worth of bytes.
    calls.clear()
    monkeypatch.setattr(decode_mod, "CHUNK_BYTES", 2 * V.H * V.W * 3)
    decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=None, stride=4), transform=half, decoder=decoder)
    assert [c[0] for c in calls] == [2, 2, 1]


def test_transform_with_a_wrong_output_is_an_error(vids):
    with pytest.raises(ValueError, match="transform"):
        decode_video(str(vids["h264.mp4"]), EVERY_FRAME, transform=lambda f: f[..., 0], decoder="pyav")


@pytest.mark.parametrize("decoder", DECODERS)
def test_max_frames_caps_the_output(vids, decoder):
    video = decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=None, stride=1, max_frames=5), decoder=decoder)
    assert markers(video) == [0, 1, 2, 3, 4]
    assert video.num_frames == N  # PyAV stops early and reports the container's count


@pytest.mark.parametrize("decoder", DECODERS)
def test_one_frame_video(vids, decoder):
    video = decode_video(str(vids["one.mp4"]), SamplingSpec(fps=4), decoder=decoder)
    assert markers(video) == [0] and video.num_frames == 1


# --- fallback ------------------------------------------------------------------------------------------

def test_auto_falls_back_to_pyav_when_decord_fails_on_the_file(vids):
    # decord opens this cut MJPEG AVI but raises while reading it; PyAV keeps the frames that exist.
    with pytest.raises(DecodeError) as err:
        decode_video(str(vids["cut.avi"]), EVERY_FRAME, decoder="decord")
    assert err.value.reason == "decoder_error"
    video = decode_video(str(vids["cut.avi"]), EVERY_FRAME, decoder="auto")
    assert video.decoder == "pyav"
    assert 5 <= len(video.frames) < 30 and markers(video) == list(range(len(video.frames)))


def test_auto_falls_back_when_decord_has_no_timestamps(vids):
    # decord reports AV_NOPTS_VALUE for every frame of H.264 in AVI, which would break fps sampling.
    video = decode_video(str(vids["h264.avi"]), SamplingSpec(fps=5), decoder="auto")
    assert video.decoder == "pyav"
    assert markers(video) == list(range(0, N, 2))


def test_auto_uses_pyav_when_decord_is_not_installed(vids, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    video = decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=5), decoder="auto")
    assert video.decoder == "pyav" and markers(video) == list(range(0, N, 2))
    with pytest.raises(DecodeError):
        decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=5), decoder="decord")


def test_auto_prefers_decord(vids):
    assert decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=5)).decoder == "decord"


def test_unknown_decoders_are_refused(vids):
    for name in ("ffmpeg-cli", "sleep:0", "crash"):
        with pytest.raises(ValueError):
            decode_video(str(vids["h264.mp4"]), EVERY_FRAME, decoder=name)


# --- variable frame rate and rotation ------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_vfr_sampling_by_fps_takes_the_frames_nearest_the_wanted_times(vids, decoder):
    video = decode_video(str(vids["vfr.mp4"]), SamplingSpec(fps=4), decoder=decoder)
    # wanted 0, .25, ..., 2.25 s from the start; see test_sampling for the nearest-frame arithmetic.
    expected = [0, 2, 4, 5, 6, 7, 8, 9]
    assert video.indices.tolist() == expected and markers(video) == expected
    np.testing.assert_allclose(video.timestamps, VFR_TIMES[expected], atol=1e-4)  # from the stream start
    # Index arithmetic with the average rate would have picked other frames: the test can tell.
    naive = np.unique(np.round(np.arange(0, 2.3, 0.25) * video.fps).astype(int)).tolist()
    assert naive != expected


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_from_the_display_matrix_is_applied(vids, decoder, rotation):
    video = decode_video(str(vids[f"rot{rotation}.mp4"]), EVERY_FRAME, decoder=decoder)
    # write_video stored the frames turned the other way, so upright frames are the ones we drew.
    assert video.frames.shape == (6, V.H, V.W, 3)
    assert markers(video) == list(range(6))
    assert all(V.has_red_top_left(f) for f in video.frames)
    assert video.rotation % 360 == rotation


# --- hostile files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["auto", *DECODERS])
@pytest.mark.parametrize("name, reason", [
    ("empty.mp4", "empty_file"),
    ("text.mp4", "not_a_video"),
    ("random.mp4", "not_a_video"),
    ("header_cut.mp4", "corrupt"),
    ("audio_only.mp4", "no_video_stream"),
    ("does-not-exist.mp4", "missing"),
])
def test_hostile_files_raise_decode_error_with_a_reason(vids, tmp_path, name, reason, decoder):
    path = vids.get(name, tmp_path / name)
    with pytest.raises(DecodeError) as err:
        decode_video(str(path), SamplingSpec(fps=4), decoder=decoder)
    assert err.value.reason == reason and err.value.message


def test_a_folder_is_not_a_video(tmp_path):
    with pytest.raises(DecodeError) as err:
        decode_video(str(tmp_path), SamplingSpec(fps=4))
    assert err.value.reason == "not_a_video"


@pytest.mark.parametrize("decoder", ["auto", *DECODERS])
def test_a_file_cut_mid_stream_gives_the_frames_that_exist(vids, decoder):
    video = decode_video(str(vids["cut.mkv"]), EVERY_FRAME, decoder=decoder)
    assert 5 <= len(video.frames) < 30
    assert markers(video) == list(range(len(video.frames))) == video.indices.tolist()


def test_damaged_frames_in_the_middle_are_skipped(vids):
    # decord raises on the damaged frames; PyAV skips them and keeps decoding.
    video = decode_video(str(vids["damaged.avi"]), EVERY_FRAME, decoder="auto")
    good = [i for i in range(N) if i not in (8, 9)]
    assert video.decoder == "pyav" and markers(video) == good
    np.testing.assert_allclose(video.timestamps, np.array(good) / 10, atol=1e-6)
    # indices count the frames that decoded; the timestamps still say where they are in time
    assert video.indices.tolist() == list(range(len(good))) and video.num_frames == len(good)


def test_frames_above_max_pixels_are_rejected(vids):
    with pytest.raises(DecodeError) as err:
        decode_video(str(vids["h264.mp4"]), EVERY_FRAME, limits=DecodeLimits(max_pixels=V.W * V.H - 1))
    assert err.value.reason == "too_large" and f"{V.W}x{V.H}" in err.value.message
    assert len(decode_video(str(vids["h264.mp4"]), EVERY_FRAME, limits=DecodeLimits(max_pixels=V.W * V.H)).frames) == N


# --- remote sources ------------------------------------------------------------------------------------

def test_fsspec_url_is_copied_to_a_temp_file_and_removed(vids, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://bucket/videos/h264.mp4"
    fs.pipe_file("/bucket/videos/h264.mp4", vids["h264.mp4"].read_bytes())
    try:
        copies = tmp_path / "copies"
        copies.mkdir()
        video = decode_video(url, SamplingSpec(fps=5), tmp_dir=str(copies))
        assert markers(video) == list(range(0, N, 2))
        assert list(copies.iterdir()) == []
        with pytest.raises(DecodeError) as err:
            decode_video("memory://bucket/videos/nope.mp4", SamplingSpec(fps=5), tmp_dir=str(copies))
        assert err.value.reason == "missing" and list(copies.iterdir()) == []
    finally:
        fs.rm("/bucket", recursive=True)


# --- DecoderProcess ------------------------------------------------------------------------------------

def test_decoder_process_returns_what_decode_video_returns(vids):
    spec = PreprocessSpec(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="bilinear")
    import torch

    from feature_store.preprocess import resize_crop

    local = decode_video(str(vids["h264.mp4"]), SamplingSpec(fps=5),
                         transform=lambda f: resize_crop(torch.from_numpy(f), spec).numpy())
    with DecoderProcess(timeout_s=60) as proc:
        remote = proc.decode(str(vids["h264.mp4"]), SamplingSpec(fps=5), resize_crop=spec)
        assert remote.frames.shape == (10, 32, 32, 3)
        np.testing.assert_array_equal(remote.frames, local.frames)
        assert remote.indices.tolist() == local.indices.tolist()
        np.testing.assert_array_equal(remote.timestamps, local.timestamps)
        assert (remote.decoder, remote.fps, remote.num_frames) == (local.decoder, local.fps, local.num_frames)

        plain = proc.decode(str(vids["mjpeg.avi"]), EVERY_FRAME)
        assert markers(plain) == list(range(N))
        pid = proc.pid
        with pytest.raises(DecodeError) as err:  # a bad file is the video's failure, not the child's
            proc.decode(str(vids["text.mp4"]), EVERY_FRAME)
        assert err.value.reason == "not_a_video" and proc.pid == pid and proc.restarts == 0
        workdir = proc._workdir
        assert os.listdir(workdir) == []  # nothing is left on disk between videos
    assert not os.path.exists(workdir) and proc.pid is None


def test_decoder_process_timeout_kills_the_child_and_the_next_decode_works(vids):
    with DecoderProcess(timeout_s=60, decode_fn=decode_stubs.stand_in) as proc:
        assert markers(proc.decode(str(vids["h264.mp4"]), SamplingSpec(fps=5))) == list(range(0, N, 2))
        first = proc._process
        start = time.monotonic()
        with pytest.raises(DecodeTimeout) as err:
            proc.decode(str(vids["h264.mp4"]), SamplingSpec(fps=5), decoder="sleep:60", timeout_s=1.0)
        assert err.value.reason == "timeout"
        assert time.monotonic() - start < 10
        assert not first.is_alive() and first.exitcode == -9  # SIGKILL
        assert proc.restarts == 1

        again = proc.decode(str(vids["h264.mp4"]), SamplingSpec(fps=5))
        assert markers(again) == list(range(0, N, 2)) and proc._process is not first

        # A short stand-in delay under the timeout still decodes.
        assert len(proc.decode(str(vids["h264.mp4"]), SamplingSpec(fps=5), decoder="sleep:0.1").frames) == 10

        # A child that dies (a decoder segfault, say) is reported and replaced too.
        with pytest.raises(DecodeError) as err:
            proc.decode(str(vids["h264.mp4"]), SamplingSpec(fps=5), decoder="crash")
        assert err.value.reason == "crashed" and proc.restarts == 2
        assert len(proc.decode(str(vids["h264.mp4"]), SamplingSpec(fps=5)).frames) == 10


def test_decoder_process_refuses_fork():
    with pytest.raises(ValueError):
        DecoderProcess(start_method="fork")


# --- limits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["auto", *DECODERS])
@pytest.mark.parametrize("limits, reason", [
    (DecodeLimits(max_duration_s=1.0), "too_long"),  # the 20-frame videos last 2 s
    (DecodeLimits(max_frames=N - 1), "too_long"),
    (DecodeLimits(max_file_bytes=100), "too_large"),
    (DecodeLimits(max_aspect=1.2), "bad_aspect"),  # 64 x 48 is 1.33
])
def test_each_cap_refuses_with_its_reason_and_lifts_at_zero(vids, limits, reason, decoder):
    path = str(vids["h264.mkv"])
    with pytest.raises(DecodeError) as err:
        decode_video(path, EVERY_FRAME, limits=limits, decoder=decoder)
    assert err.value.reason == reason and "max_" in err.value.message
    lifted = DecodeLimits(max_duration_s=0, max_frames=0, max_file_bytes=0, max_aspect=0, max_pixels=0)
    assert len(decode_video(path, EVERY_FRAME, limits=lifted, decoder=decoder).frames) == N


def test_pyav_checks_the_caps_while_decoding_when_the_header_says_nothing(vids, monkeypatch):
    # AVI from PyAV has no container duration; cap the frames PyAV counts as it decodes.
    monkeypatch.setattr(decode_mod, "_probe", lambda path, limits: decode_mod._Probe(V.W, V.H, 0))
    with pytest.raises(DecodeError) as err:
        decode_video(str(vids["mjpeg.avi"]), EVERY_FRAME, decoder="pyav", limits=DecodeLimits(max_frames=5))
    assert err.value.reason == "too_long"


def test_default_limits_pass_ordinary_videos_and_refuse_a_panorama(tmp_path):
    wide = V.write_video(tmp_path / "wide.mp4", V.marked_frames(3, width=256, height=32), fps=10)
    with pytest.raises(DecodeError) as err:
        decode_video(str(wide), EVERY_FRAME)
    assert err.value.reason == "bad_aspect"
    assert len(decode_video(str(wide), EVERY_FRAME, limits=DecodeLimits(max_aspect=8)).frames) == 3


# --- streaming -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_iter_decode_streams_bounded_chunks_then_a_summary(vids, decoder, monkeypatch):
    monkeypatch.setattr(decode_mod, "CHUNK_FRAMES", 3)
    events = list(decode_mod.iter_decode(str(vids["h264.mp4"]), EVERY_FRAME, decoder=decoder))
    chunks = [e for e in events if isinstance(e, decode_mod.FrameChunk)]
    plans = [e for e in events if isinstance(e, decode_mod.StreamPlan)]
    assert isinstance(events[-1], decode_mod.StreamEnd) and events[-1].sampled == N
    assert all(len(c.frames) <= 3 for c in chunks) and len(chunks) == 7
    assert [m for c in chunks for m in V.read_markers(c.frames)] == list(range(N))
    # decord knows the count before it decodes; PyAV finds it out at the end
    assert [p.sampled_total for p in plans] == ([N] if decoder == "decord" else [])
    if decoder == "decord":
        assert events[0] == decode_mod.StreamPlan(N, "decord", events[-1].fps, N, 0)


def test_pyav_carries_on_after_decord_fails_part_way(vids, monkeypatch):
    """decord yields some chunks, then fails: PyAV continues after the last frame already yielded."""
    monkeypatch.setattr(decode_mod, "CHUNK_FRAMES", 4)
    real = decode_mod._open_decord

    class FailsLater:
        def __init__(self, reader):
            self.reader, self.calls = reader, 0

        def get_batch(self, idx):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("simulated read error")
            return self.reader.get_batch(idx)

        def __len__(self):
            return len(self.reader)

    def flaky(path, threads, limits):
        reader, ts, fps = real(path, threads, limits)
        return FailsLater(reader), ts, fps

    monkeypatch.setattr(decode_mod, "_open_decord", flaky)
    video = decode_video(str(vids["h264.mp4"]), EVERY_FRAME, decoder="auto")
    assert video.decoder == "decord+pyav"
    assert markers(video) == list(range(N)) == video.indices.tolist()


def test_a_remote_file_over_the_size_cap_is_refused_before_it_is_copied(vids, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/capped/h264.mp4", vids["h264.mp4"].read_bytes())
    try:
        copies = tmp_path / "copies"
        copies.mkdir()
        with pytest.raises(DecodeError) as err:
            decode_video("memory://capped/h264.mp4", EVERY_FRAME, tmp_dir=str(copies),
                         limits=DecodeLimits(max_file_bytes=1000))
        assert err.value.reason == "too_large" and list(copies.iterdir()) == []
    finally:
        fs.rm("/capped", recursive=True)


def test_a_remote_file_that_does_not_fit_the_temp_folder_is_an_io_failure(vids, tmp_path, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/full/h264.mp4", vids["h264.mp4"].read_bytes())
    monkeypatch.setattr(decode_mod, "TMP_HEADROOM_BYTES", 2**62)
    try:
        with pytest.raises(DecodeError) as err:
            decode_video("memory://full/h264.mp4", EVERY_FRAME, tmp_dir=str(tmp_path))
        assert err.value.reason == "io" and err.value.reason in decode_mod.TRANSIENT
    finally:
        fs.rm("/full", recursive=True)


def test_decoder_process_streams_chunks_and_reports_the_childs_peak_memory(vids):
    with DecoderProcess(timeout_s=60) as proc:
        events = list(proc.stream(str(vids["h264.mp4"]), EVERY_FRAME))
        assert events[0] == decode_mod.StreamPlan(N, "decord", events[-1].fps, N, 0)
        chunks = [e for e in events if isinstance(e, decode_mod.FrameChunk)]
        assert len(chunks) == 2 and [m for c in chunks for m in V.read_markers(c.frames)] == list(range(N))
        assert 10 * 2**20 < proc.child_peak_rss < 2**33


def test_an_abandoned_stream_restarts_the_child_and_the_next_video_is_clean(vids):
    with DecoderProcess(timeout_s=60) as proc:
        stream = proc.stream(str(vids["h264.mp4"]), EVERY_FRAME)
        next(stream), next(stream)  # the plan and the first chunk; the child still owes the rest
        stream.close()
        assert proc.restarts == 1
        assert markers(proc.decode(str(vids["mjpeg.avi"]), EVERY_FRAME)) == list(range(N))


def test_a_child_dying_mid_stream_is_a_crash_after_the_chunks_it_sent(vids):
    with DecoderProcess(timeout_s=60, decode_fn=decode_stubs.crash_after_first_chunk) as proc:
        got = []
        with pytest.raises(DecodeError) as err:
            for event in proc.stream(str(vids["h264.mp4"]), EVERY_FRAME):
                got.append(event)
        assert err.value.reason == "crashed" and proc.restarts == 1
        assert [type(e).__name__ for e in got] == ["StreamPlan", "FrameChunk"]


def test_decoder_process_reads_an_s3_video_through_a_capped_temp_copy(vids, s3_env, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(vids["h264.mp4"]), s3_env, "v/h264.mp4")
    url = f"s3://{s3_env}/v/h264.mp4"
    with DecoderProcess(timeout_s=60) as proc:  # the child inherits the AWS_* settings of this process
        assert markers(proc.decode(url, SamplingSpec(fps=5))) == list(range(0, N, 2))
        assert os.listdir(proc._workdir) == []  # the temp copy is gone with its video
    size = vids["h264.mp4"].stat().st_size
    with DecoderProcess(timeout_s=60, limits=DecodeLimits(max_file_bytes=size - 1)) as proc:
        with pytest.raises(DecodeError) as err:
            proc.decode(url, SamplingSpec(fps=5))
        assert err.value.reason == "too_large" and os.listdir(proc._workdir) == []
