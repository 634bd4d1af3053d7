"""The benchmarks' pure parts: targets and ratios, the table and JSON, the docs writer keeping one section per
machine and preset, the size presets and overrides, the steady-state rate; plus one end-to-end run of the
Ray-free preset at toy sizes (it checks that the command works and imports no Ray, not how fast it is)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.config import BENCHMARKS, RAY_FREE_BENCHMARKS, BenchConfig, make_config
from benchmarks.docs import INTRO, merge_section, render_section, section_id, split_sections, write_section
from benchmarks.machine import MachineInfo
from benchmarks.measure import marginal_rate
from benchmarks.report import BenchResult, Target, clean, format_table, json_line, markdown_table, ratio, sig

REPO = Path(__file__).resolve().parents[1]


def _machine(gpu: str = "none", torch: str = "2.13.0") -> MachineInfo:
    return MachineInfo(cpu_model="AMD EPYC", cores=2, ram_gib=23, gpu=gpu, torch=torch, transformers="5.24.0",
                       python="3.11.9")


def _results() -> list[BenchResult]:
    return [
        BenchResult("cached_vs_online", 0.95, Target(0.9), "small: 3.8x of ideal 4.0x",
                    {"teachers": {"small": {"speedup": np.float64(3.8)}}}),
        BenchResult("reuse", 0.2, Target(0.1, higher_is_better=False), "0.9 s again vs 4.5 s first", {"runs": {}}),
        BenchResult("extraction", None, Target(0.85), "teacher alone 900 frames/s", {}, ["no Ray here"]),
        BenchResult("storage", 0.9999983, Target(0.9999), "fp16 | centred", {}),
    ]


# -- targets and ratios ----------------------------------------------------------------------------------


def test_target_direction_threshold_and_missing_values():
    hi, lo = Target(0.9), Target(0.1, higher_is_better=False)
    assert hi.met(0.9) and hi.met(1.3) and not hi.met(0.8999)
    assert lo.met(0.1) and lo.met(0.02) and not lo.met(0.1001)
    assert hi.met(None) is None and lo.met(float("nan")) is None
    assert (hi.op, lo.op, lo.describe()) == (">=", "<=", "<= 0.1")


def test_ratio_and_significant_digits():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0) is None and ratio(None, 2.0) is None
    assert sig(0.000123456, 3) == 0.000123 and sig(123456.7, 3) == 123000 and sig(0.99999834, 7) == 0.9999983
    assert sig(float("inf")) is None and sig(0.0) == 0.0


def test_result_json_has_figures_value_target_met_and_is_plain_json():
    r = _results()[0]
    d = r.to_json()
    assert d["value"] == 0.95 and d["target"] == 0.9 and d["target_op"] == ">=" and d["met"] is True
    assert d["teachers"]["small"]["speedup"] == 3.8 and type(d["teachers"]["small"]["speedup"]) is float
    missed = _results()[1].to_json()
    assert missed["met"] is False and missed["target_op"] == "<="
    absent = _results()[2].to_json()
    assert absent["value"] is None and absent["met"] is None and absent["notes"] == ["no Ray here"]
    assert clean({"a": (np.int64(3), float("nan"))}) == {"a": [3, None]}


def test_json_line_is_one_object_keyed_by_benchmark_name():
    line = json_line(_results())
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj) == ["cached_vs_online", "reuse", "extraction", "storage"]
    assert all({"value", "target", "met"} <= set(v) for v in obj.values())


# -- table -----------------------------------------------------------------------------------------------


def test_text_table_aligns_columns_and_shows_verdicts():
    lines = format_table(_results()).splitlines()
    assert lines[0].split() == ["benchmark", "measured", "value", "target", "met"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + len(_results())
    starts = [lines[0].index(col) for col in ("value", "target")]
    for line in lines[2:]:  # every value and target starts in its header's column
        assert line[starts[0] - 1] == " " and line[starts[1] - 1] == " "
    cvo, reuse, extraction, storage = lines[2:]
    assert cvo.rstrip().endswith("yes") and "0.950" in cvo
    assert reuse.rstrip().endswith("NO") and "0.200" in reuse
    assert extraction.rstrip().endswith("n/a") and " n/a " in extraction
    assert "0.999998" in storage  # enough decimals to compare with 0.9999


def test_markdown_table_escapes_pipes():
    md = markdown_table(_results())
    rows = md.splitlines()
    assert rows[0].startswith("| benchmark |") and rows[1].startswith("|---")
    assert "fp16 \\| centred" in md
    assert all(r.count(" | ") == 4 for r in [rows[0], *rows[2:]])  # five cells per row, escaped pipe included


# -- docs: one section per machine and preset ------------------------------------------------------------


def test_machine_id_is_stable_and_follows_the_hardware():
    assert _machine().machine_id == _machine().machine_id
    assert len({_machine().machine_id, _machine(gpu="NVIDIA H100 80GB HBM3").machine_id,
                _machine(torch="2.11.0").machine_id}) == 3
    assert section_id(_machine(), "cpu") != section_id(_machine(), "gpu")


def test_merge_replaces_only_its_own_section():
    cpu, gpu = section_id(_machine(), "cpu"), section_id(_machine(gpu="NVIDIA H100"), "gpu")
    doc = merge_section("", cpu, "## CPU run 1\nold cpu figures")
    doc = merge_section(doc, gpu, "## GPU run\ngpu figures")
    assert list(split_sections(doc)) == [cpu, gpu]
    doc2 = merge_section(doc, cpu, "## CPU run 2\nnew cpu figures")
    sections = split_sections(doc2)
    assert list(sections) == [cpu, gpu]  # order kept
    assert "new cpu figures" in sections[cpu] and "old cpu figures" not in doc2
    assert sections[gpu] == split_sections(doc)[gpu]  # byte for byte
    assert doc2.startswith(INTRO.rstrip())
    assert merge_section(doc2, cpu, "## CPU run 2\nnew cpu figures") == doc2  # idempotent


def test_merge_keeps_unknown_text_out_and_refreshes_the_intro():
    sid = section_id(_machine(), "cpu")
    doc = merge_section("# Old title\nstale intro\n", sid, "body", intro="# Benchmarks\nfresh intro\n")
    assert doc.startswith("# Benchmarks\nfresh intro") and "stale intro" not in doc
    assert split_sections(doc)[sid].count("body") == 1


def test_render_and_write_section(tmp_path):
    info = _machine(gpu="NVIDIA H100 80GB HBM3")
    body = render_section(info, "gpu", _results(), when="2026-11-27 07:00 UTC", command="python -m benchmarks",
                          load_avg=(0.5, 0.4), config=BenchConfig().to_dict(), wall_s=61.0)
    assert info.machine_id in body and "NVIDIA H100 80GB HBM3" in body and "| cached_vs_online |" in body
    assert "`extraction`: no Ray here" in body
    blob = body.split("```json\n", 1)[1].split("```", 1)[0]
    assert set(json.loads(blob)) == {r.name for r in _results()}
    path = tmp_path / "docs" / "benchmarks.md"
    write_section(path, section_id(info, "gpu"), body)
    write_section(path, section_id(_machine(), "cpu"), "## cpu\nx")
    text = path.read_text()
    assert set(split_sections(text)) == {section_id(info, "gpu"), section_id(_machine(), "cpu")}
    assert not list(path.parent.glob("*.tmp"))


# -- presets and overrides -------------------------------------------------------------------------------


def test_presets_and_overrides():
    assert make_config("cpu").threads == 1 and make_config("gpu").threads == 0
    gpu = make_config("gpu")
    assert gpu.teachers == ("vit-b16", "vit-l14") and gpu.image_size == 224 and gpu.preset == "gpu"
    cfg = make_config("gpu", ["teachers=tiny,small", "image_size=32", "repeats=1", "fps=6"])
    assert cfg.teachers == ("tiny", "small") and cfg.image_size == 32 and cfg.repeats == 1 and cfg.fps == 6.0
    assert make_config("cpu", ["scales=[1, 3]"]).scales == (1, 3)
    with pytest.raises(ValueError, match="no such field"):
        make_config("cpu", ["nope=1"])
    with pytest.raises(ValueError, match="unknown teacher"):
        make_config("cpu", ["teachers=tiny,huge"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        make_config("cpu", ["videos"])
    with pytest.raises(ValueError, match="scales must include 1"):
        make_config("cpu", ["scales=2,4"])
    assert set(RAY_FREE_BENCHMARKS) < set(BENCHMARKS)


def test_ray_free_selection_rejects_benchmarks_that_need_ray():
    from benchmarks.runner import check_selection

    check_selection(RAY_FREE_BENCHMARKS, ray_free=True)
    check_selection(BENCHMARKS, ray_free=False)
    with pytest.raises(ValueError, match="loader"):
        check_selection(("storage", "loader"), ray_free=True)
    with pytest.raises(ValueError, match="unknown"):
        check_selection(("speed",), ray_free=False)


def test_learning_is_registered_runs_only_when_asked_and_takes_its_preset():
    from benchmarks.config import DEFAULT_BENCHMARKS
    from benchmarks.learning import PRESETS, preset_of
    from benchmarks.runner import RUN_ORDER, check_selection

    assert "learning" in BENCHMARKS and "learning" in RUN_ORDER and "learning" not in DEFAULT_BENCHMARKS
    assert set(DEFAULT_BENCHMARKS) | {"learning"} == set(BENCHMARKS)
    check_selection(("learning",), ray_free=False)
    with pytest.raises(ValueError, match="learning"):
        check_selection(("learning",), ray_free=True)  # it extracts through the Ray pipeline
    assert make_config("cpu").learning_preset == "full" and len(preset_of(make_config("cpu")).seeds) >= 3
    quick = preset_of(make_config("cpu", ["learning_preset=quick"]))
    assert quick == PRESETS["quick"] and len(quick.seeds) == 1
    short = preset_of(make_config("cpu", ["learning_steps=40", "learning_seeds=4", "learning_lrs=1e-3,3e-3"]))
    assert short.steps == 40 and short.eval_every == 5 and short.seeds == (0, 1, 2, 3)
    assert short.lrs == (1e-3, 3e-3)
    with pytest.raises(ValueError, match="learning_preset"):
        preset_of(make_config("cpu", ["learning_preset=huge"]))


# -- measurement helpers ---------------------------------------------------------------------------------


def test_marginal_rate_cancels_what_every_run_pays():
    # 12 s fixed per run, 100 frames/s of work; the first (cold) run paid 5 s more
    runs = [(800, 12 + 8 + 5), (1600, 12 + 16), (3200, 12 + 32)]
    assert math.isclose(marginal_rate(runs), 100.0)
    assert math.isclose(marginal_rate(list(reversed(runs))), 100.0)
    assert math.isclose(marginal_rate(runs[1:]), 100.0)
    assert 3200 / 44 < 100  # the end-to-end rate of the largest run is lower: it carries the fixed cost
    assert marginal_rate(runs[:1]) is None and marginal_rate([(800, 20.0), (1600, 19.0)]) is None


def test_extraction_end_to_end_note_says_where_the_time_went():
    from benchmarks.extraction import _e2e_note, _outside_window

    assert math.isclose(_outside_window(3000, 20.0, 200.0), 5.0)  # 15 s in the teacher's window, 5 s outside
    assert _outside_window(3000, 20.0, None) is None
    pipeline = {"wall_s": 20.0, "ray_start_s": 4.0, "outside_teacher_window_s": 5.0, "steady_frames_per_s": 200.0,
                "frames": 3000}
    note = _e2e_note(pipeline, {"startup_s": 0.1, "frames_per_s": 180.0})
    assert "20.0 s run" in note and "4.0 s starting Ray" in note and "5.0 s lie outside" in note and "0.1 s" in note


def test_fresh_process_figures_take_each_sides_median_and_refuse_unequal_work():
    from benchmarks.extraction import _fresh_figures

    cli = [{"frames": 4608, "e2e_frames_per_s": r, "executor": "local"} for r in (150.0, 170.0, 160.0)]
    loop = [{"frames": 4608, "e2e_frames_per_s": r} for r in (140.0, 120.0, 200.0)]
    out = _fresh_figures({"cli": cli, "loop": loop})
    assert out["cli"]["e2e_frames_per_s"] == 160.0 and out["loop"]["e2e_frames_per_s"] == 140.0
    assert out["loop"]["e2e_frames_per_s_runs"] == [140.0, 120.0, 200.0]
    assert math.isclose(out["of_loop"], 160 / 140, rel_tol=1e-3)
    with pytest.raises(RuntimeError, match="different frame counts"):
        _fresh_figures({"cli": cli, "loop": [{**loop[0], "frames": 4600}]})


def test_centred_cosine_tells_float16_from_a_channel_mix_up():
    import torch

    from benchmarks.storage import centred_cosine

    g = torch.Generator().manual_seed(0)
    exact = 5 + 0.05 * torch.randn((64, 32), generator=g)  # one large shared direction, as teachers give
    assert centred_cosine(exact.half().float(), exact).mean() > 0.999
    swapped = exact[:, torch.randperm(32, generator=g)]
    assert torch.nn.functional.cosine_similarity(swapped, exact).min() > 0.99  # a raw cosine hides the bug
    assert centred_cosine(swapped, exact).mean() < 0.5


# -- end to end: the Ray-free preset at toy sizes ----------------------------------------------------------


@pytest.mark.slow
def test_ray_free_preset_runs_end_to_end_without_ray(tmp_path):
    sizes = ["teachers=tiny", "image_size=32", "student_arch=r2plus1d", "student_size=tiny", "batch_size=2",
             "view_frames=4", "segment_frames=8", "steps=1", "warmup_steps=1", "repeats=1", "frames_alone=16",
             "extract_batch=16"]
    args = ["--preset", "gpu", "--json", "--no-docs", "--workdir", str(tmp_path / "work"),
            *[a for s in sizes for a in ("--set", s)]]
    # python -m benchmarks, then report which of the Ray-only modules got loaded
    code = ("import runpy, sys\n"
            "try:\n    runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)\n"
            "finally:\n    print('LOADED', sorted(m for m in ('ray', 'decord', 'webdataset') "
            "if sys.modules.get(m) is not None), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stderr
    obj = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(obj) == ["cached_vs_online", "extraction", "storage"]
    assert obj["cached_vs_online"]["teachers"]["tiny"]["cached_samples_per_s"] > 0
    assert obj["extraction"]["value"] is None and obj["extraction"]["met"] is None
    assert obj["storage"]["value"] > 0.999 and isinstance(obj["storage"]["met"], bool)


@pytest.mark.slow
@pytest.mark.ray
def test_ingest_scale_quick_preset_plans_the_whole_listing_and_computes_only_the_new_videos(tmp_path, ray_address):
    """ingest_scale at toy sizes: real files, a seeded KEY, a dry run and a real run per size in fresh
    driver processes (on the tests' shared cluster); checked for what was planned and computed, not speed."""
    from benchmarks import ingest_scale
    from benchmarks.session import BenchSession

    cfg = make_config("cpu", ["ingest_sizes=60,150", "ingest_new=2"])
    result = ingest_scale.run(BenchSession(cfg, tmp_path, lambda msg: None), address=ray_address)
    assert result.name == "ingest_scale" and not result.notes, result.notes
    for n in ("60", "150"):
        dry, real = result.figures["runs"][n]["dry_run"], result.figures["runs"][n]["real"]
        assert dry["to_compute"] == 2 and dry["reused"] == int(n) - 2 and dry["plan_s"] > 0
        assert real["videos_ok"] == int(n) and real["videos_reused"] == int(n) - 2 and real["frames_computed"] > 0
        assert real["peak_rss_mib"] >= real["rss_at_start_mib"] > 0
    assert result.value == max(result.figures["peak_rss_ratio"].values()) > 0
