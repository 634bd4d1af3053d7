"""The iBoot objective, target normalisation and the BYOL baseline."""

from __future__ import annotations

import math

import pytest
import torch

from training.models import StudentConfig, build_student
from training.objective import (
    BYOLBaseline,
    IBootHead,
    LossWeights,
    cosine_momentum,
    iboot_loss,
    nmse,
    normalize_targets,
    target_stats,
)

D = 12  # teacher dim


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _views(b: int = 3, l1: int = 4, l2: int = 4, size: int = 32, seed: int = 0):
    g = _gen(seed)
    return (torch.randn(b, l1, 3, size, size, generator=g), torch.randn(b, l2, 3, size, size, generator=g),
            torch.randn(b, l1, D, generator=g), torch.randn(b, l2, D, generator=g))


def _student_and_head(arch: str = "r2plus1d", norm: str = "layer"):
    student = build_student(StudentConfig(arch=arch))
    return student, IBootHead(student.embed_dim, D, hidden_dim=32, proj_dim=16, norm=norm)


# --- targets ---------------------------------------------------------------------------------------------


def test_target_stats_and_normalisation():
    g = _gen(1)
    # Like a random teacher: a big shared direction plus small differences.
    raw = 5.0 + 0.01 * torch.randn(200, D, generator=g)
    raw[:, 3] = 7.0  # a constant dimension
    mean, std = target_stats(raw)
    assert mean.shape == std.shape == (D,) and mean.dtype == torch.float32
    z = normalize_targets(raw, mean, std)
    assert torch.isfinite(z).all()
    keep = [i for i in range(D) if i != 3]
    torch.testing.assert_close(z[:, keep].mean(0), torch.zeros(D - 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, keep].std(0, unbiased=False), torch.ones(D - 1), atol=1e-3, rtol=0)
    assert torch.all(z[:, 3] == 0)
    # Raw targets all point the same way; normalised ones do not.
    raw_cos = torch.nn.functional.cosine_similarity(raw[:100], raw[100:], dim=-1)
    norm_cos = torch.nn.functional.cosine_similarity(z[:100], z[100:], dim=-1)
    assert raw_cos.min() > 0.99 and norm_cos.abs().mean() < 0.5


def test_normalize_targets_broadcasts_over_leading_dims_and_half_precision():
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    t = torch.randn(2, 5, D).half()
    z = normalize_targets(t, mean, std)
    assert z.shape == (2, 5, D) and z.dtype == torch.float32
    torch.testing.assert_close(z[1, 3], (t[1, 3].float() - mean) / std)


# --- nmse ------------------------------------------------------------------------------------------------


