"""Instruments that observe the training step: the gradient noise scale and per-layer statistics.

Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A.1). From the squared norm of the gradient of a small batch of b samples and of a big
batch of B samples, both means of the loss,

    |G|^2    ~ (B |G_B|^2 - b |G_b|^2) / (B - b)        tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

are unbiased; B_simple = tr(Sigma) / |G|^2 predicts the critical batch size. The big batch is the
global batch (its gradient is the averaged one, before clipping); the small batch is each rank's
share before averaging (the mean over ranks of its squared norm), or on one process each
micro-batch of ``trainer.accumulate``. Both estimates are smoothed by bias-corrected EMAs whose
weights count samples, then divided (a ratio of noisy estimates would be biased).
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import get_total_norm

from distsgd.config import ConfigError, DiagnosticsConfig


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The squared L2 norm of all ``tensors`` together, in float32 or wider."""
    if not tensors:
        return torch.zeros(())
    return get_total_norm([t.float() for t in tensors]).square()


class NoiseScale:
    """Measures |G_small|^2 and |G_big|^2 every step and keeps the EMAs (in checkpoints).

    On several ranks, the mean of the ranks' small-batch measurements would cost a collective of
    its own every step. Instead each rank carries its measurement into the next step's stats all-
    reduce (step.WithStepStats), so a step is folded in one step late; logged steps and saves
    settle what is being carried with one scalar all-reduce, so what is logged or saved always
    includes the step it belongs to."""

    def __init__(self, cfg: DiagnosticsConfig, global_batch: int, world_size: int, accumulate: int,
                 device: torch.device) -> None:
        if world_size == 1 and accumulate == 1:
            raise ConfigError("diagnostics.noise_scale needs a small and a big batch: run on 2 or more processes, "
                              "or set trainer.accumulate >= 2 on one (now 1 process, trainer.accumulate=1)")
        self.world_size, self.accumulate = world_size, accumulate
        # Per rank when there are several (micro-batches are summed inside the rank); else per micro-batch.
        self.pieces = world_size if world_size > 1 else accumulate
        self.ema_samples = cfg.noise_ema_samples or 20 * global_batch
        self.local = torch.zeros((), device=device)  # this step's sum of small-batch squared norms
        self.carry = torch.zeros((), device=device)  # the previous step's, on its way to the other ranks
        self.nothing = torch.zeros((), device=device)
        self.pending: tuple | None = None  # (big_sq, grad_scale, big) of the step being carried
        self.ema = {"grad_sq": 0.0, "trace_cov": 0.0, "weight": 0.0}
        self.last = {"small_sq": math.nan, "big_sq": math.nan}
        self.measuring = False  # in the backward of a step's last micro-batch (DDP: see watch)

    # -- measuring: micro_batch() after every micro-batch on one process; on several, the rank's
    #    gradient before it is averaged, by rank_gradient() (manual engine) or watch() (DDP).

    def start_step(self) -> None:
        self.local.zero_()
        self.previous = None

    def micro_batch(self, grads: list[torch.Tensor]) -> None:
        """On one process: the micro-batch's own gradient is what it added to the accumulated one."""
        if self.world_size > 1:
            return
        if self.previous is None:
            self.local += squared_norm(grads)
            self.previous = [g.detach().clone() for g in grads]
        else:
            self.local += squared_norm([g - before for g, before in zip(grads, self.previous)])
            for before, g in zip(self.previous, grads):
                before.copy_(g)

    def rank_gradient(self, grads: list[torch.Tensor]) -> None:
        """Several processes: this rank's gradient, before it is averaged with the others'."""
        if self.world_size > 1:
            self.local += squared_norm(grads)

    def watch(self, params: list[torch.nn.Parameter]) -> None:
        """Under DDP: measure each of ``params`` as its gradient is complete on this rank, in the
        backward of the micro-batch that ``start_micro_batch`` called the last. A hook after a
        parameter's gradient accumulation runs before DDP marks it ready for the all-reduce, which
        then averages it in place; measuring there keeps DDP's own C++ all-reduce (a Python
        communication hook cost several times more on a small step)."""
        for param in params:
            param.register_post_accumulate_grad_hook(self._measure)

    def start_micro_batch(self, last: bool) -> None:
        self.measuring = last

    def _measure(self, param: torch.nn.Parameter) -> None:
        if self.measuring:
            grad = param.grad.reshape(-1)  # a view, but for channels-last tensors
            self.local.add_(torch.dot(grad, grad))

    def carried(self, first: bool) -> tuple[torch.Tensor]:
        """What this rank adds to the stats all-reduce: the previous step's sum, once per step."""
        return (self.carry if first else self.nothing,)

    # -- estimating, on the host

    def finish_step(self, small: float, big_sq: float, grad_scale: float, big: int, skipped: bool,
                    observe: bool) -> dict[str, float]:
        """``small``: on several ranks, the ranks' mean of the previous step's carried sum; on one,
        this step's sum. ``big`` samples made this step's global batch. Returns, when ``observe``,
        the values to log, this step included; a skipped step is left out."""
        step = None if skipped else (big_sq, grad_scale, big)
        if self.world_size == 1:
            if step is not None:
                self._fold(small, *step)
        else:
            if self.pending is not None:
                self._fold(small, *self.pending)
            self.pending = step
            self.carry.copy_(self.local if step is not None else self.nothing)
            if observe:
                self.settle()
        return self.values() if observe else {}

    def settle(self) -> None:
        """Fold in the step being carried now, with one scalar all-reduce (every rank calls it)."""
        if self.world_size == 1:
            return
        total = self.carry.clone()
        torch.distributed.all_reduce(total)
        if self.pending is not None:
            self._fold(total.item() / self.world_size, *self.pending)
        self.pending = None
        self.carry.zero_()

    def _fold(self, small: float, big_sq: float, grad_scale: float, big: int) -> None:
        # Micro-batch gradients were measured as their share (1/accumulate) of the step's gradient.
        per_piece = self.accumulate**2 if self.world_size == 1 else 1
        small_sq = small / (self.pieces if self.world_size == 1 else 1) * per_piece / grad_scale**2
        self.last = {"small_sq": small_sq, "big_sq": big_sq}
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return
        b = big // self.pieces
        decay = math.exp(-big / self.ema_samples)
        for key, value in (("grad_sq", (big * big_sq - b * small_sq) / (big - b)),
                           ("trace_cov", (small_sq - big_sq) / (1 / b - 1 / big)), ("weight", 1.0)):
            self.ema[key] = decay * self.ema[key] + (1 - decay) * value

    def values(self) -> dict[str, float]:
        grad_sq, trace = (self.ema[k] / self.ema["weight"] if self.ema["weight"] else math.nan
                          for k in ("grad_sq", "trace_cov"))
        return {"gns/small_sq": self.last["small_sq"], "gns/big_sq": self.last["big_sq"], "gns/grad_sq": grad_sq,
                "gns/trace_cov": trace, "gns/b_simple": trace / grad_sq if grad_sq else math.nan}

    def state_dict(self) -> dict:
        """The EMAs; call ``settle`` first, so that nothing is being carried."""
        return dict(self.ema)

    def load_state_dict(self, state: dict) -> None:
        self.ema = dict(state)


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each of ``tensors``. Only logged steps take them, so a loop over the
    tensors does (torch has no public batched per-tensor norm)."""
    return torch.stack([torch.linalg.vector_norm(t) for t in tensors])


class LayerStats:
    """Per parameter tensor, on the steps that are logged: the norm of its averaged gradient
    (before clipping), of its weight before the update, and |delta w| / |w| of the update applied
    (0 for a skipped one)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names, self.params = zip(*model.named_parameters())

    def before_update(self) -> None:
        self.grad_norms = norms([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        self.weights = [p.detach().clone() for p in self.params]

    def after_update(self) -> dict[str, float]:
        weight_norms = norms(self.weights)
        update_norms = norms([p.detach() - before for p, before in zip(self.params, self.weights)])
        ratios = update_norms / weight_norms.clamp_min(torch.finfo(weight_norms.dtype).tiny)
        values = torch.stack([self.grad_norms.float(), weight_norms.float(), ratios.float()]).tolist()
        del self.weights
        return {f"layers/{name}/{what}": row[i] for what, row in zip(("grad_norm", "weight_norm", "update_ratio"), values)
                for i, name in enumerate(self.names)}
