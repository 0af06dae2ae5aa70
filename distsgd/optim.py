"""Optimizers and learning-rate schedules.

The learning rate is a pure function of the optimizer step: ``Schedule(step)`` returns the rate
used by the update at that step (steps count from 0). The trainer writes it into the optimizer
before every update, so nothing but the step needs saving to resume a schedule. With growing
batches (data.batch_milestones) the step still decides everything: its epoch, the fraction of
that epoch done, and so the batch, through ``data.BatchSchedule``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch

from distsgd.config import ConfigError, OptimConfig, ScheduleConfig
from distsgd.data import BatchSchedule


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


def param_groups(cfg: OptimConfig, model: torch.nn.Module) -> list[dict]:
    """The optimizer's parameter groups: with optim.weight_decay_on=all one group; with matrices
    two, the >= 2-D parameters (Linear and conv weights, embeddings: GPT's token embedding is its
    head's matrix too) under optim.weight_decay, then the rest (biases, norms' gains) without it.
    Always two groups for matrices, one possibly empty, so that checkpoints have one layout."""
    params = list(model.parameters())
    if cfg.weight_decay_on == "all":
        return [{"params": params}]
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """How many tensors and parameters each group holds, and its weight decay (the start line)."""
    groups = [f"{len(g['params'])} tensors ({sum(p.numel() for p in g['params']):,} parameters) with weight "
              f"decay {g['weight_decay']:g}" for g in optimizer.param_groups]
    return f"parameter groups: {'; '.join(groups)}"


def build_optimizer(cfg: OptimConfig, params, lr: float, device: torch.device = torch.device("cpu")):
    """``params``: tensors, or groups of them (``param_groups``) whose own weight_decay wins."""
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
    """A decay times a linear warmup: ``lr(t) = min(1, u(t+1) / warmup) * decay(t)``.

    Time u counts in ``unit``: steps (u(t) = t), or epochs, where u(t) is the fractional epoch
    ``epoch + index / steps in that epoch`` before update t, so that a schedule in epochs is a
    schedule in samples seen, whatever the batch does (with a constant batch, u(t) = t / steps
    per epoch). ``step`` and ``multistep`` count their boundaries from u = 0, warmup included, as
    torch's StepLR/MultiStepLR and Goyal et al. (2017) do: milestones name absolute points of the
    run, so after the warmup the rate equals MultiStepLR's, and a boundary inside the warmup lowers
    the rate it ramps to (torch's ChainedScheduler of LinearLR and MultiStepLR). The continuous
    decays run over what the warmup leaves, their own time s = u - warmup from 0 to the run's end
    (torch's SequentialLR), so that each starts at the base rate when the warmup ends and
    polynomial and cosine still reach min_lr at the end of the run. ``base_lrs`` holds the base
    rate of each batch phase (optim.scaling at that phase's global batch): ``lr`` in the decays is
    the rate of the phase the step is in."""

    name: str
    base_lrs: tuple[float, ...]
    total_steps: int
    batches: BatchSchedule
    unit: str = "steps"
    warmup: int = 0
    step_size: int = 1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    decay_rate: float = 0.0
    power: float = 1.0
    min_lr: float = 0.0

    @property
    def base_lr(self) -> float:
        """The base rate at data.global_batch_size, the first phase's."""
        return self.base_lrs[0]

    def time(self, step: int) -> int | Fraction:
        """u(step): steps, or epochs (an exact fraction), done before update ``step``."""
        return self.batches.epochs_at(step) if self.unit == "epochs" else step

    def __call__(self, step: int) -> float:
        # u, s and length stay exact (ints, or fractions of epochs) until a formula needs a float,
        # so a boundary in epochs falls on the exact step that reaches it.
        u = self.time(step)
        ramp = float(min(self.time(step + 1) / self.warmup, 1)) if self.warmup else 1.0
        s = max(u - self.warmup, 0)
        length = self.time(self.total_steps) - self.warmup
        length = length if length > 0 else 1  # a warmup as long as the run: s stays 0
        lr, lo = self.base_lrs[self.batches.step_phase(step)], self.min_lr
        match self.name:
            case "constant":
                decayed = lr
            case "step":
                decayed = lr * self.gamma ** (u // self.step_size)
            case "multistep":
                decayed = lr * self.gamma ** sum(u >= m for m in self.milestones)
            case "exponential":
                decayed = lr * self.gamma ** float(s)
            case "inverse_time":
                decayed = lr / (1 + self.decay_rate * float(s))
            case "polynomial":
                decayed = lo + (lr - lo) * (1 - float(s / length)) ** self.power
            case "cosine":
                decayed = lo + (lr - lo) * (1 + math.cos(math.pi * s / length)) / 2
        return ramp * decayed

    def state_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def build_schedule(cfg: ScheduleConfig, base_lrs: Sequence[float], total_steps: int,
                   batches: BatchSchedule) -> Schedule:
    """``base_lrs``: the base rate of each phase of ``batches``."""
    schedule = Schedule(
        name=cfg.name, base_lrs=tuple(base_lrs), total_steps=total_steps, batches=batches, unit=cfg.unit,
        warmup=cfg.warmup_steps, step_size=cfg.step_size, milestones=tuple(cfg.milestones),
        gamma=cfg.gamma, decay_rate=cfg.decay_rate, power=cfg.power, min_lr=cfg.min_lr,
    )
    if cfg.warmup_steps > schedule.time(total_steps):
        length = "" if cfg.unit == "steps" else f" ({float(schedule.time(total_steps)):.4g} epochs)"
        raise ConfigError(f"schedule.warmup_steps={cfg.warmup_steps} ({cfg.unit}) is longer than the run's "
                          f"{total_steps} steps{length}")
    if cfg.name in ("polynomial", "cosine") and cfg.min_lr > min(base_lrs):
        raise ConfigError(f"schedule.min_lr={cfg.min_lr} must not exceed the learning rate {min(base_lrs):g}")
    return schedule


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
