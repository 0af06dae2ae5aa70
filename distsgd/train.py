"""Synchronous data-parallel SGD: config -> processes -> data -> model -> optimizer -> loop -> logs.

    python -m distsgd.train                                    # one process (or: distsgd-train)
    torchrun --standalone --nproc_per_node=2 -m distsgd.train  # N processes on this node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB -m distsgd.train   # on each of 2 nodes
    torchrun --standalone --nproc_per_node=2 --max-restarts=3 -m distsgd.train \\
        trainer.checkpoint_every=100                           # survive dead workers

Any Hydra override follows, e.g. ``optim=adam optim.lr=3e-4 schedule=cosine
schedule.warmup_steps=100 data.global_batch_size=256 hydra.run.dir=runs/adam``.

Curves: ``train/*`` at step t describe update t (0-based): the global-batch loss measured before
it, the learning rate it used, the norm of its averaged gradient before clipping. ``val/*`` at
step t are measured after t updates.
"""

from __future__ import annotations

import gc
import logging
import math
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distsgd import batchnorm, checkpoint, data, distributed, models, optim, resume
from distsgd.config import CONF_DIR, Config, to_config, varied_keys
from distsgd.distributed import Dist
from distsgd.metrics import BestValues, NullLogger, TensorBoardLogger, Throughput, TokenRates, flatten, peak_flops
from distsgd.samples import Samples
from distsgd.step import StepResult, TrainStep, autocast
from distsgd.stopping import (Diverged, StopSignal, clear_diverged, hydra_errors, mark_diverged, nonfinite_message,
                              run_as_command, stopped_by_signal)
from distsgd.validate import RunningStats, validate

log = logging.getLogger("distsgd")

DEFAULT_MAX_STEPS = 200  # the run's length when neither trainer.max_steps nor trainer.max_epochs is set


def run(cfg: DictConfig | Config, run_dir: Path) -> dict[str, float]:
    """Train as the config says, writing into ``run_dir``; returns the final metrics."""
    config = cfg if isinstance(cfg, Config) else to_config(cfg)
    # What a user can get wrong is checked before the process group exists, or else decided by
    # rank 0 and shared, so that a bad input stops every rank the same way instead of leaving some
    # waiting in a collective.
    dataset = data.load(config.data)
    checkpoint.check_writable(run_dir / "checkpoints")
    dist = distributed.init(config.trainer.device, config.trainer.collective_timeout_s)
    try:
        distributed.check_same_config({**flatten(asdict(config)), "run directory": str(run_dir)})
        # Only rank 0 reads and hashes the candidate checkpoints (they can be GBs).
        resume_from = distributed.decided_by_rank0(lambda: resume.choose(config.trainer, run_dir / "checkpoints"))
        dataset = dataset.place(dist.device, config.data.in_memory, config.data.num_workers)
        return train(config, dataset, dist, run_dir, resume_from)
    finally:
        distributed.shutdown()


@dataclass(frozen=True)
class Plan:
    """How long the run is and how each epoch's global batch is split."""

    batches: data.BatchSchedule
    world_size: int
    accumulate: int
    total_steps: int

    @staticmethod
    def of(config: Config, num_train: int, world_size: int) -> "Plan":
        tc = config.trainer
        batches = data.BatchSchedule.of(config.data, num_train)
        # Every later batch is the first times an integer, so it divides wherever the first does.
        data.local_batch_size(batches.global_batch, world_size, tc.accumulate)
        max_steps = tc.max_steps if tc.max_steps or tc.max_epochs else DEFAULT_MAX_STEPS
        batches.check_reached(tc.max_epochs, max_steps)
        limits = [n for n in (max_steps, tc.max_epochs and batches.first_step(tc.max_epochs)) if n]
        return Plan(batches, world_size, tc.accumulate, min(limits))

    def local_batch(self, epoch: int) -> int:
        """Samples per rank and step in ``epoch``."""
        return self.batches.batch(epoch) // self.world_size

    def describe(self, config: Config, dist: Dist, schedule: optim.Schedule, run_dir: Path) -> str:
        rates = ", ".join(f"{lr:g}" for lr in schedule.base_lrs)
        lr = (f"lr {config.optim.lr:g} at batch {config.optim.reference_batch_size}, {config.optim.scaling} scaling -> "
              f"{rates}" if config.optim.scaling != "none" else f"lr {schedule.base_lr:g}")
        phases = [f"{self._split(start)}; global batch {self.batches.batch(start)}; "
                  f"{self.batches.steps_in(start)} steps per epoch" for start in self.batches.phase_starts]
        if self.batches.milestones:
            phases = [f"from epoch {start}: {phase}" for start, phase in zip(self.batches.phase_starts, phases)]
        return (f"world size {dist.world_size}; {'; '.join(phases)}; {self.total_steps} steps = "
                f"{float(self.batches.epochs_at(self.total_steps)):.4g} epochs; {lr}; {config.schedule.name} schedule; "
                f"run directory {run_dir}")

    def _split(self, epoch: int) -> str:
        batch = self.local_batch(epoch)
        return (f"{batch} samples per rank and step, in {self.accumulate} micro-batch(es) of "
                f"{batch // self.accumulate}")


