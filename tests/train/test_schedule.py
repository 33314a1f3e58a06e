"""LR schedule values at the key steps, LambdaLR integration and resume."""

from __future__ import annotations

import math

import pytest
import torch

from glm5.train.schedule import ScheduleConfig, WarmupDecay, build_scheduler


def test_cosine_key_steps():
    f = WarmupDecay("cosine", warmup_steps=10, total_steps=110, min_ratio=0.2)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)  # peak right after warm-up
    assert f(60) == pytest.approx(0.2 + 0.8 * 0.5)  # halfway through the decay
    assert f(35) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.2) and f(10_000) == pytest.approx(0.2)  # floor, then flat
    vals = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_linear_and_constant():
    lin = WarmupDecay("linear", warmup_steps=0, total_steps=100, min_ratio=0.25)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.625) and lin(100) == pytest.approx(0.25) and lin(500) == pytest.approx(0.25)
    const = WarmupDecay("constant", warmup_steps=4, total_steps=100)
    assert [const(s) for s in (0, 3, 4, 99, 1000)] == [0.25, 1.0, 1.0, 1.0, 1.0]


def test_glm5_dsa_warmup_range():
    """DSA dense warm-up: 5e-3 -> 2e-4 (min_ratio 0.04) over 1000 steps."""
    f = WarmupDecay("cosine", total_steps=1000, min_ratio=2e-4 / 5e-3)
    assert 5e-3 * f(0) == pytest.approx(5e-3) and 5e-3 * f(1000) == pytest.approx(2e-4)


def test_bad_config():
    with pytest.raises(ValueError, match="kind"):
        WarmupDecay("wsd")
    with pytest.raises(ValueError, match="min_ratio"):
        WarmupDecay("cosine", min_ratio=1.5)


def _opt():
    w = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1}])


def test_lambdalr_integration_and_resume():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=3, total_steps=20, min_ratio=0.1)
    opt = _opt()
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    f = WarmupDecay("cosine", warmup_steps=3, total_steps=20, min_ratio=0.1)
    assert [a for a, _ in lrs] == pytest.approx([f(s) for s in range(12)])
    assert [b for _, b in lrs] == pytest.approx([0.1 * f(s) for s in range(12)])  # each group's own peak

    # resume after step 5 from state dicts (build both, then load both): the same LRs follow
    opt_a = _opt()
    sched_a = build_scheduler(opt_a, cfg)
    for _ in range(5):
        opt_a.step()
        sched_a.step()
    opt_b = _opt()
    sched_b = build_scheduler(opt_b, cfg)
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    got = []
    for _ in range(7):
        got.append(opt_b.param_groups[0]["lr"])
        opt_b.step()
        sched_b.step()
    assert got == pytest.approx([a for a, _ in lrs[5:12]])
