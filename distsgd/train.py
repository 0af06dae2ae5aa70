"""Synchronous data-parallel SGD: the training loop.

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

import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from distsgd import checkpoint, data, distributed, models, optim
from distsgd.config import Config, ConfigError, to_config, to_yaml
from distsgd.distributed import Dist
from distsgd.metrics import NullLogger, TensorBoardLogger, flatten

log = logging.getLogger("distsgd")

EVAL_CHUNK = 4096  # validation samples per forward pass; only memory depends on it
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Stopped(Exception):
    """The run ended early on purpose (non-finite values, SIGTERM) after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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
        _quiet_console_unless_main(dist)
        # Only rank 0 reads and hashes the candidate checkpoints (they can be GBs); its choice, or
        # its error, binds all ranks, so none can pick another file or fail alone.
        resume_from = _decided_by_rank0(lambda: _checkpoint_to_resume(config.trainer, run_dir / "checkpoints"), dist)
        dataset = dataset.place(dist.device, config.data.in_memory, config.data.num_workers)
        return train(config, dataset, dist, run_dir, resume_from)
    finally:
        distributed.shutdown()


def train(config: Config, dataset: data.Dataset, dist: Dist, run_dir: Path,
          resume_from: Path | None = None) -> dict[str, float]:
    """The training run on a joined process group; ``resume_from`` is a checkpoint that rank 0
    has verified (``run`` chooses it)."""
    tc = config.trainer
    global_batch = config.data.global_batch_size
    batch = data.local_batch_size(global_batch, dist.world_size, tc.accumulate)
    steps_per_epoch = data.steps_per_epoch(len(dataset.x_train), global_batch)
    total_steps = min(tc.max_steps or math.inf, (tc.max_epochs or math.inf) * steps_per_epoch)
    schedule = optim.build_schedule(config.schedule, optim.scaled_lr(config.optim, global_batch),
                                    total_steps, steps_per_epoch)

    torch.manual_seed(tc.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    if config.model.sync_bn and models.has_batchnorm(model):
        model = models.convert_sync_bn(model, dist.device)
    model = model.to(dist.device, memory_format=dataset.memory_format(dist.device))
    optimizer = optim.build_optimizer(config.optim, model.parameters(), schedule(0), dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=tc.precision == "fp16")
    progress = {"step": 0, "skipped_steps": 0}
    if resume_from is not None:
        progress = _restore(resume_from, config, schedule, model, optimizer, scaler, dist)
    # Compiled inside DDP, not around it: torch.compile(DDP(model)) starts tracing only at frames
    # outside torch.nn, so a model built of torch.nn containers (all of ours) would stay eager.
    # DDP's forward is active while the inner module compiles, so its graph is still split at
    # DDP's bucket boundaries (DDPOptimizer).
    net = stats = distributed.WithStepStats(torch.compile(model) if tc.compile else model, dist.device)
    if tc.allreduce == "ddp":
        # Gradients as views into DDP's all-reduce buckets: the averaged gradients are not copied
        # out of the buckets every step (the values are the same).
        net = DistributedDataParallel(net, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
        buckets = None
    else:
        distributed.broadcast_parameters(net)
        buckets = distributed.make_buckets(list(net.parameters()), int(tc.bucket_mb * 2**20))
    loss_fn = models.loss_fn(dataset.task)
    autocast = (torch.autocast(dist.device.type, AUTOCAST_DTYPES[tc.precision])
                if tc.precision in AUTOCAST_DTYPES else nullcontext())
    params = list(model.parameters())
    val_idx = data.val_indices(len(dataset.x_val), dist.rank, dist.world_size, dist.device)
    logger = TensorBoardLogger(run_dir / "tensorboard", total_steps, progress["step"]) if dist.is_main else NullLogger()
    save = _Saver(run_dir / "checkpoints", config, schedule, model, optimizer, scaler, dist)

    metrics: dict[str, float] = {}
    step, skipped, consecutive = progress["step"], progress["skipped_steps"], 0
    last_log_step, last_log_time = step, time.perf_counter()
    with _SigtermFlag() as sigterm:
        while step < total_steps:
            epoch, first = divmod(step, steps_per_epoch)
            for x, y in dataset.train_batches(epoch, first, steps_per_epoch, batch, dist, tc.seed):
                if step % tc.val_every == 0 and len(val_idx):
                    val_start = time.perf_counter()
                    metrics.update(_validate(model, dataset, val_idx, loss_fn, autocast))
                    logger.scalars(step, _group(metrics, "val/"))
                    last_log_time += time.perf_counter() - val_start  # samples_per_sec counts training only

                lr = schedule(step)
                optim.set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                for i, (xm, ym) in enumerate(zip(x.chunk(tc.accumulate), y.chunk(tc.accumulate))):
                    # DDP all-reduces only with the last micro-batch; the others accumulate locally.
                    sync = i == tc.accumulate - 1 or buckets is not None
                    with (nullcontext() if sync else net.no_sync()), autocast:
                        micro_loss = loss_fn(net(xm), ym) / tc.accumulate
                    (scaler.scale(micro_loss) + stats.attach(micro_loss, sigterm.received)).backward()
                if buckets is not None:
                    distributed.average_gradients(buckets, dist.world_size)
                scaler.unscale_(optimizer)
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                if tc.clip_grad_norm is not None:
                    torch._foreach_mul_(grads, (tc.clip_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0))
                # Averaged with the gradients, these are the same numbers on every rank, and so is
                # the verdict on the update.
                global_loss, stop_requested, norm = stats.read(grad_norm)
                # With fp16 a non-finite gradient from a finite loss is the scaler's routine overflow.
                if math.isfinite(global_loss) and (math.isfinite(norm) or scaler.is_enabled()):
                    scaler.step(optimizer)  # optimizer.step(), unless fp16 overflowed
                    consecutive = 0
                else:
                    skipped += 1
                    consecutive += 1
                scaler.update()
                if consecutive and (tc.nonfinite == "stop" or consecutive > tc.max_consecutive_skips):
                    save(step, skipped, final=False)
                    raise Stopped(_nonfinite_message(step, global_loss, norm, consecutive, tc, save.last_path), 3)

                if step % tc.log_every == 0 or step == total_steps - 1:
                    now = time.perf_counter()
                    metrics.update({"train/loss": global_loss, "train/lr": lr, "train/grad_norm": norm,
                                    "train/skipped_steps": skipped})
                    if step > last_log_step:
                        metrics["train/samples_per_sec"] = (step - last_log_step) * global_batch / (now - last_log_time)
                    logger.scalars(step, _group(metrics, "train/"))
                    logger.progress(step + 1, loss=global_loss, lr=lr)
                    last_log_step, last_log_time = step, now
                else:
                    logger.progress(step + 1)
                step += 1
                if stop_requested:
                    save(step, skipped, final=False)
                    raise Stopped(f"stopped by SIGTERM after step {step}; saved {save.last_path}; "
                                  "launch the same command again to resume", 143)
                if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < total_steps:
                    save(step, skipped, final=False)
                if step == total_steps:
                    break

    if len(val_idx):
        metrics.update(_validate(model, dataset, val_idx, loss_fn, autocast))
        logger.scalars(total_steps, _group(metrics, "val/"))
    save(total_steps, skipped, final=True)
    logger.hparams(flatten(OmegaConf.to_container(OmegaConf.structured(config))), metrics)
    logger.close()
    log.info("run directory: %s", run_dir)
    log.info("curves: tensorboard --logdir %s --host 127.0.0.1", run_dir / "tensorboard")
    return metrics


class _Saver:
    """Writes checkpoints: every rank contributes its RNG state, rank 0 writes, all wait for it."""

    def __init__(self, directory: Path, config: Config, schedule: optim.Schedule, model, optimizer, scaler,
                 dist: Dist):
        self.directory, self.config, self.schedule = directory, config, schedule
        self.model, self.optimizer, self.scaler, self.dist = model, optimizer, scaler, dist
        self.last_path: Path | None = None

    def __call__(self, step: int, skipped: int, final: bool) -> None:
        rng_states: list = [None] * self.dist.world_size
        torch.distributed.all_gather_object(rng_states, checkpoint.rng_state())
        self.last_path = self.directory / "last.pt" if final else checkpoint.step_path(self.directory, step)
        if self.dist.is_main:
            checkpoint.save({
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "step": step,
                "skipped_steps": skipped,
                "world_size": self.dist.world_size,
                "rng": rng_states,
                "config": to_yaml(self.config),
            }, self.last_path)
            checkpoint.prune(self.directory, self.config.trainer.keep_checkpoints)
        torch.distributed.barrier()


def _decided_by_rank0(decide, dist: Dist):
    """``decide()`` run on rank 0 only; every rank returns its value, or raises its ConfigError."""
    outcome = None
    if dist.is_main:
        try:
            outcome = (decide(), None)
        except ConfigError as err:
            outcome = (None, str(err))
    value, error = distributed.broadcast_object(outcome)
    if error is not None:
        raise ConfigError(error)
    return value


def _checkpoint_to_resume(tc, directory: Path) -> Path | None:
    match tc.resume:
        case "never":
            return None
        case "auto":
            return checkpoint.find_latest_valid(directory)
        case path:
            problem = checkpoint.verify(Path(path))
            if problem is not None:
                raise ConfigError(f"trainer.resume={path}: {problem}")
            return Path(path)


# What decides the trajectory: a resumed run must agree with its checkpoint on these.
TRAJECTORY_KEYS = ("data.", "model.", "optim.", "schedule.", "trainer.seed", "trainer.precision",
                   "trainer.clip_grad_norm")
NOT_TRAJECTORY = ("data.in_memory", "data.num_workers", "data.root", "data.path")
# What _Saver writes besides "model" and "step".
_TRAINING_STATE = ("optimizer", "scaler", "scheduler", "skipped_steps", "world_size", "rng", "config")


def _restore(path: Path, config: Config, schedule: optim.Schedule, model, optimizer, scaler, dist: Dist) -> dict:
    state = checkpoint.load(path, verified=dist.is_main)  # rank 0 hashed it just now, choosing it
    # checkpoint.load vouches for "model" and "step" only; a foreign file could still lack the rest.
    missing = [key for key in _TRAINING_STATE if key not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} is not a distsgd training checkpoint (it lacks {', '.join(missing)})")
    saved_config = OmegaConf.create(state["config"])
    if not config.trainer.resume_override:
        _check_same_trajectory(path, config, schedule, state, saved_config)
    # The config decides the hyperparameters: load_state_dict would bring back the checkpoint's
    # (momentum, betas, ...), silently undoing what resume_override allowed to change.
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    saved_optimizer = saved_config.optim.name
    try:
        model.load_state_dict(state["model"])
        if saved_optimizer == config.optim.name:
            optimizer.load_state_dict(state["optimizer"])
        else:  # another optimizer's state (an SGD momentum buffer for Adam) would crash its first step
            log.warning("optim.name changed from %s to %s: the optimizer state starts afresh",
                        saved_optimizer, config.optim.name)
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:
        # torch's first line is often only a heading ("Error(s) in loading state_dict for ...:").
        reason = next((line.strip() for line in str(err).splitlines() if line.strip() and not line.endswith(":")),
                      type(err).__name__)
        raise ConfigError(f"checkpoint {path} does not fit this run's model or optimizer ({reason}); "
                          "start a new run directory for a different model") from None
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)
    if state["world_size"] == dist.world_size:
        checkpoint.set_rng_state(state["rng"][dist.rank])
    log.info("resumed from %s at step %d", path, state["step"])
    return {"step": state["step"], "skipped_steps": state["skipped_steps"]}


def _check_same_trajectory(path: Path, config: Config, schedule: optim.Schedule, state: dict,
                           saved_config: DictConfig) -> None:
    def relevant(tree: dict) -> dict:
        flat = flatten(tree)
        return {k: v for k, v in flat.items() if k.startswith(TRAJECTORY_KEYS) and k not in NOT_TRAJECTORY}

    saved = relevant(OmegaConf.to_container(saved_config))
    now = relevant(OmegaConf.to_container(OmegaConf.structured(config)))
    saved["schedule total steps"] = state["scheduler"]["total_steps"]
    now["schedule total steps"] = schedule.total_steps
    changed = [f"{k} ({saved.get(k)} -> {now.get(k)})" for k in sorted(saved.keys() | now.keys())
               if saved.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"trainer.resume: the config differs from checkpoint {path} in {', '.join(changed)}; "
                          "restore those values, start a new run directory, or set trainer.resume_override=true")


def _nonfinite_message(step, loss, norm, consecutive, tc, path) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
    why = (f"{consecutive} consecutive non-finite steps (trainer.max_consecutive_skips={tc.max_consecutive_skips})"
           if tc.nonfinite == "skip" else "trainer.nonfinite=stop")
    return (f"non-finite {what} at step {step}; stopped after {why}; saved the last good state to {path}; "
            "try a lower optim.lr (or trainer.clip_grad_norm)")


class _SigtermFlag:
    """Remembers a SIGTERM (what schedulers send at their time limit) until the next step ends."""

    def __enter__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _group(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(prefix)}


@torch.no_grad()
def _validate(model, dataset: data.Dataset, idx: torch.Tensor, loss_fn, autocast) -> dict[str, float]:
    """Mean loss (and accuracy) over the whole validation set, each sample counted once."""
    model.eval()
    # float64 sums so that the result does not depend on how the set is split across ranks.
    totals = torch.zeros(3, dtype=torch.float64, device=idx.device)  # loss sum, correct, count
    for chunk in idx.split(EVAL_CHUNK):
        x, y = dataset.val_batch(chunk, idx.device)
        with autocast:
            out = model(x)
            totals[0] += loss_fn(out, y, reduction="none").reshape(len(chunk), -1).mean(1).sum()
        if dataset.task == "classification":
            totals[1] += (out.argmax(1) == y).sum()
        totals[2] += len(chunk)
    model.train()
    loss_sum, correct, count = distributed.all_reduce_sum(totals).tolist()
    metrics = {"val/loss": loss_sum / count}
    if dataset.task == "classification":
        metrics["val/accuracy"] = correct / count
    return metrics


def _quiet_console_unless_main(dist: Dist) -> None:
    # Every rank keeps its own log file; only rank 0 talks on the console, others only on errors.
    if not dist.is_main:
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.ERROR)


from distsgd.config import CONF_DIR  # noqa: E402


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"distsgd: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(f"distsgd: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    return metrics.get("val/loss", metrics.get("train/loss"))  # the objective for sweepers


if __name__ == "__main__":
    main()
