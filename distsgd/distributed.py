"""Processes: the process group from the launcher's environment (torchrun's, or srun's in a SLURM
job), the device of each rank, the collectives the trainer uses, and gradient averaging for the
manual all-reduce engine.

A run outside any launcher still gets a (one-process) process group, so the trainer has a single
code path whatever the world size.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
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


# What torchrun sets for its workers (and what a user may set by hand instead): when any is
# present, it describes the process group, even inside a SLURM job.
TORCHRUN_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# srun's tasks meet at a port of the first node that the job id decides, so that every task finds
# the same one without talking first, and two jobs sharing a node rarely collide.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


@dataclass(frozen=True)
class Launch:
    """Who this process is, as its launcher says: torchrun (or RANK and friends set by hand), srun
    (a task of a SLURM job step), or nobody (rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None  # where rank 0 hosts the store the ranks meet at; None: not set
    master_port: int | None
    srun: bool = False  # the ranks come from SLURM's variables; torchrun's store is not there


def launch_environment(environ: Mapping[str, str] = os.environ) -> Launch:
    """The process group that the environment describes: torchrun's variables when present, else
    srun's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the address from MASTER_ADDR and MASTER_PORT
    when set, else the first node of the step and a port derived from the job id), else one process."""
    if not ranks_from_slurm(environ):
        port = environ.get("MASTER_PORT")
        return Launch(launch_rank(environ), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)),
                      environ.get("MASTER_ADDR"), int(port) if port else None)
    rank, world_size, local_rank = (int(environ[var]) for var in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    if world_size == 1:
        return Launch(rank, world_size, local_rank, None, None, srun=True)
    port = environ.get("MASTER_PORT") or slurm_port(environ["SLURM_JOB_ID"], environ["SLURM_STEP_ID"])
    return Launch(rank, world_size, local_rank, environ.get("MASTER_ADDR") or _first_node(environ), int(port),
                  srun=True)


def slurm_port(job_id: str, step_id: str) -> int:
    """Where the tasks of SLURM job step ``step_id`` meet without MASTER_PORT: the same port on every
    task, another one for each step that runs at the same time in one job (srun ... & srun ...),
    and for jobs sharing a node unless their ids differ by a multiple of the span. The step counts
    1009 ports apart (prime to the span): two steps of a job meet at one port only 20000 steps apart."""
    step = int(step_id) if step_id.isdigit() else 0
    return SLURM_PORT_BASE + (int(job_id) + 1009 * step) % SLURM_PORT_SPAN


def ranks_from_slurm(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether srun's variables describe the process group: a task of a SLURM job step that
    torchrun did not start."""
    # Only srun sets SLURM_STEP_ID: the batch script itself also has SLURM_PROCID=0 and the job's
    # SLURM_NTASKS, but it is one process, and a run started there must not wait for the others.
    return (all(var in environ for var in ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
            and not any(var in environ for var in TORCHRUN_RANK_VARS))


def launch_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank before any process group exists: who writes and who prints."""
    return int(environ["SLURM_PROCID"] if ranks_from_slurm(environ) else environ.get("RANK", 0))


def _first_node(environ: Mapping[str, str]) -> str:
    # srun starts task 0 on the first node of its step, which may be a part of the job's nodes.
    var = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in environ else "SLURM_JOB_NODELIST"
    try:
        return expand_nodelist(environ[var])[0]
    except (KeyError, ValueError) as err:
        raise ConfigError(f"cannot find the first node of this SLURM job ({var}: {err}); "
                          "set MASTER_ADDR to the host of rank 0") from None


# One host of the list: text and [ranges], up to a comma outside brackets.
_HOST = re.compile(r"(?:[^,\[\]]|\[[^\[\]]*\])+")


def expand_nodelist(nodelist: str) -> list[str]:
    """The hosts of SLURM's compressed host list, in order, as `scontrol show hostnames` prints
    them: ``node[01-03,07]`` -> node01 node02 node03 node07; ``a1,b[2-3]`` -> a1 b2 b3 (padding kept)."""
    items = _HOST.findall(nodelist)
    if not items or ",".join(items) != nodelist:
        raise ValueError(f"cannot read the host list {nodelist!r}")
    hosts = []
    for item in items:
        names = [""]
        # Odd parts are what stood in brackets: rack[1-2]-gpu[01-02] -> rack, 1-2, -gpu, 01-02, "".
        for i, part in enumerate(re.split(r"\[([^\]]*)\]", item)):
            choices = _expand_ranges(part, nodelist) if i % 2 else [part]
            names = [name + choice for name in names for choice in choices]
        hosts += names
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or not (high or low).isdigit() or int(high or low) < int(low):
            raise ValueError(f"bad range {part!r} in {nodelist!r}")
        # SLURM pads to the width of the range's first number: [08-10] is 08 09 10.
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1)]
    return numbers


