"""Shared test helpers: compose the real config under conf/ and launch real processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.experimental.callback import Callback

from distsgd import data, metrics
from distsgd.distributed import Dist

REPO = Path(__file__).resolve().parents[1]

# In-process runs train tiny models on 2 shared cores, where OpenMP threads only wait on each
# other (about 10x slower); torchrun gives its workers OMP_NUM_THREADS=1 likewise.
torch.set_num_threads(1)
CONF = REPO / "conf"


def make_config(*overrides: str):
    """The DictConfig that `python -m distsgd.train OVERRIDES` would train with."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def launch(run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the trainer as a user would: torchrun for nproc > 1, plain python otherwise."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    cmd += ["-m", "distsgd.train", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def launch_sweep(sweep_dir: Path, *overrides: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """A multirun as a user runs one under torchrun: one start-up for all the jobs, each job's
    processes a process group of their own; job n in sweep_dir/n (n in the order of the values)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "distsgd.train", "-m", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_command(main, argv: list[str], monkeypatch) -> int | None:
    """``main()`` (a console script's) with ``argv`` in this process; its exit code, None when it
    returned. Hydra configures logging for each job: the root logger is given back as it was."""
    monkeypatch.setattr(sys, "argv", argv)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        main()
        return None
    except SystemExit as exit_:
        return exit_.code
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


class JobReturns(Callback):
    """A Hydra callback (``+hydra.callbacks.returns._target_=conftest.JobReturns``) that keeps each
    job's return value, as the sweeper got it, in ``JobReturns.values``."""

    values: list = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        JobReturns.values.append(job_return.return_value)


def torchrun_report(output: str) -> tuple[str, str]:
    """(what the workers printed, torchrun's failure report) of a failed torchrun job's output."""
    workers, marker, report = output.partition("ChildFailedError")
    assert marker, output[-3000:]
    return workers, report


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_params_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-12)
        assert diff < rtol, f"{name}: relative difference {diff:.3g} >= {rtol}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What torchrun sets for its workers: a test must not inherit it from the shell that started pytest.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def subprocess_env(*also_drop: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's, without torchrun's variables."""
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS + also_drop}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of a run as [(step, value)], the shape most tests compare against
    (distsgd.metrics.read_scalars, the loader the report uses, keeps the wall times too)."""
    return {tag: [(e.step, e.value) for e in events]
            for tag, events in metrics.read_scalars(run_dir / "tensorboard").items()}


def on_two_gloo_ranks(work, root: Path, *args) -> list:
    """``work(dist, root, *args)`` in 2 spawned processes, the ranks of one gloo group over a file
    store in ``root`` (CPU, one thread each, stderr in root/rank<N>.stderr): faster to start than
    torchrun. Returns what each rank's ``work`` returned (through root/results<N>.json)."""
    torch.multiprocessing.spawn(gloo_rank, args=(work, root, args), nprocs=2)
    return [json.loads((root / f"results{rank}.json").read_text()) for rank in range(2)]


def gloo_rank(rank: int, work, root: Path, args: tuple) -> None:
    """One process of ``on_two_gloo_ranks``."""
    torch.set_num_threads(1)  # OpenMP threads only wait on each other on 2 shared cores
    with open(root / f"rank{rank}.stderr", "w") as stderr, contextlib.redirect_stderr(stderr):
        torch.distributed.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank,
                                             world_size=2, timeout=timedelta(seconds=60))
        try:
            result = work(Dist(rank, 2, rank, torch.device("cpu")), root, *args)
            # Neither rank tears its gloo group down while the other may still be in the last
            # collective (gloo aborted one of them at exit: "terminate called without an active exception").
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
    (root / f"results{rank}.json").write_text(json.dumps(result))
    # Everything under test is done and written. Interpreter shutdown of a spawned child holding
    # gloo's and DDP's threads aborted now and then, which is no part of what any test checks.
    os._exit(0)


def token_windows(num_windows: int = 64, block_size: int = 16, vocab_size: int = 32, val_windows: int = 16,
                  seed: int = 0) -> data.Dataset:
    """A tiny language-model dataset standing in for data=text and data=markov: one token stream,
    mostly a fixed function of the token before (so a model can learn it), cut into consecutive
    windows of block_size + 1 tokens, the last val_windows for validation."""
    gen = torch.Generator().manual_seed(seed)
    stream = torch.empty(num_windows * block_size + 1, dtype=torch.long)
    stream[0] = 0
    noise = torch.randint(vocab_size, stream.shape, generator=gen)
    keep = torch.rand(stream.shape, generator=gen) < 0.8
    for i in range(1, len(stream)):
        stream[i] = (5 * stream[i - 1] + 3) % vocab_size if keep[i] else noise[i]
    x, y = stream[:-1].view(num_windows, block_size), stream[1:].view(num_windows, block_size)
    train = slice(0, num_windows - val_windows)
    val = slice(num_windows - val_windows, num_windows)
    return data.Dataset(x[train], y[train], x[val], y[val], "language_model", vocab_size)


def train_alone(config, dataset: data.Dataset, run_dir: Path) -> dict[str, float]:
    """train.train on ``dataset`` in this process, as train.run would on a config's data."""
    from distsgd import distributed, train

    dist = distributed.init(config.trainer.device)
    try:
        return train.train(config, dataset.place(dist.device, True, 0), dist, run_dir)
    finally:
        distributed.shutdown()