def train(config: Config, dataset: data.Dataset, dist: Dist, run_dir: Path,
          resume_from: Path | None = None) -> dict[str, float]:
    """The training run on a joined process group; ``resume_from`` is a checkpoint that rank 0
    has verified (``run`` chooses it)."""
    tc = config.trainer
    plan = Plan.of(config, len(dataset.x_train), dist.world_size)
    schedule = optim.build_schedule(config.schedule, [optim.scaled_lr(config.optim, batch)
                                                      for batch in plan.batches.phase_batches],
                                    plan.total_steps, plan.batches)
    log.info("%s", plan.describe(config, dist, schedule, run_dir))

    model, optimizer, scaler = build(config, dataset, dist, schedule(0))
    log.info("%s; %s", models.describe(model), optim.describe_groups(optimizer))
    progress = {"step": 0, "skipped_steps": 0}
    if resume_from is not None:
        progress = resume.restore(resume_from, config, schedule, model, optimizer, scaler, dist)
    loss_fn = models.loss_fn(dataset.task)
    train_step = TrainStep(model, optimizer, scaler, loss_fn, tc, dist, config.diagnostics,
                           global_batch=plan.batches.global_batch)
    train_step.restore(progress)
    if tc.comm_hook != "none":
        log.info("%s", train_step.comm.describe())
    running_stats = RunningStats(model, dist.world_size, synced_at=progress["step"] if resume_from else None,
                                 averaged=train_step.comm.averaged)
    best = BestValues(progress.get("best"))
    logger = (TensorBoardLogger(run_dir / "tensorboard", plan.total_steps, progress["step"])
              if dist.is_main else NullLogger())
    validation = _validation(model, dataset, dist, tc, loss_fn, running_stats, best, logger)
    save = resume.Saver(run_dir / "checkpoints", config, schedule, model, optimizer, scaler, dist, running_stats,
                        train_step, best)
    metrics: dict[str, float] = {}
    started, first_step = time.perf_counter(), progress["step"]
    if dist.is_main:
        clear_diverged(run_dir)
    status = "STATUS_UNKNOWN"  # stopped early, to be resumed
    try:
        with StopSignal(tc.stop_signals) as stop:
            skipped = _loop(config, plan, dataset, dist, schedule, train_step, validation, save, logger, metrics,
                            progress, stop, token_rates(config, dataset, model, dist))
        metrics.update(validation(plan.total_steps))
        logger.scalars(plan.total_steps, _group(metrics, "val/"))
        save(plan.total_steps, skipped, final=True)
        status = "STATUS_SUCCESS"
    except Diverged as diverged:
        status = "STATUS_FAILURE"
        if dist.is_main:
            mark_diverged(run_dir, diverged)
        raise
    finally:
        # Also when a run stops early: its curves are closed and listed in the HParams dashboard.
        logger.hparams(flatten(asdict(config)), metrics, varied_keys(), save.config_yaml, status)
        logger.close()
    ran = plan.total_steps - first_step
    log.info("done: %d steps%s in %.1f s; %s; saved %s", ran,
             f" (steps {first_step} to {plan.total_steps}, resumed)" if first_step else "",
             time.perf_counter() - started, ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())),
             save.last_path)
    log.info("curves: tensorboard --logdir %s --host 127.0.0.1", shlex.quote(str(run_dir / "tensorboard")))
    return metrics


