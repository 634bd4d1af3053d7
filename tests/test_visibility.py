"""The visibility check's pure parts (pipeline.visibility), and its Ray edge on the shared session cluster,
where every node is this machine and so sees every path. The refusal by a node that truly cannot see the
store is tested on the multi-node cluster (tests/test_multinode.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.visibility import (MARKER_PREFIX, NodeReport, PathNotShared, Probe, check_probe, ensure_visible,
                                 is_local, make_probe, pick_videos, refusal)


@dataclass
class Item:
    source: str
    size: int


def test_local_and_remote_paths():
    assert is_local("/data/store") and is_local("store") and is_local("file:///data/store")
    assert not is_local("s3://bucket/store") and not is_local("gs://b/x") and not is_local("https://h/v.mp4")


def test_pick_videos_spreads_over_the_local_ones_and_skips_remote():
    items = [Item(f"/v/{i}.mp4", i) for i in range(10)]
    picked = pick_videos(items, k=4)
    assert [p for p, _ in picked] == ["/v/0.mp4", "/v/3.mp4", "/v/6.mp4", "/v/9.mp4"]
    assert dict(picked)["/v/3.mp4"] == 3
    mixed = [*items[:9], Item("s3://b/x.mp4", 5)]  # a remote one at a picked position is left out
    assert [p for p, _ in pick_videos(mixed, k=4)] == ["/v/0.mp4", "/v/3.mp4", "/v/6.mp4"]
    assert pick_videos([Item("file:///v/a.mp4", 7)]) == (("/v/a.mp4", 7),)
    assert len(pick_videos(items[:3], k=4)) == 3  # fewer than k: all of them
    assert pick_videos([Item("s3://b/x.mp4", 5)]) == () and pick_videos([]) == ()


def test_remote_root_and_remote_videos_skip_the_check():
    assert make_probe("s3://bucket/store", [Item("s3://bucket/v.mp4", 1)]) is None
    probe = make_probe("s3://bucket/store", [Item("/v/a.mp4", 1)])  # local videos are still checked
    assert probe is not None and probe.marker_path == "" and probe.videos == (("/v/a.mp4", 1),)


def test_a_local_root_gets_a_marker_with_a_fresh_token(tmp_path):
    a, b = make_probe(str(tmp_path), []), make_probe(str(tmp_path), [])
    assert a.token != b.token and len(a.token) == 32
    assert a.marker_path == str(tmp_path / (MARKER_PREFIX + a.token))


def _video(tmp_path: Path, name: str, n: int) -> Item:
    p = tmp_path / name
    p.write_bytes(b"x" * n)
    return Item(str(p), n)


def test_check_probe_sees_the_marker_and_the_videos(tmp_path):
    v = _video(tmp_path, "a.mp4", 10)
    probe = make_probe(str(tmp_path), [v])
    Path(probe.marker_path).write_text(probe.token)
    assert check_probe(probe) == ()


def test_check_probe_names_each_problem(tmp_path):
    v = _video(tmp_path, "a.mp4", 10)
    probe = make_probe(str(tmp_path), [v, Item(str(tmp_path / "gone.mp4"), 3)])
    problems = check_probe(probe)  # no marker written: a node that sees another folder (or none)
    assert len(problems) == 2
    assert "cannot read the driver's marker" in problems[0] and str(tmp_path) in problems[0]
    assert "gone.mp4" in problems[1] and "FileNotFoundError" in problems[1]
    Path(probe.marker_path).write_text("another-token")
    v_path = Path(v.source)
    v_path.write_bytes(b"x" * 11)  # same name, other content: a different copy of the file
    problems = check_probe(Probe(probe.store_root, probe.marker_path, probe.token, ((v.source, 10),)))
    assert "another token" in problems[0] and "11 bytes here, 10 bytes listed" in problems[1]


def test_refusal_names_the_nodes_the_path_and_the_remedy():
    probe = Probe("/data/store", "/data/store/.m", "t", ())
    assert refusal([NodeReport("n1", "10.0.0.1")], probe) is None
    msg = refusal([NodeReport("n1", "10.0.0.1"), NodeReport("n2", "10.0.0.2", ("store root /data/store: x",))],
                  probe)
    assert "1 node(s)" in msg and "n2 (10.0.0.2)" in msg and "n1" not in msg
    assert "/data/store" in msg and "shared" in msg and "s3://" in msg and "nothing was computed" in msg


@pytest.mark.ray
def test_every_node_of_the_session_cluster_sees_a_local_store(ray_session, tmp_path):
    v = _video(tmp_path, "a.mp4", 10)
    ensure_visible(str(tmp_path), [v])  # passes: the nodes are this machine
    assert not [p for p in os.listdir(tmp_path) if p.startswith(MARKER_PREFIX)]  # the marker is removed
    with pytest.raises(PathNotShared, match="missing.mp4"):  # a path no node sees is refused by every node
        ensure_visible(str(tmp_path), [v, Item(str(tmp_path / "missing.mp4"), 4)])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(MARKER_PREFIX)]


def test_a_work_list_table_is_read_only_at_the_picked_rows():
    import pyarrow as pa

    from pipeline.visibility import WorkListRows

    table = pa.table({"source": [f"/v/{i}.mp4" for i in range(1000)], "size": list(range(1000))})
    assert pick_videos(WorkListRows(table), k=3) == (("/v/0.mp4", 0), ("/v/500.mp4", 500), ("/v/999.mp4", 999))
