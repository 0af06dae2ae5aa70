"""Learning-rate schedules against their closed forms; one step of each optimizer by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR, StepLR

from distsgd import data
from distsgd.config import ConfigError, OptimConfig, ScheduleConfig, to_config
from distsgd.optim import build_optimizer, build_schedule, describe_groups, param_groups, scaled_lr, set_lr

LR, TOTAL, SPE = 0.5, 100, 10  # base rate, run length in steps, steps per epoch
EPOCHS = data.BatchSchedule(num_train=SPE * 8, global_batch=8)  # a constant batch, SPE steps per epoch


def closed_form(name: str, t: int, warmup: int, total: int, unit: int) -> float:
    """The rate at step t, written independently of distsgd.optim: the warmup's ramp times the
    decay; step and multistep count from step 0, the continuous decays from the warmup's end."""
    s, length = max(t - warmup, 0), total - warmup
    decay = {
        "constant": LR,
        "step": LR * 0.5 ** math.floor(t / (3 * unit)),
        "multistep": LR * 0.5 ** ((t >= 2 * unit) + (t >= 5 * unit)),
        "exponential": LR * 0.9 ** (s / unit),
        "inverse_time": LR / (1 + 0.3 * s / unit),
        "polynomial": 0.01 + (LR - 0.01) * (1 - s / length) ** 2,
        "cosine": 0.01 + (LR - 0.01) * 0.5 * (1 + math.cos(math.pi * s / length)),
    }[name]
    return decay * (t + 1) / warmup if t < warmup else decay


SCHEDULE_ARGS = dict(step_size=3, milestones=[2, 5], gamma=0.5, decay_rate=0.3, power=2.0, min_lr=0.01)


