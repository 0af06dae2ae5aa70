"""Scaling report: throughput, exposed communication and scaling efficiency for world sizes 1..N.

    python scripts/scaling.py                      # world sizes 1 and 2 on this machine (gloo)
    python scripts/scaling.py --max-world 4 --device cuda
    python scripts/scaling.py --job mlp --rounds 10 optim=momentum

The driver (this script without torchrun's environment) launches itself under torchrun once per
world size k = 1..N (``--max-world``; default: the GPU count with ``--device cuda``, else 2) and
writes docs/scaling.md (a Markdown table) and docs/scaling.png from what the workers report.

Each worker composes the job as scripts/bench.py does (``JOBS``, ``compose_config``) and builds
distsgd's own model, optimizer and ``TrainStep`` (``train.build``) once per variant: the plain
all-reduce at each ``--bucket-mb`` value, and each comm hook at the config's bucket size. The
global batch is fixed (strong scaling): each of k ranks steps on global_batch / k samples, the
same rows every step (data loading is not timed).

Exposed communication. Besides the variants, every worker builds a reference step with
``trainer.comm_hook=none`` that always runs inside DDP's ``no_sync()``: the same forward, backward
and update, with no gradient all-reduce (and, for ``none``, no collective at all). Variant and
reference take turns of ``WINDOW`` steps, so both see the same load; t_sync is the median step time
of the variant's turns, t_nosync the reference's, and exposed share = (t_sync - t_nosync) / t_sync:
the part of a step that communication (plus any compression work) adds beyond what backward hides.
Samples/s is global_batch / t_sync; scaling efficiency is samples/s at k / (k x samples/s at 1) for
the same variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench import JOBS, REPO, compose_config  # scripts/ is on the path when run as a script
from distsgd import data, distributed, models, optim
from distsgd.config import Config, ConfigError
from distsgd.step import TrainStep
from distsgd.train import build

WINDOW = 10  # steps per turn
WARMUP_STEPS = 20  # DDP's bucket rebuild after step 1, PowerSGD's plain warm-up (10 by default)
HOOKS_CPU = ("none", "fp16", "powersgd", "local_sgd")  # bf16: DDP refuses its hook on CPU builds
HOOKS_CUDA = ("none", "fp16", "bf16", "powersgd", "local_sgd")


def variants(bucket_mbs: list[float], default_mb: float, device: str) -> list[tuple[float, str]]:
    """(bucket_mb, comm_hook) pairs: each bucket size with the plain all-reduce, each hook at the default size."""
    hooks = HOOKS_CUDA if device == "cuda" else HOOKS_CPU
    return [(mb, "none") for mb in bucket_mbs] + [(default_mb, hook) for hook in hooks if hook != "none"]


def make_step(config: Config, dataset: data.Dataset, dist: distributed.Dist, bucket_mb: float,
              hook: str) -> TrainStep:
    config = replace(config, trainer=replace(config.trainer, bucket_mb=bucket_mb, comm_hook=hook))
    lr = optim.scaled_lr(config.optim, config.data.global_batch_size)
    model, optimizer, scaler = build(config, dataset, dist, lr)
    return TrainStep(model, optimizer, scaler, models.loss_fn(dataset.task), config.trainer, dist,
                     config.diagnostics, global_batch=config.data.global_batch_size)


def timed_turn(step: TrainStep, batch, lr: float, no_sync: bool, device: torch.device) -> float:
    """Seconds per step over one turn of WINDOW steps."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(WINDOW):
        if no_sync:
            with step.ddp.no_sync():
                step(*batch, lr, False)
        else:
            step(*batch, lr, False)
    synchronize()
    return (time.perf_counter() - started) / WINDOW


