"""Training state in and out of checkpoints: what a save holds, which checkpoint a run resumes
from, and restoring it after checking that the config continues the same trajectory.

checkpoint.py knows files (atomic writes, hashes, the newest valid one); this module knows what a
distsgd run keeps in them: model, optimizer, scaler, schedule, step, skipped steps, world size,
every rank's RNG states and the config; with PowerSGD or local SGD also what differs between the
ranks (comm.py's rank_state), under "comm", one entry per rank.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from distsgd import checkpoint, optim
from distsgd.config import Config, ConfigError, TrainerConfig, to_yaml
from distsgd.distributed import Dist
from distsgd.metrics import flatten
from distsgd.validate import RunningStats

log = logging.getLogger("distsgd")

# What decides the trajectory: a resumed run must agree with its checkpoint on these.
TRAJECTORY_KEYS = ("data.", "model.", "optim.", "schedule.", "trainer.seed", "trainer.precision",
                   "trainer.clip_grad_norm", "trainer.comm_hook", "trainer.powersgd_", "trainer.local_sgd_")
NOT_TRAJECTORY = ("data.in_memory", "data.num_workers", "data.root", "data.path", "data.x", "data.y")
# What Saver writes besides "model" and "step".
TRAINING_STATE = ("optimizer", "scaler", "scheduler", "skipped_steps", "world_size", "rng", "config")


def choose(tc: TrainerConfig, directory: Path) -> Path | None:
    """The checkpoint that ``trainer.resume`` names (verified), or None to start afresh.
    Run it on rank 0 alone (distributed.decided_by_rank0): checkpoints can be GBs."""
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


class Saver:
    """Writes checkpoints: every rank contributes its RNG state (and ``rank_state()``, unless it is
    None), rank 0 writes, all wait for it."""

    def __init__(self, directory: Path, config: Config, schedule: optim.Schedule, model, optimizer, scaler,
                 dist: Dist, running_stats: RunningStats, instruments=None, best=None):
        self.directory, self.config, self.schedule = directory, config, schedule
        self.model, self.optimizer, self.scaler, self.dist = model, optimizer, scaler, dist
        # instruments: what keeps state across steps beside the model (step.TrainStep's settle/state_dict,
        # and rank_state: what differs between the ranks).
        self.running_stats, self.instruments, self.best = running_stats, instruments, best
        self.config_yaml = to_yaml(config)  # made once: OmegaConf takes tens of ms
        self.last_path: Path | None = None

    def __call__(self, step: int, skipped: int, final: bool) -> None:
        if self.instruments is not None:
            self.instruments.settle()
        rng_states: list = [None] * self.dist.world_size
        torch.distributed.all_gather_object(rng_states, checkpoint.rng_state(self.dist.device))
        extra = {}
        own = self.instruments.rank_state() if self.instruments is not None else None  # alike on every rank
        if own is not None:
            # Gathered on rank 0 only: with local SGD these are W copies of the model and optimizer state.
            extra["comm"] = [None] * self.dist.world_size if self.dist.is_main else None
            torch.distributed.gather_object(own, extra["comm"], dst=0)
        self.last_path = self.directory / "last.pt" if final else checkpoint.step_path(self.directory, step)
        with self.running_stats.synced(step):
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
                    "config": self.config_yaml,
                    "diagnostics": self.instruments.state_dict() if self.instruments is not None else {},
                    "best": self.best.state_dict() if self.best is not None else {},
                    **extra,
                }, self.last_path)
                checkpoint.prune(self.directory, self.config.trainer.keep_checkpoints)
        torch.distributed.barrier()


def restore(path: Path, config: Config, schedule: optim.Schedule, model, optimizer, scaler, dist: Dist) -> dict:
    """Load ``path`` into the model, optimizer and scaler; returns {"step", "skipped_steps",
    "diagnostics", "best", "comm"}, the last this rank's entry of "comm" (None if none fits this run)."""
    state = checkpoint.load(path, verified=dist.is_main)  # rank 0 hashed it just now, choosing it
    # checkpoint.load vouches for "model" and "step" only; a foreign file could still lack the rest.
    missing = [key for key in TRAINING_STATE if key not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} is not a distsgd training checkpoint (it lacks {', '.join(missing)})")
    saved_config = OmegaConf.create(state["config"])
    if not config.trainer.resume_override:
        check_same_trajectory(path, config, schedule, state, saved_config)
    # The config decides the hyperparameters: load_state_dict would bring back the checkpoint's
    # (momentum, betas, ...), silently undoing what resume_override allowed to change.
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    saved_optimizer = saved_config.optim.name
    # A checkpoint from before the key existed had one group, weight decay on all parameters.
    saved_groups = saved_config.optim.get("weight_decay_on", "all")
    rank_state = state["comm"][dist.rank] if state.get("comm") and state["world_size"] == dist.world_size else None
    # Local SGD: each rank's own optimizer and scaler state, where the checkpoint has them for this rank.
    own = rank_state if rank_state and "optimizer" in rank_state and config.trainer.comm_hook == "local_sgd" else state
    try:
        model.load_state_dict(state["model"])
        if saved_optimizer != config.optim.name:  # another optimizer's state (an SGD momentum buffer for Adam)
            log.warning("optim.name changed from %s to %s: the optimizer state starts afresh",
                        saved_optimizer, config.optim.name)
        elif saved_groups != config.optim.weight_decay_on:  # its groups hold other parameters
            log.warning("optim.weight_decay_on changed from %s to %s: the optimizer state starts afresh",
                        saved_groups, config.optim.weight_decay_on)
        else:
            optimizer.load_state_dict(own["optimizer"])
        scaler.load_state_dict(own["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:
        # torch's first line is often only a heading ("Error(s) in loading state_dict for ...:").
        reason = next((line.strip() for line in str(err).splitlines() if line.strip() and not line.endswith(":")),
                      type(err).__name__)
        raise ConfigError(f"checkpoint {path} does not fit this run's model or optimizer ({reason}); "
                          "start a new run directory for a different model") from None
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)
    if state["world_size"] == dist.world_size:
        checkpoint.set_rng_state(state["rng"][dist.rank], dist.device)
    log.info("resumed from %s at step %d", path, state["step"])
    return {"step": state["step"], "skipped_steps": state["skipped_steps"], "diagnostics": state.get("diagnostics", {}),
            "best": state.get("best", {}), "comm": rank_state}


def check_same_trajectory(path: Path, config: Config, schedule: optim.Schedule, state: dict,
                          saved_config: DictConfig) -> None:
    """Raise ConfigError naming every trajectory-deciding key on which the config and the checkpoint differ."""
    def relevant(tree: dict) -> dict:
        flat = flatten(tree)
        return {k: v for k, v in flat.items() if k.startswith(TRAJECTORY_KEYS) and k not in NOT_TRAJECTORY}

    # A key added to distsgd after the checkpoint was written counts as its default there.
    saved = relevant(OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(Config), saved_config)))
    now = relevant(OmegaConf.to_container(OmegaConf.structured(config)))
    saved["schedule total steps"] = state["scheduler"]["total_steps"]
    now["schedule total steps"] = schedule.total_steps
    changed = [f"{k} ({saved.get(k)} -> {now.get(k)})" for k in sorted(saved.keys() | now.keys())
               if saved.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"trainer.resume: the config differs from checkpoint {path} in {', '.join(changed)}; "
                          "restore those values, start a new run directory, or set trainer.resume_override=true")
