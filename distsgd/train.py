"""Synchronous data-parallel SGD: the training loop.

    python -m distsgd.train                                    # one process (or: distsgd-train)
    torchrun --standalone --nproc_per_node=2 -m distsgd.train  # N processes on this node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB -m distsgd.train   # on each of 2 nodes

Any Hydra override follows, e.g. ``optim=adam optim.lr=3e-4 schedule=cosine
schedule.warmup_steps=100 data.global_batch_size=256 hydra.run.dir=runs/adam``.

Curves: ``train/*`` at step t describe update t (0-based): the global-batch loss measured before
it, the learning rate it used, the norm of its averaged gradient. ``val/*`` at step t are
measured after t updates.
"""

from __future__ import annotations

import logging
import math
import sys
import time
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


def run(cfg: DictConfig | Config, run_dir: Path) -> dict[str, float]:
    """Train as the config says, writing into ``run_dir``; returns the final metrics."""
    config = cfg if isinstance(cfg, Config) else to_config(cfg)
    # Everything a user can get wrong is checked before the process group exists, so that a bad
    # input stops every rank the same way instead of leaving some waiting in a collective.
    dataset = data.load(config.data)
    dist = distributed.init(config.trainer.device)
    try:
        _quiet_console_unless_main(dist)
        return train(config, dataset.to(dist.device), dist, run_dir)
    finally:
        distributed.shutdown()


def train(config: Config, dataset: data.Dataset, dist: Dist, run_dir: Path) -> dict[str, float]:
    tc = config.trainer
    global_batch = config.data.global_batch_size
    batch = data.local_batch_size(global_batch, dist.world_size)
    steps_per_epoch = data.steps_per_epoch(len(dataset.x_train), global_batch)
    total_steps = min(tc.max_steps or math.inf, (tc.max_epochs or math.inf) * steps_per_epoch)
    schedule = optim.build_schedule(config.schedule, optim.scaled_lr(config.optim, global_batch),
                                    total_steps, steps_per_epoch)

    torch.manual_seed(tc.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task).to(dist.device)
    optimizer = optim.build_optimizer(config.optim, model.parameters(), schedule(0))
    if tc.allreduce == "ddp":
        net = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
        buckets = None
    else:
        distributed.broadcast_parameters(model)
        net, buckets = model, distributed.make_buckets(list(model.parameters()), int(tc.bucket_mb * 2**20))
    loss_fn = models.loss_fn(dataset.task)
    val_idx = data.val_indices(len(dataset.x_val), dist.rank, dist.world_size, dist.device)

    logger = TensorBoardLogger(run_dir / "tensorboard", total_steps) if dist.is_main else NullLogger()
    metrics: dict[str, float] = {}
    last_log_step, last_log_time = 0, time.perf_counter()
    order = None
    for step in range(total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        if order is None or k == 0:
            order = data.train_order(len(dataset.x_train), dist.rank, dist.world_size, tc.seed, epoch, dist.device)
        if step % tc.val_every == 0 and len(val_idx):
            val_start = time.perf_counter()
            metrics.update(_validate(model, dataset, val_idx, loss_fn))
            logger.scalars(step, _group(metrics, "val/"))
            last_log_time += time.perf_counter() - val_start  # samples_per_sec counts training only

        idx = order[k * batch:(k + 1) * batch]
        lr = schedule(step)
        optim.set_lr(optimizer, lr)
        loss = loss_fn(net(dataset.x_train[idx]), dataset.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if buckets is not None:
            distributed.average_gradients(buckets, dist.world_size)
        optimizer.step()

        # Host syncs (.item(), the loss all-reduce) happen on logging steps only.
        if step % tc.log_every == 0 or step == total_steps - 1:
            now = time.perf_counter()
            metrics["train/loss"] = distributed.all_reduce_sum(loss.detach().clone()).item() / dist.world_size
            metrics["train/lr"] = lr
            metrics["train/grad_norm"] = _grad_norm(model).item()
            if step > last_log_step:
                metrics["train/samples_per_sec"] = (step - last_log_step) * global_batch / (now - last_log_time)
            logger.scalars(step, _group(metrics, "train/"))
            logger.progress(step + 1, loss=metrics["train/loss"], lr=lr)
            last_log_step, last_log_time = step, now
        else:
            logger.progress(step + 1)

    if len(val_idx):
        metrics.update(_validate(model, dataset, val_idx, loss_fn))
        logger.scalars(total_steps, _group(metrics, "val/"))
    if dist.is_main:
        checkpoint.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "step": total_steps,
            "config": to_yaml(config),
        }, run_dir / "checkpoints" / "last.pt")
    logger.hparams(flatten(OmegaConf.to_container(OmegaConf.structured(config))), metrics)
    logger.close()
    torch.distributed.barrier()
    log.info("run directory: %s", run_dir)
    log.info("curves: tensorboard --logdir %s --host 127.0.0.1", run_dir / "tensorboard")
    return metrics


def _group(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(prefix)}


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@torch.no_grad()
def _validate(model, dataset: data.Dataset, idx: torch.Tensor, loss_fn) -> dict[str, float]:
    """Mean loss (and accuracy) over the whole validation set, each sample counted once."""
    model.eval()
    # float64 sums so that the result does not depend on how the set is split across ranks.
    totals = torch.zeros(3, dtype=torch.float64, device=idx.device)  # loss sum, correct, count
    for chunk in idx.split(EVAL_CHUNK):
        out, y = model(dataset.x_val[chunk]), dataset.y_val[chunk]
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"distsgd: error: {err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/loss", metrics.get("train/loss"))  # the objective for sweepers


if __name__ == "__main__":
    main()
