"""Processes: the process group from torchrun's environment, the device of each rank, the
collectives the trainer uses, and gradient averaging for the manual all-reduce engine.

A run outside torchrun still gets a (one-process) process group, so the trainer has a single
code path whatever the world size.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distsgd.config import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        # Global rank decides who writes: local rank 0 exists once per node.
        return self.rank == 0


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available (use trainer.device=cpu or auto)")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "launch at most that many processes per node (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def init(requested_device: str, timeout_s: float = 1800.0) -> Dist:
    """Join the process group that torchrun describes in the environment (or a one-process one)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    missing = [var for var in ("MASTER_ADDR", "MASTER_PORT") if var not in os.environ]
    if world_size > 1 and missing:
        # Without a rendezvous each process would train alone on its 1/W share of every batch.
        raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: launch with torchrun, "
                          "or set MASTER_ADDR and MASTER_PORT so that the processes can meet")
    device = resolve_device(requested_device, local_rank)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, store=_group_store(timeout), rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# The store of torchrun's environment, connected once and kept for every process group that this
# process joins; and how many it has joined.
_store: dist.Store | None = None
_groups_joined = itertools.count()


def _group_store(timeout: timedelta) -> dist.Store:
    """A key space of this process group's own, in the one store this process keeps.

    A process group names its keys alike every time, so a group that meets an earlier group's keys
    reads a peer's dead address and hangs connecting to it. Each job of a Hydra sweep joins a group
    of its own in the same processes, and torchrun's restarted workers share the agent's store
    with their dead predecessors (pytorch/pytorch#135712). So the keys carry the group's number in
    this process (a sweep runs its jobs in the same order on every rank) and, on one node, the
    attempt: across nodes the restart counts differ, which only TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (a store per attempt) avoids. The store is kept because where rank 0 hosts it (that setting,
    or a launcher other than torchrun), a store per group would let a faster rank join the next
    group in the last one's store before rank 0 closes it.
    """
    global _store
    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    _store.set_timeout(timeout)
    prefix = f"default_pg/group_{next(_groups_joined)}"
    if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
        prefix += f"/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(prefix, _store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(value):
    """Rank 0's value on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def decided_by_rank0(decide):
    """``decide()`` run on rank 0 only; every rank returns its value, or raises its ConfigError, so
    that no rank can act on another answer or fail alone."""
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = (decide(), None)
        except ConfigError as err:
            outcome = (None, str(err))
    value, error = broadcast_object(outcome)
    if error is not None:
        raise ConfigError(error)
    return value


def make_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Group parameters (same dtype, in order) into buckets of about ``bucket_bytes``."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def average_gradients(buckets: list[list[torch.nn.Parameter]], world_size: int) -> None:
    """Replace every gradient by its mean over the ranks: one flat all-reduce per bucket.

    Gradients are divided before the sum, as DDP does, so that both engines round alike.
    All buckets are in flight at once; a parameter without a gradient contributes zeros.
    """
    flats, works = [], []
    for bucket in buckets:
        for p in bucket:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket]).div_(world_size)
        flats.append(flat)
        works.append(dist.all_reduce(flat, async_op=True))
    for bucket, flat, work in zip(buckets, flats, works):
        work.wait()
        grads = [p.grad for p in bucket]
        torch._foreach_copy_(grads, [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in bucket]), bucket)])


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's parameters and buffers (DDP does this when it wraps)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)