@pytest.mark.parametrize("unit", ["steps", "epochs"])
@pytest.mark.parametrize("warmup", [0, 4])
@pytest.mark.parametrize("name", ["constant", "step", "multistep", "exponential", "inverse_time", "polynomial", "cosine"])
def test_schedule_equals_closed_form(name, warmup, unit):
    args = dict(SCHEDULE_ARGS, gamma=0.9) if name == "exponential" else SCHEDULE_ARGS
    scale = SPE if unit == "epochs" else 1
    schedule = build_schedule(ScheduleConfig(name=name, unit=unit, warmup_steps=warmup, **args), [LR], TOTAL, EPOCHS)
    w = warmup * scale
    # With warmup=4 steps, the step boundary 3 and the milestone 2 fall inside the warmup.
    for t in [0, 1, 2, 3, w, w + 1, w + 7, w + 23, TOTAL // 2, TOTAL - 1]:
        assert schedule(t) == pytest.approx(closed_form(name, t, w, TOTAL, scale), rel=1e-12), f"step {t}"


def torch_rates(make_scheduler, base_lr: float, steps: int) -> list[float]:
    """The rate each of ``steps`` updates uses under a torch.optim.lr_scheduler stepped once per update."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


# torch multiplies by gamma at each boundary where distsgd raises gamma to a power: the same rate
# to within a few units in the last place, while a boundary one step off differs by 10x.
@pytest.mark.parametrize("unit", ["steps", "epochs"])
@pytest.mark.parametrize("name", ["step", "multistep"])
def test_boundaries_count_from_step_0_as_torchs_steplr_and_multisteplr(name, unit):
    scale, warmup, milestones, step_size = (SPE, 2, [3, 6, 8], 3) if unit == "epochs" else (1, 7, [5, 20, 60], 9)
    cfg = ScheduleConfig(name=name, unit=unit, warmup_steps=warmup, milestones=milestones, step_size=step_size)
    schedule = build_schedule(cfg, [LR], TOTAL, EPOCHS)
    w = warmup * scale
    decay = (lambda o: MultiStepLR(o, [m * scale for m in milestones], gamma=0.1)) if name == "multistep" else (
        lambda o: StepLR(o, step_size * scale, gamma=0.1))
    ours = [schedule(t) for t in range(TOTAL)]
    assert ours[w:] == pytest.approx(torch_rates(decay, LR, TOTAL)[w:], rel=1e-12)
    # The warmup included: torch's LinearLR from 1/W over W-1 steps, chained with the same decay.
    chained = torch_rates(lambda o: ChainedScheduler([LinearLR(o, 1 / w, 1.0, w - 1), decay(o)]), LR, TOTAL)
    assert ours == pytest.approx(chained, rel=1e-12)
    if unit == "steps":  # the milestone 5 and the step boundary at 0 lie inside the 7 warmup steps
        assert ours[w] == pytest.approx(LR * 0.1 ** (1 if name == "multistep" else 0))


def test_goyal_experiment_decays_at_epochs_10_and_15_after_2_warmup_epochs():
    config = to_config(make_config("experiment=large_batch_linear_scaling"))
    train = len(data.load(config.data).x_train)
    spe = data.steps_per_epoch(train, config.data.global_batch_size)
    lr = scaled_lr(config.optim, config.data.global_batch_size)
    schedule = build_schedule(config.schedule, [lr], config.trainer.max_epochs * spe,
                              data.BatchSchedule(train, config.data.global_batch_size))
    assert (spe, lr) == (25, pytest.approx(0.4))  # 80% of 32768 samples / 1024; 0.1 x 1024/256
    assert schedule(0) == pytest.approx(lr / (2 * spe))
    assert [schedule(2 * spe - 1), schedule(2 * spe)] == pytest.approx([lr, lr])
    assert [schedule(10 * spe - 1), schedule(10 * spe)] == pytest.approx([lr, 0.1 * lr])
    assert [schedule(15 * spe - 1), schedule(15 * spe)] == pytest.approx([0.1 * lr, 0.01 * lr])
    assert schedule(20 * spe - 1) == pytest.approx(0.01 * lr)


def test_warmup_ramps_linearly_to_the_base_rate():
    schedule = build_schedule(ScheduleConfig(name="cosine", warmup_steps=10), [LR], TOTAL, EPOCHS)
    assert [schedule(t) for t in range(10)] == pytest.approx([LR * (t + 1) / 10 for t in range(10)])
    assert schedule(10) == pytest.approx(LR)  # the decay's own t=0
    assert schedule(TOTAL - 1) < 0.01 * LR


def test_warmup_longer_than_the_run_is_an_error():
    with pytest.raises(ConfigError, match="schedule.warmup_steps=20 .* longer than the run's 100 steps"):
        build_schedule(ScheduleConfig(name="constant", warmup_steps=20, unit="epochs"), [LR], TOTAL, EPOCHS)


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


def _decayed_by_one_step(weight_decay_on: str) -> tuple[dict[str, str], torch.optim.Optimizer]:
    """What one AdamW step with zero gradients did to each parameter: Adam's update is then 0, so
    only the decay, p -> (1 - lr * weight_decay) p, moves the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    torch.nn.init.normal_(model[2].weight), torch.nn.init.normal_(model[2].bias), torch.nn.init.normal_(model[1].bias)
    cfg = OptimConfig(name="adamw", weight_decay=0.1, weight_decay_on=weight_decay_on)
    opt = build_optimizer(cfg, param_groups(cfg, model), lr=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {name: "unchanged" if torch.equal(p, before[name]) else
            "decayed" if torch.allclose(p, (1 - 0.5 * 0.1) * before[name], rtol=1e-6, atol=0) else "moved"
            for name, p in model.named_parameters()}, opt


def test_weight_decay_on_matrices_leaves_biases_and_norms_alone():
    effect, opt = _decayed_by_one_step("matrices")
    assert effect == {"0.weight": "decayed", "1.weight": "decayed", "1.bias": "unchanged", "2.weight": "unchanged",
                       "2.bias": "unchanged"}
    assert describe_groups(opt) == ("parameter groups: 2 tensors (32 parameters) with weight decay 0.1; "
                                    "3 tensors (9 parameters) with weight decay 0")
    set_lr(opt, 0.25)  # the schedule's rate reaches every group
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    # The two groups round-trip through a checkpoint's state_dict into a freshly built optimizer.
    state = opt.state_dict()
    assert [len(g["params"]) for g in state["param_groups"]] == [2, 3]
    _, fresh = _decayed_by_one_step("matrices")
    fresh.load_state_dict(state)
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.1, 0.0]


def test_weight_decay_on_all_is_one_group():
    effect, opt = _decayed_by_one_step("all")
    assert set(effect.values()) == {"decayed"}, effect
    assert describe_groups(opt) == "parameter groups: 5 tensors (41 parameters) with weight decay 0.1"


def test_gpt_defaults_to_decay_on_matrices_the_others_to_all():
    assert to_config(make_config("model=gpt")).optim.weight_decay_on == "matrices"
    assert to_config(make_config("model=gpt", "optim=adamw")).optim.weight_decay_on == "matrices"
    assert to_config(make_config("model=mlp", "optim=adamw")).optim.weight_decay_on == "all"
    assert to_config(make_config("model=gpt", "optim.weight_decay_on=all")).optim.weight_decay_on == "all"
    with pytest.raises(ConfigError, match="optim.weight_decay_on must be one of all|matrices"):
        OptimConfig(weight_decay_on="none")
