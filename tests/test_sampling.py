"""pipeline.sampling: which frames, which segments (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.spec import SamplingSpec
from pipeline.sampling import FrameSelector, cut_segments, select_frames


def fps_spec(fps: float, **kw) -> SamplingSpec:
    return SamplingSpec(fps=fps, **kw)


def stride_spec(stride: int, **kw) -> SamplingSpec:
    return SamplingSpec(fps=None, stride=stride, **kw)


def brute_force_nearest(ts: np.ndarray, fps: float) -> list[int]:
    """The rule written the obvious way, to check the streaming implementation against."""
    ts = np.asarray(ts, dtype=np.float64)
    order = np.argsort(ts, kind="stable")
    s = ts[order]
    out: list[int] = []
    k = 0
    while s[0] + k / fps <= s[-1] + 1e-6:
        w = s[0] + k / fps
        d = np.abs(s - w)
        j = int(np.flatnonzero(d <= d.min() + 1e-6)[0])  # earliest of the (near-)ties
        if int(order[j]) not in out:
            out.append(int(order[j]))
        k += 1
    return out


# --- select_frames by fps -----------------------------------------------------------------------------

def test_constant_rate_downsampling_takes_every_nth_frame():
    ts = np.arange(40) / 30.0  # 30 fps
    assert select_frames(ts, fps_spec(10)).tolist() == list(range(0, 40, 3))
    assert select_frames(ts, fps_spec(30)).tolist() == list(range(40))


def test_ties_go_to_the_earlier_frame_even_with_float32_timestamps():
    # 30 fps at 4 fps: 0.25 s lies exactly between frames 7 and 8; decord reports float32-rounded times.
    ts64 = np.arange(31) / 30.0
    ts32 = ts64.astype(np.float32)
    a, b = select_frames(ts64, fps_spec(4)), select_frames(ts32, fps_spec(4))
    assert a.tolist() == b.tolist() == [0, 7, 15, 22, 30]


def test_vfr_picks_the_frame_nearest_each_wanted_time():
    ts = np.array([0.0, 0.05, 0.1, 0.4, 0.45, 1.0, 1.02, 1.5, 2.0, 2.3])
    # wanted at 4 fps: 0, .25, .5, .75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25
    # nearest:        0, 0.1(2) vs 0.4(3) -> .25 is .15 from 2 and .15 from 3: tie -> 2; .5 -> 4; .75 -> 5
    #                 (.45 vs 1.0: .30 vs .25); 1.0 -> 5; 1.25 -> 6 (1.02) vs 7 (1.5): .23 vs .25 -> 6;
    #                 1.5 -> 7; 1.75 -> 7 or 8 (tie .25/.25 -> 7); 2.0 -> 8; 2.25 -> 9 (.05 vs .25)
    assert select_frames(ts, fps_spec(4)).tolist() == [0, 2, 4, 5, 6, 7, 8, 9]
    assert select_frames(ts, fps_spec(4)).tolist() == brute_force_nearest(ts, 4)


def test_streaming_selector_matches_brute_force_on_random_vfr():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        gaps = rng.choice([0.0, 1 / 60, 1 / 30, 0.1, 0.37, 1.3], size=n - 1) * rng.uniform(0.5, 1.5, n - 1)
        ts = 5.0 + np.concatenate([[0.0], np.cumsum(gaps)])  # a non-zero start time, like many streams
        fps = float(rng.choice([0.5, 1, 2.5, 4, 8, 30]))
        assert select_frames(ts, fps_spec(fps)).tolist() == brute_force_nearest(ts, fps), (trial, fps)


def test_source_slower_than_requested_rate_gives_each_frame_once():
    ts = np.arange(6) / 2.0  # a 2 fps video asked for at 4 fps
    assert select_frames(ts, fps_spec(4)).tolist() == [0, 1, 2, 3, 4, 5]


def test_unsorted_timestamps_return_decode_order_indices_in_time_order():
    ts = np.array([0.0, 0.2, 0.1, 0.4, 0.3])  # B-frame decode order
    assert select_frames(ts, fps_spec(10)).tolist() == [0, 2, 1, 4, 3]
    assert select_frames(ts, fps_spec(5)).tolist() == [0, 1, 3]


def test_wanted_times_stop_at_the_last_frame():
    ts = np.array([0.0, 0.1, 0.9])
    # wanted 0, .5 (nearest .1? no: .4 vs .4 -> tie -> 1); 1.0 is past the last frame
    assert select_frames(ts, fps_spec(2)).tolist() == [0, 1]


def test_max_frames_caps_to_the_first_sampled_frames():
    ts = np.arange(100) / 10.0
    assert select_frames(ts, fps_spec(2, max_frames=3)).tolist() == [0, 5, 10]
    assert select_frames(ts, fps_spec(2, max_frames=0)).size == 20
    assert select_frames(np.arange(10.0), stride_spec(3, max_frames=2)).tolist() == [0, 3]


def test_stride_takes_every_nth_frame_from_the_first():
    assert select_frames(np.arange(10) / 25, stride_spec(4)).tolist() == [0, 4, 8]
    assert select_frames(np.arange(3) / 25, stride_spec(1)).tolist() == [0, 1, 2]


@pytest.mark.parametrize("spec", [fps_spec(4), stride_spec(2)])
def test_zero_and_one_frame(spec):
    assert select_frames(np.array([]), spec).tolist() == []
    assert select_frames(np.array([]), spec).dtype == np.int64
    assert select_frames(np.array([3.7]), spec).tolist() == [0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_timestamps_are_rejected(bad):
    with pytest.raises(ValueError):
        select_frames(np.array([0.0, bad]), fps_spec(4))
    sel = FrameSelector(fps_spec(4))
    sel.push(0.0)
    with pytest.raises(ValueError):
        sel.push(bad)


def test_selector_reports_choices_as_soon_as_they_are_final():
    sel = FrameSelector(fps_spec(4, max_frames=3))
    assert sel.push(0.0) == [0] and sel.pending is None
    assert sel.push(0.1) == []  # 0.25 might still be nearer to the next frame
    assert sel.pending == 1
    assert sel.push(0.3) == [2]  # 0.25: 0.3 is nearer than 0.1
    assert sel.push(0.45) == [] and sel.pending == 3
    assert sel.push(0.45) == [] and sel.pending == 3  # same time: the earlier frame stays the candidate
    assert not sel.done
    assert sel.push(0.6) == [3]  # 0.5: 0.45 is nearer -> frame 3, decided only now
    assert sel.done and sel.push(0.75) == [] and sel.pending is None


def test_selector_rejects_decreasing_times():
    sel = FrameSelector(fps_spec(4))
    sel.push(1.0)
    with pytest.raises(ValueError):
        sel.push(0.5)


# --- cut_segments --------------------------------------------------------------------------------------

def as_lists(segments):
    return [s.tolist() for s in segments]


def test_segments_without_overlap_drop_the_tail():
    spec = SamplingSpec(segment_frames=4)
    assert as_lists(cut_segments(10, spec)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert as_lists(cut_segments(8, spec)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_segments_with_overlap():
    spec = SamplingSpec(segment_frames=4, overlap=2)
    assert as_lists(cut_segments(9, spec)) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    spec3 = SamplingSpec(segment_frames=4, overlap=3)
    assert as_lists(cut_segments(6, spec3)) == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]


def test_segments_accept_the_sampled_indices():
    spec = SamplingSpec(segment_frames=2)
    assert as_lists(cut_segments(np.array([10, 20, 30, 40, 50]), spec)) == [[0, 1], [2, 3]]


def test_short_video_is_padded_with_its_last_frame_or_dropped():
    pad = SamplingSpec(segment_frames=5, short="pad")
    drop = SamplingSpec(segment_frames=5, short="drop")
    assert as_lists(cut_segments(3, pad)) == [[0, 1, 2, 2, 2]]
    assert as_lists(cut_segments(1, pad)) == [[0, 0, 0, 0, 0]]
    assert cut_segments(3, drop) == [] and cut_segments(1, drop) == []
    assert as_lists(cut_segments(5, drop)) == [[0, 1, 2, 3, 4]]


def test_no_frames_no_segments():
    assert cut_segments(0, SamplingSpec(segment_frames=4, short="pad")) == []
    assert cut_segments(np.array([], dtype=np.int64), SamplingSpec(segment_frames=4)) == []


def test_segments_are_int64_and_full_length():
    for n in range(0, 30):
        for overlap in (0, 1, 3):
            spec = SamplingSpec(segment_frames=4, overlap=overlap)
            segs = cut_segments(n, spec)
            assert all(s.dtype == np.int64 and len(s) == 4 for s in segs)
            assert all(0 <= s.min() and s.max() < n for s in segs)


# --- streaming segments --------------------------------------------------------------------------------

@pytest.mark.parametrize("overlap", [0, 1, 3])
@pytest.mark.parametrize("short", ["pad", "drop"])
@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
def test_segment_cutter_matches_cut_segments_for_any_chunking(overlap, short, chunk):
    from pipeline.sampling import SegmentCutter, count_segments

    spec = SamplingSpec(fps=4, segment_frames=4, overlap=overlap, short=short)
    for n in [0, 1, 3, 4, 5, 7, 8, 9, 17, 30]:
        values = np.arange(n) * 10
        cutter = SegmentCutter(spec)
        got = []
        for s in range(0, n, chunk):
            got += cutter.push(values[s:s + chunk], values[s:s + chunk] + 1)
            assert all(len(b) <= spec.segment_frames + chunk for b in cutter._buf)  # bounded
        got += cutter.finish()
        want = cut_segments(n, spec)
        assert len(want) == count_segments(n, spec)
        assert [g[0] for g in got] == list(range(len(want)))
        assert [g[1].tolist() for g in got] == [w.tolist() for w in want]
        assert [g[2][0].tolist() for g in got] == [values[w].tolist() for w in want]
        assert [g[2][1].tolist() for g in got] == [(values[w] + 1).tolist() for w in want]
