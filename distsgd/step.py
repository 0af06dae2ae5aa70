"""The training step: forward and backward over the micro-batches, the gradient all-reduce (DDP or
the manual engine), unscaling, the gradient norm and clipping, the non-finite guard, the update.

Each rank's loss and stop request travel with the gradients (``WithStepStats``), so a step adds
no collective of its own, and its verdict (apply the update or skip it) is the same on every rank.
Where gradients stay on their rank (local SGD, comm.py), or where a communication hook rounds
their mean (fp16, bf16, PowerSGD), one small all-reduce in full precision carries them instead.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from distsgd import comm, distributed, optim
from distsgd.batchnorm import BufferBackup
from distsgd.config import DiagnosticsConfig, TrainerConfig
from distsgd.diagnostics import LayerStats, NoiseScale
from distsgd.distributed import Dist

# DDP's option to sync buffers only when it wraps, not before every forward (renamed in torch 2.13).
RANK_LOCAL_BUFFERS = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The forward passes' autocast context for ``trainer.precision`` (a no-op for 32)."""
    return torch.autocast(device.type, AUTOCAST_DTYPES[precision]) if precision in AUTOCAST_DTYPES else nullcontext()


class WithStepStats(torch.nn.Module):
    """The model plus ``stats``, a parameter whose gradient is [this rank's loss, 1 if this rank
    must stop, then any values ``carried`` along]. Averaged over the ranks with the model's
    gradients, by DDP or by ``average_gradients``, it gives every rank the global loss, whether
    any rank must stop, and the ranks' mean of each carried value, at the cost of a few floats in
    a bucket rather than a collective of its own every step. ``stats`` is always 0 and in no
    optimizer, so the model and its gradients are unchanged."""

    def __init__(self, model: torch.nn.Module, device: torch.device, carried: int = 0) -> None:
        super().__init__()
        self.model = model
        self.stats = torch.nn.Parameter(torch.zeros(2 + carried, device=device))
        self._stop = torch.tensor([0.0, 1.0], device=device)  # made once: a new tensor per step costs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def attach(self, loss: torch.Tensor, stop: bool, *carried: torch.Tensor) -> torch.Tensor:
        """A zero to add to the loss before backward, whose gradient writes ``stats.grad``."""
        return torch.dot(self.stats, torch.stack([loss.detach(), self._stop[int(stop)], *carried]))

    def read(self, *more: torch.Tensor, world_size: int = 1) -> list[float]:
        """The averaged [loss, stop, *carried] (then ``more``), in one read from the device; then
        clears ``stats.grad`` for the next step. ``world_size`` > 1: the gradients stayed on their
        rank (local SGD), so these are averaged over the ranks here, ``more`` too."""
        values = torch.cat([self.stats.grad, *(t.reshape(1) for t in more)])
        if world_size > 1:
            distributed.all_reduce_sum(values.div_(world_size))
        self.stats.grad = None
        return values.tolist()


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global batch's mean loss, before the update
    grad_norm: float  # of the averaged (and unscaled) gradient, before clipping; local SGD: the ranks' mean
    skipped: bool  # the guard refused the update: non-finite loss, or gradient in fp32/bf16
    stop_requested: bool  # some rank received a stop signal
    diagnostics: dict[str, float] = field(default_factory=dict)  # gns/*, layers/*, comm/* when observed


