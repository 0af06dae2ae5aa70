"""Validation: the mean loss (and accuracy) of the model over the whole validation set, sharded
over the ranks, each sample counted once, the same numbers at any world size."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch

from distsgd import batchnorm, distributed
from distsgd.data import Dataset

EVAL_CHUNK = 4096  # validation samples per forward pass; only memory depends on it
EVAL_CHUNK_OUTPUTS = 2**27  # at most this many output values per forward pass (512 MiB in float32)


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
    may be empty (fewer samples than ranks): every rank still joins the sum. A language model's
    loss is in nats per token, its accuracy that of the next token, over every token."""
    model.eval()
    # float64 sums so that the result does not depend on how the set is split across ranks.
    totals = torch.zeros(4, dtype=torch.float64, device=idx.device)  # loss sum, correct, samples, targets
    for chunk in idx.split(chunk_size(dataset)):
        if not len(chunk):
            continue
        x, y = dataset.val_batch(chunk, idx.device)
        with autocast:
            out = model(x)
            totals[0] += loss_fn(out, y, reduction="none").reshape(len(chunk), -1).mean(1).sum(dtype=torch.float64)
        if dataset.task != "regression":
            totals[1] += (out.argmax(-1) == y).sum()
        totals[2:] += torch.tensor([len(chunk), y.numel()], dtype=torch.float64, device=idx.device)
    model.train()
    loss_sum, correct, count, targets = distributed.all_reduce_sum(totals).tolist()
    metrics = {"val/loss": loss_sum / count}
    if dataset.task != "regression":
        metrics["val/accuracy"] = correct / targets
    if dataset.task == "language_model":
        metrics.update(information(metrics["val/loss"], dataset.bytes_per_token))
    return metrics


def chunk_size(dataset: Dataset) -> int:
    """Validation samples per forward pass: EVAL_CHUNK, fewer where a sample has many outputs (a
    language model's block_size x vocabulary logits), so that a chunk's outputs stay within
    EVAL_CHUNK_OUTPUTS values."""
    outputs = dataset.num_outputs * (dataset.input_shape[0] if dataset.task == "language_model" else 1)
    return max(1, min(EVAL_CHUNK, EVAL_CHUNK_OUTPUTS // outputs))


def information(loss: float, bytes_per_token: float | None) -> dict[str, float]:
    """A language model's loss (nats per token) in bits: per byte of text where the data knows
    its bytes per token (1 for byte-level text), else per token."""
    bits = loss / math.log(2)
    return {"val/bits_per_byte": bits / bytes_per_token} if bytes_per_token else {"val/bits_per_token": bits}
