"""Optimizers and learning-rate schedules.

The learning rate is a pure function of the optimizer step: ``Schedule(step)`` returns the rate
used by the update at that step (steps count from 0). The trainer writes it into the optimizer
before every update, so nothing but the step needs saving to resume a schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from distsgd.config import ConfigError, OptimConfig, ScheduleConfig


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """optim.lr, given at optim.reference_batch_size, rescaled to the actual global batch."""
    ratio = global_batch_size / (cfg.reference_batch_size or global_batch_size)
    match cfg.scaling:
        case "none":
            return cfg.lr
        case "linear":
            return cfg.lr * ratio
        case "sqrt":
            return cfg.lr * math.sqrt(ratio)


def build_optimizer(cfg: OptimConfig, params, lr: float, device: torch.device = torch.device("cpu")):
    extra = {} if cfg.eps is None else {"eps": cfg.eps}
    if device.type == "cuda":
        # One kernel for all parameters instead of a few per tensor; CPU keeps torch's default.
        extra["fused" if cfg.name in ("sgd", "adam", "adamw") else "foreach"] = True
    match cfg.name:
        case "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, dampening=cfg.dampening,
                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                   **{k: v for k, v in extra.items() if k != "eps"})
        case "adam":
            return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **extra)
        case "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **extra)
        case "adagrad":
            return torch.optim.Adagrad(params, lr=lr, weight_decay=cfg.weight_decay, **extra)
        case "rmsprop":
            return torch.optim.RMSprop(params, lr=lr, alpha=cfg.alpha, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay, **extra)


@dataclass(frozen=True)
class Schedule:
    """A decay times a linear warmup: ``lr(t) = min(1, (t+1) / warmup) * decay(t)``.

    ``step`` and ``multistep`` count their boundaries from step 0, warmup included, as torch's
    StepLR/MultiStepLR and Goyal et al. (2017) do: milestones name absolute points of the run, so
    after the warmup the rate equals MultiStepLR's, and a boundary inside the warmup lowers the
    rate it ramps to (torch's ChainedScheduler of LinearLR and MultiStepLR). The continuous decays
    run over what the warmup leaves, their own step s = t - warmup from 0 to ``total_steps -
    warmup`` (torch's SequentialLR), so that each starts at the base rate when the warmup ends and
    polynomial and cosine still reach min_lr at the end of the run. All lengths are in optimizer
    steps; ``unit`` is the number of steps in one unit of time (1, or the steps per epoch) for
    the per-unit rates."""

    name: str
    base_lr: float
    total_steps: int
    warmup: int = 0
    unit: int = 1
    step_size: int = 1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    decay_rate: float = 0.0
    power: float = 1.0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        ramp = min((step + 1) / self.warmup, 1.0) if self.warmup else 1.0
        s = max(step - self.warmup, 0)
        length = max(self.total_steps - self.warmup, 1)
        lr, lo = self.base_lr, self.min_lr
        match self.name:
            case "constant":
                decayed = lr
            case "step":
                decayed = lr * self.gamma ** (step // self.step_size)
            case "multistep":
                decayed = lr * self.gamma ** sum(step >= m for m in self.milestones)
            case "exponential":
                decayed = lr * self.gamma ** (s / self.unit)
            case "inverse_time":
                decayed = lr / (1 + self.decay_rate * s / self.unit)
            case "polynomial":
                decayed = lo + (lr - lo) * (1 - s / length) ** self.power
            case "cosine":
                decayed = lo + (lr - lo) * (1 + math.cos(math.pi * s / length)) / 2
        return ramp * decayed

    def state_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def build_schedule(cfg: ScheduleConfig, base_lr: float, total_steps: int, steps_per_epoch: int) -> Schedule:
    unit = steps_per_epoch if cfg.unit == "epochs" else 1
    warmup = cfg.warmup_steps * unit
    if warmup > total_steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.warmup_steps} ({cfg.unit}) is longer than the run's "
                          f"{total_steps} steps")
    if cfg.name in ("polynomial", "cosine") and cfg.min_lr > base_lr:
        raise ConfigError(f"schedule.min_lr={cfg.min_lr} must not exceed the learning rate {base_lr}")
    return Schedule(
        name=cfg.name, base_lr=base_lr, total_steps=total_steps, warmup=warmup, unit=unit,
        step_size=cfg.step_size * unit, milestones=tuple(m * unit for m in cfg.milestones),
        gamma=cfg.gamma, decay_rate=cfg.decay_rate, power=cfg.power, min_lr=cfg.min_lr,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
