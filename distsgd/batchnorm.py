"""BatchNorm across processes: global batch statistics for training (``model.sync_bn``), and
one rule for the running statistics of plain BatchNorm, which each rank otherwise keeps apart.

The rule: before every validation and every save, the ranks replace their running statistics by
their average. Every rank then holds the same model, so the sharded validation measures exactly
the model that ``last.pt`` holds, and both engines (DDP is told not to broadcast rank 0's buffers
every step) give the same numbers. The average rather than rank 0's own: it draws on every rank's
data, and since the mean over ranks of the local batch means is the global batch mean, the
averaged running mean is exactly the one global (synchronized) BatchNorm would have kept; the
averaged running variance misses only the spread of the ranks' batch means around it.
"""

from __future__ import annotations

import torch
from torch import nn


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers whose training statistics span the global batch: torch's SyncBatchNorm on
    CUDA, GlobalBatchNorm elsewhere (SyncBatchNorm refuses CPU tensors). State dict keys stay."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        converted = GlobalBatchNorm(model.num_features, model.eps, model.momentum, model.affine,
                                    model.track_running_stats)
        converted.load_state_dict(model.state_dict())
        return converted
    for name, child in model.named_children():
        setattr(model, name, convert_sync_bn(child, device))
    return model


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalization over the samples of all ranks, for any backend (gloo included).

    Two differentiable all-reduces (sum, then squared deviations) give the exact global mean and
    biased variance; their backward all-reduces the gradients, so the update equals plain
    BatchNorm's on the whole global batch, whatever the number of processes. Statistics, their
    sums and the normalization run in float32 under autocast too (bf16 sums of many samples lose
    most of their digits, and the running statistics are float32 buffers); the output takes the
    input's dtype, as torch's BatchNorm does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.float()
            count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
            torch.distributed.all_reduce(count)
            mean = _SumOverRanks.apply(x32.sum(dims)) / count
            centered = x32 - mean.reshape(shape)
            var = _SumOverRanks.apply((centered * centered).sum(dims)) / count
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked += 1
                    factor = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                    self.running_mean.lerp_(mean, factor)
                    self.running_var.lerp_(var * count / (count - 1).clamp_min(1), factor)
            out = centered * torch.rsqrt(var + self.eps).reshape(shape)
            if self.affine:
                out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(x.dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")


class _SumOverRanks(torch.autograd.Function):
    """Sum of a tensor over all ranks; every rank uses the sum, so the gradient is summed too."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def local_running_stats(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics that each rank keeps on its own: those of plain BatchNorm layers
    (global BatchNorm's are the same on every rank already)."""
    return [buffer for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (GlobalBatchNorm, nn.SyncBatchNorm))
            for buffer in (m.running_mean, m.running_var) if buffer is not None]


def average_over_ranks(tensors: list[torch.Tensor], world_size: int) -> None:
    """Replace each tensor by its mean over the ranks, in place (one flat all-reduce)."""
    if world_size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for t, mean in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(mean.view_as(t))


class BufferBackup:
    """The model's buffers as they were before a step, to put back when its update is skipped:
    the forward pass has already folded the batch (NaN statistics included) into BatchNorm's
    running statistics by then."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [b for b in model.buffers() if b is not None]
        self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        # Every step: torch has no public batched copy, and copy_ tensor by tensor took 80 us
        # against 25 us for 60 small buffers (ResNet-20's) on one CPU thread, 0.5% of such a step.
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)
