"""Step time of distsgd against a minimal hand-written DDP loop doing the same job.

    torchrun --standalone --nproc_per_node=2 scripts/bench.py        # 2 CPU processes (gloo)
    python scripts/bench.py                                         # 1 process
    python scripts/bench.py --device cuda                           # 1 GPU (nccl)
    torchrun --standalone --nproc_per_node=2 scripts/bench.py --steps 300 --rounds 10 optim=momentum

Options: ``--job`` (a key of JOBS, default mlp), ``--steps N`` (per run), ``--rounds R``,
``--device`` (auto|cpu|cuda); anything else is a Hydra override, applied after the job's own.

Same job. Both contenders get the config composed from conf/ (the job's overrides, then the
command line's), one dataset loaded once and shared, the same model (``models.build`` under
``trainer.seed``), global batch split per rank, optimizer (``optim.build_optimizer``), and batches
taken by index from the same DistributedSampler order (``data.train_order``), under
DistributedDataParallel. The minimal loop is ``minimal_loop`` below: zero_grad, forward, loss,
backward, step, nothing else. Before timing, rank 0 checks that both end with the same
parameters, i.e. that they really do the same computation.

Method. A round runs distsgd's ``train()`` for N steps and the minimal loop for N steps, the
order flipping every round (after one untimed warm-up run of each). Both models get the same
forward pre-hook (installed by wrapping ``models.build``), which records when each training
forward pass starts; the time between the starts of steps k and k + W, W = ``trainer.log_every``
= 10 (the default), divided by W, is one sample of the step time. Each such window holds exactly
one of distsgd's logging steps, so everything a step costs a user is in it (progress bar, logging,
any per-step collective or host sync), while per-run costs (building the model and DDP, the
TensorBoard writer, validation before the first and after the last step, the final checkpoint)
are outside every window. The first window of a run (DDP's first iteration) is dropped.
Validation inside the run is off (``trainer.val_every`` beyond N). The step time of a contender
is the median over all its windows: on a shared machine, other processes' bursts land in a
minority of windows and do not move it. Each round also gives the ratio of the two contenders'
medians from runs a second or two apart; the median of those ratios is the figure that holds best
when the machine's load changes during the benchmark (it is printed next to the ratio of the
overall medians; under a steady load the two agree).

Timing is on the host. On CUDA the minimal loop runs ahead of the GPU, but once the launch queue
is full a window can be no shorter than the GPU work it queues, so both contenders are measured
at the GPU's pace; use more --steps there. distsgd's progress bar is drawn into /dev/null (still
formatted) to keep the table readable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's distsgd, installed or not

from distsgd import data, distributed, models, optim  # noqa: E402
from distsgd.config import Config, ConfigError, to_config  # noqa: E402
from distsgd.train import train  # noqa: E402

# Job name -> Hydra overrides. mlp: the default config's MLP (synthetic classification, SGD at a
# constant rate), made big enough for a step of ~10-20 ms on a 2-core CPU with 2 gloo processes:
# 0.66M parameters, 128 samples of 256 features per rank and step, 51 steps per epoch.
# resnet20: ResNet-20 on random data of CIFAR-10's shape (3x32x32, 10 classes), written to a
# temporary npz ({cifar_shaped}) so both contenders read the same tensors; a step is ~0.3 s on
# this CPU, so run it with --steps 30 --rounds 4.
JOBS: dict[str, list[str]] = {
    "mlp": ["data.dim=256", "data.num_samples=16384", "data.global_batch_size=256",
            "model.width=512", "model.depth=3"],
    "resnet20": ["data=npz", "data.path={cifar_shaped}", "data.val_fraction=0", "data.global_batch_size=128",
                 "model=resnet", "model.depth=20", "optim=momentum"],
}
CIFAR_SHAPED_SAMPLES = 4096
WINDOW = 10  # steps per timing window, = trainer.log_every
BENCH = [f"trainer.log_every={WINDOW}", "trainer.val_every=1000000000"]


def minimal_loop(config: Config, dataset: data.Dataset, dist: distributed.Dist, steps: int) -> torch.nn.Module:
    """The baseline: the same job as a textbook DDP loop, without logging or anything else."""
    torch.manual_seed(config.trainer.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task).to(dist.device)
    net = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    global_batch = config.data.global_batch_size
    lr = optim.scaled_lr(config.optim, global_batch)  # constant: the bench's schedule
    optimizer = optim.build_optimizer(config.optim, model.parameters(), lr, dist.device)
    loss_fn = models.loss_fn(dataset.task)
    batch = global_batch // dist.world_size
    steps_per_epoch = len(dataset.x_train) // global_batch
    for step in range(steps):
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0:
            order = data.train_order(len(dataset.x_train), dist.rank, dist.world_size,
                                     config.trainer.seed, epoch, dist.device)
        idx = order[k * batch:(k + 1) * batch]
        loss = loss_fn(net(dataset.x_train[idx]), dataset.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


def run_distsgd(config: Config, dataset: data.Dataset, dist: distributed.Dist, steps: int, run_dir: Path) -> None:
    config = replace(config, trainer=replace(config.trainer, max_steps=steps, max_epochs=None))
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the progress bar
        train(config, dataset, dist, run_dir)


class StepClock:
    """Records when each training forward pass starts, on every model that models.build returns."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def __enter__(self) -> "StepClock":
        self._build = models.build

        def build(*args, **kwargs):
            model = self._build(*args, **kwargs)
            model.register_forward_pre_hook(self._tick)
            return model

        models.build = build  # distsgd.train calls models.build too
        return self

    def _tick(self, module: torch.nn.Module, args) -> None:
        if module.training:  # not validation
            self.starts.append(time.perf_counter())

    def __exit__(self, *exc) -> None:
        models.build = self._build

    def step_times(self, fn) -> list[float]:
        """Seconds per step of each whole window of ``fn()``'s steps but the first."""
        self.starts = []
        fn()
        s = self.starts
        return [(s[k + WINDOW] - s[k]) / WINDOW for k in range(WINDOW, len(s) - WINDOW, WINDOW)]