def test_nmse_known_values_and_bounds():
    x = torch.randn(10, D)
    torch.testing.assert_close(nmse(x, 3.0 * x), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(nmse(x, -x), torch.full((10,), 4.0))
    e = torch.eye(D)
    torch.testing.assert_close(nmse(e[:1], e[1:2]), torch.tensor([2.0]))
    r = nmse(torch.randn(1000, D), torch.randn(1000, D))
    assert r.min() >= 0 and r.max() <= 4
    # equals the squared distance of the unit vectors
    a, b = torch.randn(5, D), torch.randn(5, D)
    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(nmse(a, b), ((an - bn) ** 2).sum(-1))


# --- iBoot loss --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,norm", [("r2plus1d", "layer"), ("vit", "batch")])
def test_iboot_loss_is_symmetric_in_the_views(arch, norm):
    student, head = _student_and_head(arch, norm)
    v1, v2, t1, t2 = _views()
    w = LossWeights(cross=1.0, frame=0.5, same=0.25)
    loss_a, terms_a = iboot_loss(student, head, v1, v2, t1, t2, w)
    loss_b, terms_b = iboot_loss(student, head, v2, v1, t2, t1, w)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    for k in terms_a:
        assert terms_a[k] == pytest.approx(terms_b[k], abs=1e-5)


def test_iboot_terms_follow_the_definition():
    student, head = _student_and_head()
    student.eval()
    head.eval()
    v1, v2, t1, t2 = _views()
    loss, terms = iboot_loss(student, head, v1, v2, t1, t2, LossWeights(cross=1.0, frame=0.5, same=0.25))
    with torch.no_grad():
        o1, o2 = student(v1), student(v2)
        p1, p2 = head.predict_clip(o1.clip), head.predict_clip(o2.clip)
        cross = nmse(p1, t2.mean(1)).mean() + nmse(p2, t1.mean(1)).mean()  # the OTHER window
        same = nmse(p1, t1.mean(1)).mean() + nmse(p2, t2.mean(1)).mean()
        frame = (nmse(head.predict_frames(o1.frames), t1).mean()
                 + nmse(head.predict_frames(o2.frames), t2).mean())
    assert terms["cross"] == pytest.approx(float(cross), abs=1e-5)
    assert terms["same"] == pytest.approx(float(same), abs=1e-5)
    assert terms["frame"] == pytest.approx(float(frame), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(cross + 0.5 * frame + 0.25 * same), abs=1e-5)
    assert terms["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    # cosines are consistent with nmse = 2 - 2 cos
    assert terms["cos_cross"] == pytest.approx(1 - float(cross) / 4, abs=1e-5)
    assert cross != pytest.approx(float(same), abs=1e-3)  # the test would not tell them apart otherwise


def test_iboot_weights_select_terms_and_every_head_parameter_gets_a_gradient():
    student, head = _student_and_head()
    v1, v2, t1, t2 = _views()
    loss, terms = iboot_loss(student, head, v1, v2, t1, t2, LossWeights(cross=1.0, frame=0.0, same=0.0))
    assert float(loss.detach()) == pytest.approx(terms["cross"], abs=1e-6)
    loss.backward()
    # frame weight 0 still reaches the frame head (zero gradient), so DDP sees every parameter used
    for name, p in [*student.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None, name
    assert all(torch.all(p.grad == 0) for p in head.frame_head.parameters())
    assert any(torch.any(p.grad != 0) for p in head.predictor.parameters())


def test_iboot_loss_with_windows_of_different_length():
    student, head = _student_and_head("vit")
    v1, v2, t1, t2 = _views(l1=4, l2=6)
    loss, terms = iboot_loss(student, head, v1, v2, t1, t2)
    assert torch.isfinite(loss) and set(terms) >= {"cross", "frame", "same", "cos_cross", "cos_frame"}
    assert all(isinstance(v, float) for v in terms.values())


def test_iboot_loss_rejects_targets_that_do_not_match_the_view():
    student, head = _student_and_head()
    v1, v2, t1, t2 = _views()
    with pytest.raises(ValueError, match="targets2"):
        iboot_loss(student, head, v1, v2, t1, t2[:, :3])


def test_loss_weights_validation_and_roundtrip():
    assert LossWeights.from_dict(LossWeights(0.3, 0.2, 0.1).to_dict()) == LossWeights(0.3, 0.2, 0.1)
    with pytest.raises(ValueError):
        LossWeights(cross=-1.0)


@pytest.mark.parametrize("arch,size", [("r2plus1d", 16), ("vit", 32)])
def test_iboot_loss_decreases_on_a_synthetic_problem(arch, size):
    """Targets are a fixed nonlinear function of each frame's content; the student must fit them."""
    g = _gen(3)
    b, length = 6, 4
    video = torch.randn(b, 2 * length, 3, size, size, generator=g)
    # each sample: a random per-frame colour shift, so frames differ in a way the teacher "sees"
    video = video * 0.3 + torch.randn(b, 2 * length, 3, 1, 1, generator=g)
    proj = torch.randn(3, D, generator=g)
    targets = torch.tanh(video.mean(dim=(3, 4)) @ proj)  # [B, 2L, D]
    mean, std = target_stats(targets.reshape(-1, D))
    targets = normalize_targets(targets, mean, std)
    v1, v2 = video[:, :length], video[:, length:]
    t1, t2 = targets[:, :length], targets[:, length:]

    student, head = _student_and_head(arch)
    opt = torch.optim.AdamW([*student.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = iboot_loss(student, head, v1, v2, t1, t2, LossWeights(cross=1.0, frame=1.0, same=0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


# --- BYOL baseline -----------------------------------------------------------------------------------------


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    assert cosine_momentum(500, 100) == pytest.approx(1.0)
    values = [cosine_momentum(s, 100, base=0.9) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def _byol(norm: str = "batch") -> BYOLBaseline:
    return BYOLBaseline(build_student(StudentConfig(norm="batch")), hidden_dim=32, proj_dim=16, norm=norm)


def test_byol_target_is_a_frozen_copy():
    model = _byol()
    for (n, p), (_, q) in zip(model.student.named_parameters(), model.target_student.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
        assert p.requires_grad and not q.requires_grad
    v1, v2, _, _ = _views()
    loss, terms = model(v1, v2)
    loss.backward()
    assert all(p.grad is None for p in model.target_student.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert 0 <= terms["loss"] <= 8 and -1 <= terms["cos_cross"] <= 1


def test_byol_ema_update_math():
    model = _byol()
    with torch.no_grad():
        for p in [*model.student.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    model.train()
    model(*_views()[:2])  # changes BatchNorm running stats of the online network
    online = [p.detach().clone() for p in [*model.student.parameters(), *model.projector.parameters()]]
    target = [p.detach().clone() for p in [*model.target_student.parameters(),
                                           *model.target_projector.parameters()]]
    model.update_ema(0.9)
    new_target = [*model.target_student.parameters(), *model.target_projector.parameters()]
    assert len(online) == len(new_target)
    for o, t, n in zip(online, target, new_target):
        torch.testing.assert_close(n, 0.9 * t + 0.1 * o)
    for o, t in zip(model.student.buffers(), model.target_student.buffers()):
        assert torch.equal(o, t)
    model.update_ema(1.0)
    for n, t in zip(new_target, [0.9 * t + 0.1 * o for o, t in zip(online, target)]):
        torch.testing.assert_close(n, t)
    model.update_ema(0.0)
    for o, n in zip(online, new_target):
        torch.testing.assert_close(n, o)
    with pytest.raises(ValueError):
        model.update_ema(1.5)


def test_byol_loss_is_symmetric():
    model = _byol(norm="layer")
    model.eval()
    v1, v2, _, _ = _views()
    with torch.no_grad():
        a, _ = model(v1, v2)
        b, _ = model(v2, v1)
    torch.testing.assert_close(a, b)
    assert math.isfinite(float(a))