def measure(config: Config, dataset: data.Dataset, dist: distributed.Dist, args: argparse.Namespace) -> list[dict]:
    global_batch = config.data.global_batch_size
    local = global_batch // dist.world_size
    rows = torch.arange(dist.rank * local, (dist.rank + 1) * local, device=dist.device)
    batch = (dataset.x_train[rows], dataset.y_train[rows])
    lr = optim.scaled_lr(config.optim, global_batch)
    results = []
    for bucket_mb, hook in variants(args.bucket_mb, config.trainer.bucket_mb, dist.device.type):
        reference = make_step(config, dataset, dist, bucket_mb, "none")
        step = make_step(config, dataset, dist, bucket_mb, hook)
        for _ in range(WARMUP_STEPS // WINDOW):
            timed_turn(step, batch, lr, False, dist.device)
            timed_turn(reference, batch, lr, True, dist.device)
        synced, unsynced = [], []
        for _ in range(args.rounds):
            synced.append(timed_turn(step, batch, lr, False, dist.device))
            unsynced.append(timed_turn(reference, batch, lr, True, dist.device))
        # Rank 0's clock: the ranks wait for each other in every all-reduce, so their times agree.
        t_sync, t_nosync = statistics.median(synced), statistics.median(unsynced)
        results.append({"world_size": dist.world_size, "bucket_mb": bucket_mb, "comm_hook": hook,
                        "t_sync_ms": 1e3 * t_sync, "t_nosync_ms": 1e3 * t_nosync,
                        "t_sync_range_ms": [1e3 * min(synced), 1e3 * max(synced)],
                        "samples_per_s": global_batch / t_sync, "exposed": (t_sync - t_nosync) / t_sync})
    return results


def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="distsgd-scaling-") as tmp:
        config = compose_config(args.job, args.device, args.overrides, Path(tmp))
        dataset = data.load(config.data)
    dist = distributed.init(config.trainer.device)
    try:
        if config.data.global_batch_size % dist.world_size:
            raise ConfigError(f"data.global_batch_size={config.data.global_batch_size} must be divisible by "
                              f"the world size {dist.world_size}")
        results = measure(config, dataset.place(dist.device, config.data.in_memory, config.data.num_workers),
                          dist, args)
        if dist.is_main:
            Path(args.worker).write_text(json.dumps({"results": results, "threads": torch.get_num_threads(),
                                                     "device": str(dist.device), "torch": torch.__version__}))
    finally:
        distributed.shutdown()


