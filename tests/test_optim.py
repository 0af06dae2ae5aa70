"""Learning-rate schedules against their closed forms; one step of each optimizer by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distsgd.config import ConfigError, OptimConfig, ScheduleConfig
from distsgd.optim import build_optimizer, build_schedule

LR, TOTAL, SPE = 0.5, 100, 10  # base rate, run length in steps, steps per epoch


def closed_form(name: str, s: int, length: int, unit: int) -> float:
    """The decay at its own step s, written independently of distsgd.optim."""
    return {
        "constant": LR,
        "step": LR * 0.5 ** math.floor(s / (3 * unit)),
        "multistep": LR * 0.5 ** ((s >= 2 * unit) + (s >= 5 * unit)),
        "exponential": LR * 0.9 ** (s / unit),
        "inverse_time": LR / (1 + 0.3 * s / unit),
        "polynomial": 0.01 + (LR - 0.01) * (1 - s / length) ** 2,
        "cosine": 0.01 + (LR - 0.01) * 0.5 * (1 + math.cos(math.pi * s / length)),
    }[name]


SCHEDULE_ARGS = dict(step_size=3, milestones=[2, 5], gamma=0.5, decay_rate=0.3, power=2.0, min_lr=0.01)


@pytest.mark.parametrize("unit", ["steps", "epochs"])
@pytest.mark.parametrize("warmup", [0, 4])
@pytest.mark.parametrize("name", ["constant", "step", "multistep", "exponential", "inverse_time", "polynomial", "cosine"])
def test_schedule_equals_closed_form(name, warmup, unit):
    args = dict(SCHEDULE_ARGS, gamma=0.9) if name == "exponential" else SCHEDULE_ARGS
    scale = SPE if unit == "epochs" else 1
    schedule = build_schedule(ScheduleConfig(name=name, unit=unit, warmup_steps=warmup, **args), LR, TOTAL, SPE)
    w = warmup * scale
    for t in [0, 1, 3, w, w + 1, w + 7, w + 23, TOTAL // 2, TOTAL - 1]:
        expected = LR * (t + 1) / w if t < w else closed_form(name, t - w, TOTAL - w, scale)
        assert schedule(t) == pytest.approx(expected, rel=1e-12), f"step {t}"


def test_warmup_ramps_linearly_to_the_base_rate():
    schedule = build_schedule(ScheduleConfig(name="cosine", warmup_steps=10), LR, TOTAL, SPE)
    assert [schedule(t) for t in range(10)] == pytest.approx([LR * (t + 1) / 10 for t in range(10)])
    assert schedule(10) == pytest.approx(LR)  # the decay's own t=0
    assert schedule(TOTAL - 1) < 0.01 * LR


def test_warmup_longer_than_the_run_is_an_error():
    with pytest.raises(ConfigError, match="schedule.warmup_steps=20 .* longer than the run's 100 steps"):
        build_schedule(ScheduleConfig(name="constant", warmup_steps=20, unit="epochs"), LR, TOTAL, SPE)


def one_step(cfg: OptimConfig, grads: list[torch.Tensor], lr: float = 0.1, steps: int = 1) -> torch.Tensor:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = build_optimizer(cfg, [p], lr)
    for g in grads[:steps]:
        p.grad = g.clone()
        opt.step()
    return p.detach()


G1 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
G2 = torch.tensor([-0.25, 0.5, 1.0], dtype=torch.float64)
P0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)


def test_sgd_with_weight_decay_by_hand():
    got = one_step(OptimConfig(name="sgd", weight_decay=0.01), [G1])
    assert torch.allclose(got, P0 - 0.1 * (G1 + 0.01 * P0), rtol=0, atol=1e-15)


def test_momentum_and_nesterov_by_hand():
    # Two steps, so the momentum buffer matters: b1 = g1, b2 = mu b1 + (1 - dampening) g2.
    mu, damp = 0.9, 0.1
    got = one_step(OptimConfig(name="sgd", momentum=mu, dampening=damp), [G1, G2], steps=2)
    p1 = P0 - 0.1 * G1
    b2 = mu * G1 + (1 - damp) * G2
    assert torch.allclose(got, p1 - 0.1 * b2, atol=1e-15)

    got = one_step(OptimConfig(name="sgd", momentum=mu, nesterov=True), [G1, G2], steps=2)
    p1 = P0 - 0.1 * (G1 + mu * G1)
    b2 = mu * G1 + G2
    assert torch.allclose(got, p1 - 0.1 * (G2 + mu * b2), atol=1e-15)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_first_step_by_hand(name):
    b1, b2, eps, wd = 0.8, 0.9, 1e-6, 0.1
    got = one_step(OptimConfig(name=name, betas=[b1, b2], eps=eps, weight_decay=wd), [G1])
    g = G1 + wd * P0 if name == "adam" else G1  # Adam's L2 term enters the gradient
    p = P0 * (1 - 0.1 * wd) if name == "adamw" else P0  # AdamW decays the weights directly
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g**2 / (1 - b2)
    assert torch.allclose(got, p - 0.1 * m_hat / (v_hat.sqrt() + eps), atol=1e-12)


def test_adagrad_two_steps_by_hand():
    got = one_step(OptimConfig(name="adagrad", eps=1e-10), [G1, G2], steps=2)
    p1 = P0 - 0.1 * G1 / (G1.abs() + 1e-10)
    p2 = p1 - 0.1 * G2 / ((G1**2 + G2**2).sqrt() + 1e-10)
    assert torch.allclose(got, p2, atol=1e-12)


def test_rmsprop_with_momentum_by_hand():
    a, mu = 0.9, 0.5
    got = one_step(OptimConfig(name="rmsprop", alpha=a, momentum=mu, eps=1e-8), [G1, G2], steps=2)
    v1 = (1 - a) * G1**2
    buf1 = G1 / (v1.sqrt() + 1e-8)
    p1 = P0 - 0.1 * buf1
    v2 = a * v1 + (1 - a) * G2**2
    buf2 = mu * buf1 + G2 / (v2.sqrt() + 1e-8)
    assert torch.allclose(got, p1 - 0.1 * buf2, atol=1e-12)


def test_default_eps_is_each_optimizers_own():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert build_optimizer(OptimConfig(name="adagrad"), p, 0.1).defaults["eps"] == 1e-10
    assert build_optimizer(OptimConfig(name="adam"), p, 0.1).defaults["eps"] == 1e-8
