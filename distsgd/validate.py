"""Validation: the mean loss (and accuracy) of the model over the whole validation set, sharded
over the ranks, each sample counted once, the same numbers at any world size."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from distsgd import batchnorm, distributed
from distsgd.data import Dataset

EVAL_CHUNK = 4096  # validation samples per forward pass; only memory depends on it


class RunningStats:
    """Plain BatchNorm's running statistics, made the same on every rank (their average, see
    batchnorm.py) before the model is validated or saved; once per step, since averaging equal
    values again could still round differently. ``averaged``: a context in which the parameters
    are the ranks' average where they differ (local SGD, comm.py), the model that validation and
    checkpoints describe."""

    def __init__(self, model: torch.nn.Module, world_size: int, synced_at: int | None = None,
                 averaged=nullcontext) -> None:
        self.buffers, self.world_size, self.synced_at = batchnorm.local_running_stats(model), world_size, synced_at
        self.averaged = averaged

    def sync(self, step: int) -> None:
        if step != self.synced_at:
            batchnorm.average_over_ranks(self.buffers, self.world_size)
            self.synced_at = step

    @contextmanager
    def synced(self, step: int):
        """The model as validated and saved at ``step``, inside (every rank enters)."""
        self.sync(step)
        with self.averaged():
            yield


@torch.no_grad()
def validate(model: torch.nn.Module, dataset: Dataset, idx: torch.Tensor, loss_fn, autocast) -> dict[str, float]:
    """Mean loss (and accuracy) over the whole validation set; ``idx`` is this rank's shard, which
    may be empty (fewer samples than ranks): every rank still joins the sum."""
    model.eval()
    # float64 sums so that the result does not depend on how the set is split across ranks.
    totals = torch.zeros(3, dtype=torch.float64, device=idx.device)  # loss sum, correct, count
    for chunk in idx.split(EVAL_CHUNK):
        if not len(chunk):
            continue
        x, y = dataset.val_batch(chunk, idx.device)
        with autocast:
            out = model(x)
            totals[0] += loss_fn(out, y, reduction="none").reshape(len(chunk), -1).mean(1).sum(dtype=torch.float64)
        if dataset.task == "classification":
            totals[1] += (out.argmax(1) == y).sum()
        totals[2] += len(chunk)
    model.train()
    loss_sum, correct, count = distributed.all_reduce_sum(totals).tolist()
    metrics = {"val/loss": loss_sum / count}
    if dataset.task == "classification":
        metrics["val/accuracy"] = correct / count
    return metrics