def compose_config(job: str, device: str | None, overrides: list[str], tmp: Path) -> Config:
    extra = [f"trainer.device={device}"] if device else []
    job_overrides = JOBS[job]
    if any("{cifar_shaped}" in o for o in job_overrides):
        path = tmp / "cifar_shaped.npz"
        gen = torch.Generator().manual_seed(0)  # every rank writes the same set to its own folder
        np.savez(path, x=torch.rand(CIFAR_SHAPED_SAMPLES, 3, 32, 32, generator=gen).numpy(),
                 y=torch.randint(0, 10, (CIFAR_SHAPED_SAMPLES,), generator=gen).numpy())
        job_overrides = [o.format(cifar_shaped=path) for o in job_overrides]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=job_overrides + BENCH + extra + overrides))


def compare(model: torch.nn.Module, run_dir: Path) -> str:
    """The minimal loop's final parameters against distsgd's last.pt."""
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    diff = max(((p.detach().cpu().double() - saved[name].double()).norm()
                / saved[name].double().norm().clamp_min(1e-12)).item()
               for name, p in model.state_dict().items())  # float64: BatchNorm counts are integers
    return "identical" if diff == 0 else f"max relative difference {diff:.3g}"


def bench(config: Config, dataset: data.Dataset, dist: distributed.Dist, args: argparse.Namespace) -> None:
    out = print if dist.is_main else (lambda *a, **k: None)
    out(f"job {args.job}: {' '.join(JOBS[args.job] + BENCH + args.overrides)}")
    out(f"{dist.world_size} process(es) on {dist.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) each; global batch {config.data.global_batch_size}; "
        f"{args.rounds} rounds of {args.steps} steps each")
    with tempfile.TemporaryDirectory(prefix="distsgd-bench-") as tmp, StepClock() as clock:
        run_dirs = (Path(tmp) / f"run{i}" for i in range(10**9))
        contenders = {
            "distsgd": lambda: run_distsgd(config, dataset, dist, args.steps, next(run_dirs)),
            "minimal": lambda: minimal_loop(config, dataset, dist, args.steps),
        }
        # Warm-up, and the check that both compute the same thing.
        check_dir = next(run_dirs)
        run_distsgd(config, dataset, dist, args.steps, check_dir)
        model = minimal_loop(config, dataset, dist, args.steps)
        if dist.is_main:
            out(f"final parameters after {args.steps} steps, minimal vs distsgd: {compare(model, check_dir)}")

        times: dict[str, list[float]] = {name: [] for name in contenders}  # all windows, in seconds/step
        ratios: list[float] = []
        out(f"\n{'round':>6}  {'distsgd ms/step':>15}  {'minimal ms/step':>15}  {'ratio':>6}")
        for r in range(args.rounds):
            this_round = {}
            for name in (contenders if r % 2 == 0 else reversed(contenders)):
                torch.distributed.barrier()
                this_round[name] = clock.step_times(contenders[name])
                times[name] += this_round[name]
            d, m = (1e3 * statistics.median(this_round[name]) for name in contenders)
            ratios.append(d / m)
            out(f"{r:>6}  {d:>15.3f}  {m:>15.3f}  {d / m:>6.3f}")

    d, m = (1e3 * statistics.median(times[name]) for name in contenders)
    out(f"{'all':>6}  {d:>15.3f}  {m:>15.3f}  {d / m:>6.3f}   (medians of {len(times['distsgd'])} windows each)")
    per_s = lambda ms: config.data.global_batch_size / (ms / 1e3)  # noqa: E731
    out(f"\nsamples/s (global): distsgd {per_s(d):,.0f}, minimal {per_s(m):,.0f}")
    out(f"distsgd/minimal: {statistics.median(ratios):.3f} median of the rounds' ratios, "
        f"{d / m:.3f} ratio of the overall medians (target <= 1.03)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="mlp")
    parser.add_argument("--steps", type=int, default=100, help="steps per run (at least 3 windows of 10)")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="trainer.device (default: the config's)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. optim=momentum")
    args = parser.parse_args()
    if args.steps < 3 * WINDOW:
        parser.error(f"--steps must be at least {3 * WINDOW}")

    with tempfile.TemporaryDirectory(prefix="distsgd-bench-data-") as tmp:
        try:
            config = compose_config(args.job, args.device, args.overrides, Path(tmp))
            dataset = data.load(config.data)
            dist = distributed.init(config.trainer.device)
        except ConfigError as err:
            sys.exit(f"bench: error: {err}")
    try:
        bench(config, dataset.place(dist.device, config.data.in_memory, config.data.num_workers), dist, args)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
