"""Step time of distsgd against a minimal hand-written DDP loop doing the same job.

    torchrun --standalone --nproc_per_node=2 scripts/bench.py        # 2 CPU processes (gloo)
    python scripts/bench.py                                         # 1 process
    python scripts/bench.py --device cuda                           # 1 GPU (nccl)
    torchrun --standalone --nproc_per_node=2 scripts/bench.py --steps 300 --rounds 10 optim=momentum
    torchrun --standalone --nproc_per_node=2 scripts/bench.py --baseline off diagnostics.noise_scale=true
    torchrun --standalone --nproc_per_node=2 scripts/bench.py --baseline off trainer.comm_hook=powersgd

Options: ``--job`` (a key of JOBS, default mlp), ``--steps N`` (per run), ``--rounds R``,
``--device`` (auto|cpu|cuda), ``--baseline minimal|off``; anything else is a Hydra override,
applied after the job's own. ``--baseline off`` times distsgd against itself with the
``diagnostics.*`` keys at their defaults (off) and ``trainer.comm_hook=none`` instead of the
minimal loop: the cost of an instrument, or what a communication hook saves (or costs), with the
bytes each rank all-reduces per step (comm.bytes_per_step).

Same job. Both contenders get the config composed from conf/ (the job's overrides, then the
command line's), one dataset loaded once and shared, the same model (``models.build`` under
``trainer.seed``), global batch split per rank, optimizer (``optim.build_optimizer``), and batches
taken by index from the same DistributedSampler order (``data.train_order``), under
DistributedDataParallel. The minimal loop is ``minimal_loop`` below: zero_grad, forward, loss,
backward, step, nothing else. Before timing, rank 0 checks that both end with the same
parameters, i.e. that they really do the same computation.

Method. The two contenders take turns on the machine: distsgd runs in the main thread, the
minimal loop in a second one, and a baton passed between them lets only one run at a time, W =
``trainer.log_every`` = 10 (the default) steps per turn. Both models get the same forward
pre-hook (installed by wrapping ``models.build``), which marks when each training forward pass
starts and passes the baton every W steps. A turn's time, from the start of its first step to the
start of the step after its last, divided by W, is one sample of the step time. Each turn holds
exactly one of distsgd's logging steps, so everything a step costs a user is in it (progress bar,
logging, any per-step collective or host sync), while per-run costs (building the model and DDP,
the TensorBoard writer, validation before the first and after the last step, the final
checkpoint) fall between turns. The first turn of each run (DDP's first iteration) is dropped.
Validation inside the run is off (``trainer.val_every`` beyond N). Every turn of distsgd is paired
with the minimal loop's turn next to it, at most a turn apart in time, so the ratio of a pair
compares the two under the same load; the figure reported is the median of those ratios. A round
runs N steps of each, and which contender goes first flips every round (after one untimed
warm-up run of each). The same collectives happen in the same order on every rank, as turns
change at the same steps everywhere.

Timing is on the host. On CUDA the turn changes after a device synchronize, so a turn neither
inherits the other's queued work nor leaves its own to it; both are measured at the GPU's pace.
distsgd's progress bar is drawn into /dev/null (still formatted) to keep the table readable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's distsgd, installed or not

from distsgd import comm, data, distributed, models, optim  # noqa: E402
from distsgd.config import (COMM_HOOK_KEYS, Config, ConfigError, DiagnosticsConfig, TrainerConfig,  # noqa: E402
                            to_config)
from distsgd.train import train  # noqa: E402

# Job name -> Hydra overrides. mlp: the default config's MLP (synthetic classification, SGD at a
# constant rate), made big enough for a step of ~10-20 ms on a 2-core CPU with 2 gloo processes:
# 0.66M parameters, 128 samples of 256 features per rank and step, 51 steps per epoch.
# resnet20: ResNet-20 on random data of CIFAR-10's shape (3x32x32, 10 classes), written to a
# temporary npz ({cifar_shaped}) so both contenders read the same tensors; a step is ~0.3 s on
# this CPU, so run it with --steps 30 --rounds 4. gpt: experiment=gpt_char's model (4 layers, 128
# wide, 0.8M parameters) and batch (32 windows of 128 bytes) on data=text's embedded corpus, AdamW
# with decay on the matrices; a step is ~0.2 s here on 2 processes: --steps 30 --rounds 6.
JOBS: dict[str, list[str]] = {
    "mlp": ["data.dim=256", "data.num_samples=16384", "data.global_batch_size=256",
            "model.width=512", "model.depth=3"],
    "resnet20": ["data=npz", "data.path={cifar_shaped}", "data.val_fraction=0", "data.global_batch_size=128",
                 "model=resnet", "model.depth=20", "optim=momentum"],
    "gpt": ["data=text", "data.block_size=128", "data.global_batch_size=32", "model=gpt", "model.n_layer=4",
            "model.n_head=4", "model.n_embd=128", "optim=adamw", "optim.weight_decay=0.1"],
}
CIFAR_SHAPED_SAMPLES = 4096
WINDOW = 10  # steps per turn, = trainer.log_every
TARGETS = {"minimal": 1.03, "off": 1.02}  # issue 2's overhead target; issue 9's for an instrument
BENCH = [f"trainer.log_every={WINDOW}", "trainer.val_every=1000000000"]


def minimal_loop(config: Config, dataset: data.Dataset, dist: distributed.Dist, steps: int) -> torch.nn.Module:
    """The baseline: the same job as a textbook DDP loop, without logging or anything else."""
    torch.manual_seed(config.trainer.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task).to(dist.device)
    net = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    global_batch = config.data.global_batch_size
    lr = optim.scaled_lr(config.optim, global_batch)  # constant: the bench's schedule
    optimizer = optim.build_optimizer(config.optim, optim.param_groups(config.optim, model), lr, dist.device)
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


class Turns:
    """Lets two contenders, each in its own thread, run WINDOW steps in turn, and times each turn.

    ``models.build`` is wrapped so that every model it returns (distsgd's train() calls it too)
    reports the start of each training forward pass to ``_tick``, from the thread of its contender.
    """

    def __init__(self, names: tuple[str, str], device: torch.device) -> None:
        self.names, self.device = names, device  # names[0] runs in the main thread
        self.baton = threading.Condition()
        self.contender: dict[int, str] = {}  # thread id -> name, while a round runs

    def __enter__(self) -> "Turns":
        self._build = models.build

        def build(*args, **kwargs):
            model = self._build(*args, **kwargs)
            model.register_forward_pre_hook(self._tick)
            return model

        models.build = build
        return self

    def __exit__(self, *exc) -> None:
        models.build = self._build

    def run(self, first: str, fns: dict[str, callable]) -> dict[str, list[float]]:
        """Run both ``fns`` to the end, ``first`` starting; the step time of each turn but the first."""
        self.holder, self.finished = first, set()
        self.turns: dict[str, list[float]] = {name: [] for name in self.names}  # seconds per step
        self.steps = dict.fromkeys(self.names, 0)
        self.started: dict[str, float | None] = dict.fromkeys(self.names)
        errors: list[BaseException] = []
        main, other = self.names
        thread = threading.Thread(target=self._contend, args=(other, fns[other], errors))
        thread.start()
        self._contend(main, fns[main], errors)  # distsgd in the main thread: it installs a signal handler
        thread.join()
        if errors:
            raise errors[0]
        return {name: turns[1:] for name, turns in self.turns.items()}

    def _contend(self, name: str, fn, errors: list[BaseException]) -> None:
        self.contender[threading.get_ident()] = name
        with self.baton:
            self.baton.wait_for(lambda: self.holder == name)
        try:
            fn()
        except BaseException as err:
            errors.append(err)
        finally:
            del self.contender[threading.get_ident()]
            with self.baton:
                self.finished.add(name)
                self.holder = self._other(name)
                self.baton.notify_all()

    def _other(self, name: str) -> str:
        return self.names[1 - self.names.index(name)]

    def _tick(self, module: torch.nn.Module, args) -> None:
        name = self.contender.get(threading.get_ident())
        if name is None or not module.training:  # outside a round, or validation
            return
        self.steps[name] += 1
        if (self.steps[name] - 1) % WINDOW:
            return
        self._synchronize()
        if self.started[name] is not None:
            self.turns[name].append((time.perf_counter() - self.started[name]) / WINDOW)
        with self.baton:
            if self._other(name) not in self.finished:
                self.holder = self._other(name)
                self.baton.notify_all()
                self.baton.wait_for(lambda: self.holder == name)
        self._synchronize()
        self.started[name] = time.perf_counter()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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


def saved_model(config: Config, dataset: data.Dataset, run_dir: Path) -> torch.nn.Module:
    """A distsgd run's final model, as a module ``compare`` can read."""
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"])
    return model


def compare(model: torch.nn.Module, run_dir: Path) -> str:
    """The minimal loop's final parameters against distsgd's last.pt."""
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    diff = max(((p.detach().cpu().double() - saved[name].double()).norm()
                / saved[name].double().norm().clamp_min(1e-12)).item()
               for name, p in model.state_dict().items())  # float64: BatchNorm counts are integers
    return "identical" if diff == 0 else f"max relative difference {diff:.3g}"


def switched_off(config: Config) -> Config:
    """The config without instruments and with DDP's plain all-reduce: ``--baseline off``."""
    defaults = TrainerConfig()
    plain = {key: getattr(defaults, key) for key in ("comm_hook", *sum(COMM_HOOK_KEYS.values(), ()))}
    return replace(config, diagnostics=DiagnosticsConfig(), trainer=replace(config.trainer, **plain))


def bench(config: Config, dataset: data.Dataset, dist: distributed.Dist, args: argparse.Namespace) -> None:
    out = print if dist.is_main else (lambda *a, **k: None)
    contenders_names = ("distsgd", args.baseline)
    out(f"job {args.job}: {' '.join(JOBS[args.job] + BENCH + args.overrides)}")
    out(f"{dist.world_size} process(es) on {dist.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) each; global batch {config.data.global_batch_size}; "
        f"{args.rounds} rounds of {args.steps} steps each")
    off = switched_off(config)
    params = list(models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task).parameters())
    sent = {name: comm.bytes_per_step(c.trainer, params) for name, c in (("distsgd", config), ("none", off))}
    out(f"all-reduced per step and rank (after any warm-up): distsgd {sent['distsgd']:,.0f} bytes, "
        f"none {sent['none']:,.0f} bytes")
    with tempfile.TemporaryDirectory(prefix="distsgd-bench-") as tmp, Turns(contenders_names, dist.device) as turns:
        run_dirs = (Path(tmp) / f"run{i}" for i in range(10**9))
        baseline = (lambda: minimal_loop(config, dataset, dist, args.steps)) if args.baseline == "minimal" else (
            lambda: run_distsgd(off, dataset, dist, args.steps, next(run_dirs)))
        contenders = {"distsgd": lambda: run_distsgd(config, dataset, dist, args.steps, next(run_dirs)),
                      args.baseline: baseline}
        # Warm-up, and the check that both compute the same thing.
        check_dir = next(run_dirs)
        run_distsgd(config, dataset, dist, args.steps, check_dir)
        if args.baseline == "minimal":
            model = minimal_loop(config, dataset, dist, args.steps)
        else:
            baseline_dir = next(run_dirs)
            run_distsgd(off, dataset, dist, args.steps, baseline_dir)
            model = saved_model(config, dataset, baseline_dir) if dist.is_main else None  # rank 0 wrote it
        if dist.is_main:
            out(f"final parameters after {args.steps} steps, {args.baseline} vs distsgd: {compare(model, check_dir)}")

        times: dict[str, list[float]] = {name: [] for name in contenders_names}  # all turns, in seconds/step
        ratios: list[list[float]] = []  # per round: distsgd/baseline of adjacent turns
        out(f"\n{'round':>6}  {'distsgd ms/step':>15}  {args.baseline + ' ms/step':>15}  {'ratio':>6}")
        for r in range(args.rounds):
            torch.distributed.barrier()
            this_round = turns.run(contenders_names[r % 2], contenders)
            for name in contenders_names:
                times[name] += this_round[name]
            pairs = [d / m for d, m in zip(this_round["distsgd"], this_round[args.baseline])]
            ratios.append(pairs)
            d, m = (1e3 * statistics.median(this_round[name]) for name in contenders_names)
            out(f"{r:>6}  {d:>15.3f}  {m:>15.3f}  {statistics.median(pairs):>6.3f}")

    d, m = (1e3 * statistics.median(times[name]) for name in contenders_names)
    pairs = [ratio for round_ratios in ratios for ratio in round_ratios]
    out(f"{'all':>6}  {d:>15.3f}  {m:>15.3f}  {statistics.median(pairs):>6.3f}   "
        f"(medians of {len(times['distsgd'])} turns each)")
    per_s = lambda ms: config.data.global_batch_size / (ms / 1e3)  # noqa: E731
    out(f"\nsamples/s (global): distsgd {per_s(d):,.0f}, {args.baseline} {per_s(m):,.0f}")
    if dataset.task == "language_model":
        tokens = dataset.input_shape[0]
        out(f"tokens/s (global): distsgd {tokens * per_s(d):,.0f}, {args.baseline} {tokens * per_s(m):,.0f}")
    q1, _, q3 = statistics.quantiles(pairs, n=4)
    low, high = median_interval(ratios)
    out(f"distsgd/{args.baseline}: {statistics.median(pairs):.3f} median of {len(pairs)} paired turns' ratios "
        f"(95% interval {low:.3f}-{high:.3f}; quartiles {q1:.3f}-{q3:.3f}), "
        f"{d / m:.3f} ratio of the overall medians"
        + (f" (target <= {TARGETS[args.baseline]})" if config.trainer.comm_hook == "none" else ""))


def median_interval(groups: list[list[float]], draws: int = 1000) -> tuple[float, float]:
    """A 95% bootstrap interval for the median of all values, resampling whole groups (rounds):
    turns of one round share its load, so they are not independent samples."""
    gen = random.Random(0)
    medians = sorted(statistics.median([v for group in gen.choices(groups, k=len(groups)) for v in group])
                     for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="mlp")
    parser.add_argument("--steps", type=int, default=100, help="steps per run (at least 3 turns of 10)")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="trainer.device (default: the config's)")
    parser.add_argument("--baseline", choices=sorted(TARGETS), default="minimal",
                        help="minimal: a textbook DDP loop; off: distsgd with diagnostics.* off and "
                             "trainer.comm_hook=none")
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