class TrainStep:
    """``step(x, y, lr, stop)`` trains the model on this rank's share of one global batch."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loss_fn, tc: TrainerConfig, dist: Dist, diagnostics: DiagnosticsConfig = DiagnosticsConfig(), *,
                 global_batch: int) -> None:
        """``global_batch``: the first global batch, the noise scale's unit of time."""
        self.optimizer, self.scaler, self.loss_fn, self.tc = optimizer, scaler, loss_fn, tc
        self.params = list(model.parameters())
        self.noise = (NoiseScale(diagnostics, global_batch, dist.world_size, tc.accumulate, dist.device)
                      if diagnostics.noise_scale else None)
        self.layers = LayerStats(model) if diagnostics.layers else None
        self.backup = BufferBackup(model)
        self.autocast = autocast(dist.device, tc.precision)
        # Compiled inside DDP, not around it: torch.compile(DDP(model)) starts tracing only at frames
        # outside torch.nn, so a model built of torch.nn containers (all of ours) would stay eager.
        # DDP's forward is active while the inner module compiles, so its graph is still split at
        # DDP's bucket boundaries (DDPOptimizer).
        net = torch.compile(model) if tc.compile else model
        self.comm = comm.build(tc, diagnostics, self.params, optimizer, scaler)
        self.ddp = None
        # A hook that rounds the mean (fp16, bf16, PowerSGD) must not round the loss and stop flag
        # too (a loss above 65504 became inf in fp16): outside DDP, they take their own all-reduce.
        self.stats_apart = tc.allreduce == "ddp" and not self.comm.exact_mean
        if self.stats_apart:
            net = self.ddp = self._wrap(net, dist)
        # Several ranks: the noise scale's measurement rides in the next step's stats all-reduce.
        self.carries = self.noise is not None and dist.world_size > 1
        self.net = self.stats = WithStepStats(net, dist.device, carried=int(self.carries))
        self.buckets = None
        if tc.allreduce == "ddp":
            if not self.stats_apart:
                self.net = self.ddp = self._wrap(self.net, dist)
            if self.noise is not None and dist.world_size > 1:
                # The rank's own gradient exists only until DDP averages it in place.
                self.noise.watch(self.params)
            self.comm.register(self.ddp)
        else:
            distributed.broadcast_parameters(self.net)
            self.buckets = distributed.make_buckets(list(self.net.parameters()), int(tc.bucket_mb * 2**20))
        self.world_size = dist.world_size

    def _wrap(self, module: torch.nn.Module, dist: Dist) -> DistributedDataParallel:
        # Gradients as views into DDP's all-reduce buckets: the averaged gradients are not copied
        # out of the buckets every step (the values are the same). Buffers stay each rank's own,
        # as with the manual engine: batchnorm.py's rule makes them agree before use.
        return DistributedDataParallel(module, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, **RANK_LOCAL_BUFFERS, **self.comm.ddp_options())

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, stop: bool, observe: bool = False) -> StepResult:
        """``observe``: measure what is logged only on logged steps (per-layer statistics)."""
        optim.set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        self.backup.save()
        self._backward(x, y, stop)
        if self.buckets is not None:
            if self.noise is not None:
                self.noise.rank_gradient(self._grads())
            distributed.average_gradients(self.buckets, self.world_size)
        scale = self.scaler.get_scale() if self.noise is not None and self.scaler.is_enabled() else 1.0
        self.scaler.unscale_(self.optimizer)
        grad_norm = get_total_norm(self._grads())
        if self.layers is not None and observe:
            self.layers.before_update()
        if self.tc.clip_grad_norm is not None:
            clip_grads_with_norm_(self.params, self.tc.clip_grad_norm, grad_norm)
        # Averaged with the gradients (or apart from them, where they stay local), these are the
        # same numbers on every rank, and so is the verdict.
        local = self.world_size if self.comm.gradients_local() or self.stats_apart else 1
        loss, stop_requested, *noise, norm = self.stats.read(*self._noise_read(), grad_norm, world_size=local)
        # With fp16 a non-finite gradient from a finite loss is the scaler's routine overflow.
        skipped = not (math.isfinite(loss) and (math.isfinite(norm) or self.scaler.is_enabled()))
        if skipped:
            self.backup.restore()
        else:
            self.scaler.step(self.optimizer)  # optimizer.step(), unless fp16 overflowed
        self.scaler.update()
        diagnostics = {}
        if self.layers is not None and observe:  # the optimizer's update, before local SGD averages
            diagnostics.update(self.layers.after_update())
        self.comm.after_step(skipped or not math.isfinite(norm))
        if self.noise is not None:  # len(x): the global batch can grow (data.batch_milestones)
            diagnostics.update(self.noise.finish_step(noise[0], norm**2, scale, len(x) * self.world_size, skipped,
                                                      observe))
        if observe:
            diagnostics.update(self.comm.observed())
        return StepResult(loss, norm, skipped, bool(stop_requested), diagnostics)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def _noise_read(self) -> tuple[torch.Tensor, ...]:
        # Several ranks: the previous step's mean arrives carried in stats (no tensor to add here).
        return (self.noise.local,) if self.noise is not None and not self.carries else ()

    def settle(self) -> None:
        """Fold in what is still being carried (a collective: on every rank, before a save)."""
        if self.noise is not None:
            self.noise.settle()

    def rank_state(self) -> dict | None:
        """What differs between the ranks (comm.py), for checkpoints; None where nothing does."""
        return self.comm.rank_state()

    def state_dict(self) -> dict:
        """What the instruments keep across steps, for checkpoints."""
        return {} if self.noise is None else {"noise_scale": self.noise.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.noise is not None and "noise_scale" in state:
            self.noise.load_state_dict(state["noise_scale"])

    def restore(self, progress: dict) -> None:
        """What a checkpoint kept of the step (resume.restore's ``progress``): the instruments'
        state and this rank's communication-hook state."""
        self.load_state_dict(progress.get("diagnostics", {}))
        self.comm.load_rank_state(progress.get("comm"), progress["step"])

    def _backward(self, x: torch.Tensor, y: torch.Tensor, stop: bool) -> None:
        accumulate = self.tc.accumulate
        if self.noise is not None:
            self.noise.start_step()
        for i in range(accumulate):
            # Every accumulate-th sample, as the ranks deal them: micro-batch i of one process holds
            # what rank i of `accumulate` processes would, so even BatchNorm statistics agree.
            xm, ym = x[i::accumulate], y[i::accumulate]
            # DDP all-reduces only with the last micro-batch; the others accumulate locally.
            sync = i == accumulate - 1 or self.buckets is not None
            if self.noise is not None:
                self.noise.start_micro_batch(last=i == accumulate - 1)
            with (nullcontext() if sync else self.ddp.no_sync()), self.autocast:
                micro_loss = self.loss_fn(self.net(xm), ym) / accumulate
            carried = self.noise.carried(first=i == 0) if self.carries else ()
            (self.scaler.scale(micro_loss) + self.stats.attach(micro_loss, stop, *carried)).backward()
            if self.noise is not None:
                self.noise.micro_batch(self._grads())