def init(requested_device: str, timeout_s: float = 1800.0) -> Dist:
    """Join the process group that the launcher describes in the environment (or a one-process one)."""
    launch = launch_environment()
    rank, world_size = launch.rank, launch.world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    missing = [var for var, value in (("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port))
               if value is None]
    if world_size > 1 and missing:
        # Without a rendezvous each process would train alone on its 1/W share of every batch.
        raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: launch with torchrun, "
                          "or set MASTER_ADDR and MASTER_PORT so that the processes can meet")
    unset = [var for var in ("RANK", "WORLD_SIZE") if var not in os.environ]
    if not launch.srun and launch.master_addr is not None and unset:
        # What a SLURM batch script that exported MASTER_ADDR for its srun steps gets, run by itself.
        raise ConfigError(f"MASTER_ADDR is set but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not: "
                          "a launcher sets them for each process (torchrun; srun in a SLURM job step); to train "
                          "as one process here, unset MASTER_ADDR and MASTER_PORT")
    device = resolve_device(requested_device, launch.local_rank)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if launch.master_addr is not None:
        dist.init_process_group(backend, store=_group_store(launch, timeout), rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank=rank, world_size=world_size, local_rank=launch.local_rank, device=device)


# The store of the launcher's environment, connected once and kept for every process group that this
# process joins; and how many it has joined.
_store: dist.Store | None = None
_groups_joined = itertools.count()


def _group_store(launch: Launch, timeout: timedelta) -> dist.Store:
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
    if _store is None and launch.srun:
        _store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                               is_master=launch.rank == 0, timeout=timeout)
    elif _store is None:
        _store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    _store.set_timeout(timeout)
    prefix = f"default_pg/group_{next(_groups_joined)}"
    if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
        prefix += f"/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(prefix, _store)


def shutdown() -> None:
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            # A DDP module sits in reference cycles, so it outlives the run until a garbage
            # collection, and with it its reducer, which holds the process group and its last work.
            # Freed at interpreter exit, after the group is gone, gloo's threads aborted now and then
            # ("terminate called without an active exception": SIGABRT after a successful run). A
            # full collection takes 0.1-0.3 s: not worth it with no other rank.
            gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(value):
    """Rank 0's value on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def check_same_config(values: dict[str, object]) -> None:
    """Raise the same ConfigError on every rank, naming the keys, where the flat ``values`` (the
    resolved config, the run directory) differ between the ranks: such ranks would train different
    models in one process group and average their gradients. A hash is compared first, so that a
    run whose ranks agree pays for one small collective."""
    if dist.get_world_size() == 1:
        return
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, values)
    keys = sorted({key for ranks_values in every for key in ranks_values})
    differing = []
    for key in keys:
        ranks_by_value: dict[str, list[int]] = {}
        for rank, ranks_values in enumerate(every):
            ranks_by_value.setdefault(repr(ranks_values.get(key)), []).append(rank)
        if len(ranks_by_value) > 1:
            differing.append(f"{key} (" + ", ".join(f"{value} on rank {_ranks(ranks)}"
                                                   for value, ranks in ranks_by_value.items()) + ")")
    raise ConfigError(f"the ranks were given different configs: {'; '.join(differing)}. Every rank must train the "
                      "same config: a sampling sweeper needs the same seed on every rank (hydra.sweeper.sampler.seed), "
                      "and ${now:} or ${oc.env:...} must resolve alike on every rank")


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks[:4])) + (f",... ({len(ranks)} ranks)" if len(ranks) > 4 else "")


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
        # Every step: torch has no public batched copy (see batchnorm.BufferBackup.save).
        torch._foreach_copy_(grads, [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in bucket]), bucket)])


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's parameters and buffers (DDP does this when it wraps)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)
