"""The learning benchmark (issue 13): the validation split, its statistics, the teacher readouts, the
offset switch, the target check; and the quick preset end to end on real videos, teacher and pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

from benchmarks.learning_report import markdown_table, reach_ratios, target_value
from benchmarks.learning_runs import BYOL, LADDER, train_config
from benchmarks.learning_stats import first_step_reaching, mean_ci, t_quantile
from feature_store.splits import is_heldout, split_of
from training.config import load_config
from training.evaluate import teacher_readout
from training.objective import IBootHead, iboot_loss


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_validation_split_is_deterministic_disjoint_from_test_and_sized():
    shas = [_sha(i) for i in range(4000)]
    splits = [split_of(s, 0.2, 0.15) for s in shas]
    assert splits == [split_of(s, 0.2, 0.15) for s in shas]
    assert all((sp == "test") == is_heldout(s, 0.2) for s, sp in zip(shas, splits))  # test IS the held-out split
    frac = {k: splits.count(k) / len(splits) for k in ("train", "val", "test")}
    assert abs(frac["test"] - 0.2) < 0.03 and abs(frac["val"] - 0.15) < 0.03
    assert {split_of(s, 0.2) for s in shas} == {"train", "test"}  # no validation unless asked
    with pytest.raises(ValueError):
        split_of(shas[0], 0.6, 0.5)


def test_t_quantiles_and_interval():
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-3)
    s = mean_ci([0.8, 0.85, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.85)
    assert s["half"] == pytest.approx(4.303 * 0.05 / math.sqrt(3), rel=1e-3)
    one = mean_ci([0.7])
    assert one["n"] == 1 and one["half"] is None and mean_ci([])["mean"] is None


def test_steps_to_reach_and_the_target_check():
    assert first_step_reaching([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
    assert first_step_reaching([0, 10], [0.1, 0.2], 0.5) is None
    steps = [0, 10, 20, 30]
    byol = {"curves": [{"step": steps, "shape": [0.3, 0.4, 0.5, 0.6], "direction": [0.25, 0.3, 0.3, 0.4]}] * 3}
    fast = {"curves": [{"step": steps, "shape": [0.3, 0.7, 0.8, 0.9], "direction": [0.25, 0.5, 0.6, 0.7]}] * 3}
    r = reach_ratios(fast, byol, ["direction", "shape"])
    assert r["shape"]["worst_fraction"] == pytest.approx(1 / 3) and r["direction"]["steps_per_seed"] == [10] * 3
    assert target_value(r, ["shape"], ["direction"]) == pytest.approx(1 / 3)
    slow_seed = {"curves": fast["curves"][:2] + [{"step": steps, "shape": [0.3, 0.4, 0.5, 0.55],
                                                 "direction": [0.25, 0.3, 0.3, 0.35]}]}
    r2 = reach_ratios(slow_seed, byol, ["direction", "shape"])
    assert r2["shape"]["worst_fraction"] is None  # one seed never gets there: the target is not met
    assert target_value(r2, ["shape"], ["direction"]) is None


def test_teacher_readouts_tell_a_clip_from_itself_played_backwards_only_with_order():
    g = np.random.default_rng(0)
    clip = g.normal(size=(1, 8, 5)).astype(np.float32)
    backwards = clip[:, ::-1].copy()
    assert np.allclose(teacher_readout(clip, "mean"), teacher_readout(backwards, "mean"), atol=1e-6)
    md, md_back = teacher_readout(clip, "mean_derivative"), teacher_readout(backwards, "mean_derivative")
    assert md.shape == (1, 10) and np.allclose(md[:, :5], md_back[:, :5], atol=1e-6)
    assert np.allclose(md[:, 5:], -md_back[:, 5:], atol=1e-5) and np.abs(md[:, 5:]).max() > 1e-3
    assert teacher_readout(clip, "concat").shape == (1, 40)
    with pytest.raises(ValueError):
        teacher_readout(clip, "max")


def test_offset_switch_off_drops_the_offset_embedding_and_ignores_the_offset():
    torch.manual_seed(0)
    on = IBootHead(8, 6, hidden_dim=16, proj_dim=4, offset_conditioning=True)
    off = IBootHead(8, 6, hidden_dim=16, proj_dim=4)  # the default
    assert off.offset_embed is None and sum(p.numel() for p in off.parameters()) < sum(
        p.numel() for p in on.parameters())
    clip = torch.randn(3, 8)
    assert torch.equal(off.predict_clip(clip, torch.tensor([0.5, -1.0, 2.0])), off.predict_clip(clip))
    assert not torch.allclose(on.predict_clip(clip, torch.tensor([0.5, -1.0, 2.0])), on.predict_clip(clip))

    class Tiny(torch.nn.Module):
        embed_dim = 8

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 8)

        def forward(self, v):
            f = self.lin(v.mean(dim=(3, 4)))
            return type("Out", (), {"clip": f.mean(1), "frames": f})()

    v1, v2, t1, t2 = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    _, terms = iboot_loss(Tiny(), off, v1, v2, t1, t2, offset=torch.tensor([0.5, 1.0]))
    assert terms["cos_cross"] != terms["cos_same"]  # cross still predicts the OTHER window (other targets)


def test_ladder_switches_one_thing_at_a_time_and_byol_is_the_papers():
    base = load_config("configs/demo.yaml")
    fields = [train_config(base, v, seed=0, steps=10, lr=1e-3, batch_size=4, warmup_steps=1) for v in LADDER]
    def switches(c):
        return (c.loss.frame > 0, c.student.coord_channels, c.student.temporal_derivative, c.offset_conditioning)
    seq = [switches(c) for c in fields]
    assert seq[0] == (False, False, False, False) and seq[-1] == (True, True, True, True)
    assert all(sum(a != b for a, b in zip(x, y)) == 1 for x, y in zip(seq, seq[1:]))
    byol = train_config(base, BYOL, seed=1, steps=10, lr=1e-3, batch_size=4, warmup_steps=1)
    assert byol.objective == "byol" and byol.byol_momentum == 0.996 and byol.augment.brightness > 0
    assert byol.student.coord_channels and byol.student.temporal_derivative  # the iBoot student's architecture


def test_markdown_table_shows_seeds_and_intervals():
    agg = {"test": {"shape": {"knn": mean_ci([0.8, 0.9, 0.85]), "linear": mean_ci([0.7, 0.7, 0.7])}}}
    text = markdown_table({"iboot": {"scores": agg}}, ["shape"])
    assert "| iboot | 3 | 0.85 ± 0.12 / 0.70 ± 0.00 |" in text


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path, ray_address, monkeypatch):
    from benchmarks.config import make_config
    from benchmarks.runner import run_benchmarks

    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    cfg = make_config("cpu", ["learning_preset=quick", f"learning_out={tmp_path / 'out'}"])
    (result,) = run_benchmarks(cfg, ("learning",), tmp_path / "work", ray_free=False, log=lambda m: None)
    assert "error" not in result.figures, result.figures.get("error")
    obj = json.loads((tmp_path / "out" / "learning.json").read_text())
    labels = obj["labels"]
    assert {"shape", "colour", "direction"} <= set(labels)
    expected = {"same architecture, random init", "teacher frames: mean", "teacher frames: mean + derivative",
                "teacher frames: concatenated", "BYOL (video only)", *(v.name for v in LADDER)}
    assert {r.removesuffix(" (default)") for r in obj["rows"]} == expected
    for row in obj["rows"].values():
        for split in ("val", "test"):
            for n in labels:
                for probe in ("knn", "linear"):
                    cell = row["scores"][split][n][probe]
                    assert cell["n"] >= 1 and 0.0 <= cell["mean"] <= 1.0
    assert obj["splits"]["val"]["samples"] > 0 and obj["splits"]["test"]["samples"] > 0
    assert all(obj["rows"][r]["step_flops"] > 0 for r in obj["rows"] if "step_flops" in obj["rows"][r])
    assert obj["teacher_flops_per_frame"] > 0
    for png in obj["plots"]:
        assert os.path.getsize(png) > 1000
    assert (tmp_path / "out" / "learning.md").read_text().startswith("| configuration | seeds |")