def build(config: Config, dataset: data.Dataset, dist: Dist,
          lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model as ``trainer.seed`` initialises it, on this rank's device, its optimizer at rate
    ``lr`` and the gradient scaler: what a run trains, before any checkpoint is restored into it."""
    torch.manual_seed(config.trainer.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    if config.model.sync_bn and batchnorm.has_batchnorm(model):
        model = batchnorm.convert_sync_bn(model, dist.device)
    if config.model.dropout:
        # The masks come from each rank's own stream (README, Language models): with one seed
        # for all, every rank would drop the same units of its different samples.
        torch.manual_seed(int(np.random.SeedSequence([config.trainer.seed, dist.rank]).generate_state(1)[0]))
    model = model.to(dist.device, memory_format=dataset.memory_format(dist.device))
    optimizer = optim.build_optimizer(config.optim, optim.param_groups(config.optim, model), lr, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=config.trainer.precision == "fp16")
    return model, optimizer, scaler


def _validation(model: torch.nn.Module, dataset: data.Dataset, dist: Dist, tc, loss_fn, running_stats: RunningStats,
                best: BestValues, logger):
    """``validation(step)``: the validation metrics after ``step`` updates (every rank calls it),
    the best values so far beside them, and (rank 0) the samples of a model that generates."""
    val_idx = data.val_indices(len(dataset.x_val), dist.rank, dist.world_size, dist.device)
    val_autocast = autocast(dist.device, tc.precision)
    samples = Samples(dataset, tc.seed, dist.device) if hasattr(model, "generate") and dist.is_main else None

    def validation(step: int) -> dict[str, float]:
        with running_stats.synced(step):
            values = validate(model, dataset, val_idx, loss_fn, val_autocast) if len(dataset.x_val) else {}
            if samples is not None:
                logger.text(step, "samples", samples(model, step))
        if values and dataset.loss_floor is not None:  # constant: val/loss minus it is the excess loss
            values["val/loss_floor"] = dataset.loss_floor
        return {**values, **best.update(values)}  # val/best_* beside val/*

    return validation


def token_rates(config: Config, dataset: data.Dataset, model: torch.nn.Module, dist: Dist) -> TokenRates | None:
    """What train/tokens_per_sec and train/mfu are made of, for a language model."""
    if dataset.task != "language_model":
        return None
    peak = peak_flops(dist.device, config.trainer.peak_tflops)
    if peak is None and dist.device.type == "cuda":
        log.info("no train/mfu: the peak FLOP/s of %s is unknown; set trainer.peak_tflops",
                 torch.cuda.get_device_name(dist.device))
    # Models that know their FLOPs say so (gpt.GPT); another's are not known, nor its MFU.
    flops = model.flops_per_token() if hasattr(model, "flops_per_token") else None
    return TokenRates(dataset.input_shape[0], flops, peak and peak * dist.world_size)


def _loop(config: Config, plan: Plan, dataset: data.Dataset, dist: Dist, schedule: optim.Schedule,
          train_step: TrainStep, validation, save: resume.Saver, logger, metrics: dict, progress: dict,
          stop: StopSignal, rates: TokenRates | None) -> int:
    """Steps from ``progress["step"]`` to the plan's end; ``metrics`` holds the newest values.
    Returns the number of skipped steps."""
    tc = config.trainer
    step, skipped, consecutive = progress["step"], progress["skipped_steps"], 0
    throughput = Throughput(plan.batches.samples_before(step))
    while step < plan.total_steps:
        epoch, first = plan.batches.locate(step)
        steps = plan.batches.steps_in(epoch)
        for x, y in dataset.train_batches(epoch, first, steps, plan.local_batch(epoch), dist, tc.seed):
            if step % tc.val_every == 0:
                with throughput.paused():
                    metrics.update(validation(step))
                logger.scalars(step, _group(metrics, "val/"))
            lr = schedule(step)
            logged = step % tc.log_every == 0 or step == plan.total_steps - 1
            result = train_step(x, y, lr, stop.received, observe=logged)
            skipped, consecutive = skipped + result.skipped, (consecutive + 1) * result.skipped
            if consecutive and (tc.nonfinite == "stop" or consecutive > tc.max_consecutive_skips):
                save(step, skipped, final=False)
                raise Diverged(nonfinite_message(step, result.loss, result.grad_norm, consecutive, tc, save.last_path),
                               step, save.last_path)
            if logged:
                _log_step(logger, metrics, step, result, lr, skipped, throughput, plan.batches, rates)
            else:
                logger.progress(step + 1)
            step += 1
            if result.stop_requested:
                save(step, skipped, final=False)
                raise stopped_by_signal(stop, step, save.last_path, dist, tc.requeue)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < plan.total_steps:
                save(step, skipped, final=False)
            if step == plan.total_steps:
                break
    return skipped


def _log_step(logger, metrics: dict, step: int, result: StepResult, lr: float, skipped: int,
              throughput: Throughput, batches: data.BatchSchedule, rates: TokenRates | None) -> None:
    samples = batches.samples_before(step + 1)
    metrics.update({"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                    "train/skipped_steps": skipped, "train/samples": samples,
                    "train/global_batch_size": batches.phase_batches[batches.step_phase(step)]})
    rate = throughput.samples_per_sec(step, samples)
    if rate is not None:
        metrics["train/samples_per_sec"] = rate
        if rates is not None:
            metrics.update(rates.of(rate))
    logger.scalars(step, {**_group(metrics, "train/"), **result.diagnostics})
    logger.progress(step + 1, loss=result.loss, lr=lr)


def _group(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(prefix)}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    metrics = run_as_command(run, cfg, Path(HydraConfig.get().runtime.output_dir))
    if metrics is None:  # diverged, in a multirun: ranked last by a sweeper that minimises
        return math.inf
    return metrics.get("val/loss", metrics.get("train/loss"))  # the objective for sweepers


def main() -> None:
    """The console script and ``python -m distsgd.train``."""
    with hydra_errors.captured():
        _hydra_main()
    # What is alive now lives until the process ends: a last full collection at interpreter exit,
    # of torch's and Hydra's objects, took 0.45 s of every run. Everything distsgd opened
    # (TensorBoard files, the process group) is closed by now.
    gc.freeze()


if __name__ == "__main__":
    main()