def launch(k: int, args: argparse.Namespace, out: Path) -> dict:
    """One torchrun of k processes of this script as a worker; what its rank 0 reported."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
               __file__, "--worker", str(out), "--job", args.job, "--rounds", str(args.rounds),
               "--bucket-mb", *map(str, args.bucket_mb), *(["--device", args.device] if args.device else []),
               "--", *args.overrides]
    # One thread per process for every k, so that k processes use k cores: k=1 does not get them all.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, cwd=REPO, env=env, check=True)
    return json.loads(out.read_text())


def label(row: dict) -> str:
    return f"{row['comm_hook']}, bucket {row['bucket_mb']:g} MB"


def with_efficiency(results: list[dict]) -> list[dict]:
    single = {label(r): r["samples_per_s"] for r in results if r["world_size"] == 1}
    return [{**r, "efficiency": r["samples_per_s"] / (r["world_size"] * single[label(r)])} for r in results]


def markdown(results: list[dict], runs: dict[int, dict], args: argparse.Namespace, png: Path) -> str:
    first = runs[1]
    cores = os.cpu_count()
    lines = [
        "# Scaling report",
        "",
        f"Generated by `{' '.join(['python scripts/scaling.py', *sys.argv[1:]])}` (method: the script's "
        "docstring). Job `" + args.job + "`: " + " ".join(f"`{o}`" for o in JOBS[args.job] + args.overrides) + ".",
        f"World sizes 1..{max(runs)} on {first['device']}, {cores} CPU core(s), torch {first['torch']}, "
        f"{first['threads']} thread(s) per process; {args.rounds} turns of {WINDOW} steps per variant and "
        "world size, after a warm-up. The global batch is fixed (strong scaling).",
        "",
        "How it is measured: each variant's step (distsgd's `TrainStep`) takes turns with a reference step "
        "that runs inside DDP's `no_sync()` (the same forward, backward and update with no gradient "
        "all-reduce). t_sync and t_nosync are the median times per step of those turns; "
        "**exposed communication** = (t_sync - t_nosync) / t_sync, the share of a step spent communicating "
        "(or compressing) that backward does not hide. **Efficiency** = samples/s at k / (k x samples/s at 1) "
        "for the same variant. Data loading, logging and validation are not in these times.",
        "",
        "At world size 1 a one-process all-reduce is a copy, so the exposed share there is a hook's own "
        "work (fp16 casts, PowerSGD's matrix products). `local_sgd` (warm-up 0) all-reduces no gradients, "
        "but its step still all-reduces the loss, stop flag and gradient norm in a small collective of "
        "their own, and averages the parameters every `trainer.local_sgd_period` steps: that is its "
        "exposed share.",
        "",
    ]
    if first["device"] == "cpu":
        lines += [
            f"**Read these as what they are.** On {cores} CPU cores, k gloo processes share the cores with "
            "each other and with anything else on the machine; each process gets one core, and the "
            "all-reduce goes through local TCP sockets on the same cores that compute. The step is "
            "communication-bound and contended: the figures say what this machine does, not how distsgd "
            "scales on a cluster or on GPUs. The machine is shared: a variant's ms/step can move by tens "
            "of percent between two runs of the script (the turns' range column shows the spread within "
            "this one), so compare variants only by large differences. `bf16` is left out: "
            "DDP refuses its compress hook on CPU builds (it needs NCCL).",
            "",
        ]
    lines += [f"![samples/s, exposed communication and efficiency against world size]({png.name})", "",
              "| world size | comm_hook | bucket_mb | ms/step | turns' range, ms | ms/step, no_sync | samples/s | "
              "exposed comm | efficiency |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['world_size']} | {r['comm_hook']} | {r['bucket_mb']:g} | {r['t_sync_ms']:.2f} | "
                     f"{r['t_sync_range_ms'][0]:.1f}-{r['t_sync_range_ms'][1]:.1f} | {r['t_nosync_ms']:.2f} | {r['samples_per_s']:,.0f} | {100 * r['exposed']:.0f}% | "
                     f"{r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("samples_per_s", "samples/s (global)"), ("exposed", "exposed communication share"),
              ("efficiency", "scaling efficiency"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name in dict.fromkeys(label(r) for r in results):
        rows = [r for r in results if label(r) == name]
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r["world_size"] for r in rows], [r[key] for r in rows], marker="o", label=name)
    sizes = sorted({r["world_size"] for r in results})
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("world size (processes)")
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)  # from zero: differences of a few percent should look like it
    axes[1].set_ylim(top=1)
    axes[2].set_ylim(top=1.1)
    axes[2].axhline(1.0, color="grey", linestyle=":")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="mlp")
    parser.add_argument("--max-world", type=int, default=None,
                        help="largest world size (default: the GPU count with --device cuda, else 2)")
    parser.add_argument("--rounds", type=int, default=10, help="timed turns of %d steps per variant" % WINDOW)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[0.25, 1.0, 25.0],
                        help="trainer.bucket_mb values timed with comm_hook=none")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="trainer.device (default: the config's)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "scaling.md",
                        help="the Markdown report; the PNG goes beside it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by the driver for torchrun's processes
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. optim=momentum")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1 or (args.max_world is not None and args.max_world < 1):
        parser.error("--rounds, --threads and --max-world must be at least 1")
    if args.worker:
        try:
            worker(args)
        except ConfigError as err:
            sys.exit(f"scaling: error: {err}")
        return
    max_world = args.max_world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    with tempfile.TemporaryDirectory(prefix="distsgd-scaling-") as tmp:
        runs = {k: launch(k, args, Path(tmp) / f"world{k}.json") for k in range(1, max_world + 1)}
    results = with_efficiency([r for k in sorted(runs) for r in runs[k]["results"]])
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure(results, png)
    args.out.write_text(markdown(results, runs, args, png))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
