"""How a run ends early: stop signals (and requeueing a SLURM job after one), the ``Stopped``
exception, and reporting a failure the user can act on as one line, once: on rank 0's console, in
every rank's log, and in torchrun's error file, so that torchrun's "Root Cause" shows distsgd's
line rather than a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from distsgd import distributed
from distsgd.metrics import DIVERGED_MARKER, quiet_console
from distsgd.config import ConfigError, TrainerConfig, hydra_override
from distsgd.distributed import Dist

log = logging.getLogger("distsgd")

# A log record with this in ``extra`` goes to the log files only (see metrics.quiet_console).
FILE_ONLY = {"file_only": True}


class Stopped(Exception):
    """The run ended early on purpose (non-finite values, a stop signal) after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(Stopped):
    """The run stopped on non-finite values: in a sweep, a result like any other (objective inf)."""

    EXIT_CODE = 3

    def __init__(self, message: str, step: int, checkpoint: Path):
        super().__init__(message, self.EXIT_CODE)
        self.step, self.checkpoint = step, checkpoint


def mark_diverged(run_dir: Path, diverged: Diverged) -> None:
    (run_dir / DIVERGED_MARKER).write_text(json.dumps(
        {"step": diverged.step, "message": str(diverged), "checkpoint": str(diverged.checkpoint)}) + "\n")


def clear_diverged(run_dir: Path) -> None:
    """A run that starts again in the folder is no longer the diverged result the marker describes."""
    (run_dir / DIVERGED_MARKER).unlink(missing_ok=True)


class StopSignal:
    """Remembers which of ``names`` (trainer.stop_signals: SIGTERM, what schedulers send at
    preemption, SIGUSR2, what SLURM sends before the time limit) arrived, until the next step ends.
    Python delivers signals to the main thread only: a run in another thread (scripts/bench.py's
    second contender) listens to none."""

    def __init__(self, names: list[str]) -> None:
        self.signals = [signal.Signals[name] for name in names]

    def __enter__(self):
        self.received = False
        self.arrived: set[int] = set()
        self.listening = threading.current_thread() is threading.main_thread()
        if self.listening:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True
        self.arrived.add(signum)

    def __exit__(self, *exc) -> None:
        if self.listening:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    def arrived_anywhere(self, device: torch.device) -> list[signal.Signals]:
        """The stop signals that some rank received: a rank that got none still names them. Every
        rank calls this, once the step has told them all that one must stop."""
        counts = torch.tensor([float(sig in self.arrived) for sig in self.signals], device=device)
        return [sig for sig, count in zip(self.signals, distributed.all_reduce_sum(counts).tolist()) if count]


def stopped_by_signal(stop: StopSignal, step: int, saved: Path, dist: Dist, requeue: bool) -> Stopped:
    """What ends a run that a stop signal interrupted, its checkpoint ``saved``: with ``requeue``,
    rank 0 first asks SLURM to requeue the job, and every rank waits for that, lest the others' exit
    end the job step (srun --kill-on-bad-exit) before the request is made."""
    signals = stop.arrived_anywhere(dist.device)
    requeued = distributed.broadcast_object(requeue_job() if requeue and dist.is_main else None)
    what = f"stopped by {' and '.join(sig.name for sig in signals)} after step {step}; saved {saved}"
    if requeued:
        then = f"requeued SLURM job {requeued}, which resumes from it"
    else:
        then = f"to resume, run: {resume_command(saved.parent.parent, dist.world_size)}"
    return Stopped(f"{what}; {then}", 128 + signals[0])


def requeue_job() -> str | None:
    """``scontrol requeue $SLURM_JOB_ID``: the job id when SLURM took it; else None and a warning,
    since the checkpoint is saved all the same and the job can still be resubmitted by hand."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("trainer.requeue=true but SLURM_JOB_ID is not set (not a SLURM job): nothing to requeue")
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("trainer.requeue=true but scontrol could not run (%s): job %s was not requeued", err, job)
        return None
    if done.returncode != 0:
        log.warning("trainer.requeue=true but `scontrol requeue %s` failed (exit %d: %s): the job was not requeued; "
                    "submit it with --requeue", job, done.returncode, done.stderr.strip() or done.stdout.strip())
        return None
    return job


def nonfinite_message(step: int, loss: float, norm: float, consecutive: int, tc: TrainerConfig, path) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
    why = (f"{consecutive} consecutive non-finite steps (trainer.max_consecutive_skips={tc.max_consecutive_skips})"
           if tc.nonfinite == "skip" else "trainer.nonfinite=stop")
    return (f"non-finite {what} at step {step}; stopped after {why}; saved the last good state to {path}; "
            "try a lower optim.lr (or trainer.clip_grad_norm)")


def resume_command(run_dir: Path, world_size: int) -> str:
    """The command that continues this run: the same overrides, in the same run directory (a new
    torchrun launch or SLURM job would get a new run id, hence a new directory, and start afresh)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.startswith(("hydra.run.dir=", "trainer.resume="))]
    # Quoted for Hydra, then for the shell: a sweep job's folder reads optim.lr=0.01,trainer.max_steps=40.
    args = " ".join(shlex.quote(arg) for arg in [*kept, hydra_override("hydra.run.dir", run_dir.resolve())])
    if distributed.ranks_from_slurm():
        return f"the same srun launch (a new SLURM job), with these arguments for distsgd.train: {args}"
    if world_size == 1:
        return f"python -m distsgd.train {args}"
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size:
        return f"torchrun --standalone --nproc_per_node={world_size} -m distsgd.train {args}"
    return f"the same torchrun command on every node, with these arguments for distsgd.train: {args}"


def report(message: str, is_main: bool) -> None:
    """A failure the user can act on: rank 0 prints it, every rank logs it and gives it to torchrun."""
    if is_main:
        print(f"distsgd: {message}", file=sys.stderr, flush=True)
    log.error(message, extra=FILE_ONLY)
    _write_error_file(f"distsgd: {message}")


def _write_error_file(message: str) -> None:
    # torchrun names a file per worker; it shows a plain-string "message" as it is.
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


class _Tee(io.TextIOBase):
    def __init__(self, shown, kept: io.StringIO) -> None:
        self.shown, self.kept = shown, kept

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.shown.write(text) if self.shown is not None else len(text)

    def flush(self) -> None:
        if self.shown is not None:
            self.shown.flush()


class _HydraErrors:
    """Hydra reports a config it cannot compose on stderr, on every rank, before distsgd's code
    runs. Until ``release()`` (the first thing the task does), stderr is kept, and shown on rank 0
    only; if Hydra then exits with an error, that text goes into torchrun's error file."""

    real = None  # the real stderr, while it is captured

    @contextmanager
    def captured(self):
        self.real, self.kept = sys.stderr, io.StringIO()
        shown = self.real if distributed.launch_rank() == 0 else None
        sys.stderr = _Tee(shown, self.kept)
        try:
            yield self
        except SystemExit as exit_:
            if self.real is not None and exit_.code not in (0, None):
                self.release()
                hint = "Set the environment variable HYDRA_FULL_ERROR=1"
                text = " ".join(line.strip() for line in self.kept.getvalue().splitlines()
                                if line.strip() and not line.startswith(hint))
                _write_error_file(f"distsgd: error: {text}")
            raise
        finally:
            self.release()

    def release(self) -> None:
        if self.real is not None:
            sys.stderr, self.real = self.real, None

    def __getstate__(self) -> dict:
        # A launcher that runs the task in other processes (submitit) pickles it, and this with
        # it: there, nothing is captured, and release() leaves stderr alone.
        return {}


hydra_errors = _HydraErrors()


def run_as_command(run, cfg, run_dir: Path):
    """``run(cfg, run_dir)`` as the task of a command (train, lr_find): rank 0 alone talks on the
    console, and a mistake the user can fix or an early stop ends the process with its one line
    and exit code (2, or the stop's) instead of a traceback. In a multirun, a run that diverged is
    one of the sweep's results: it returns None and the sweep goes on."""
    hydra_errors.release()
    is_main = distributed.launch_rank() == 0
    quiet_console(is_main)
    try:
        return run(cfg, run_dir)
    except ConfigError as err:
        report(f"error: {err}", is_main)
        raise SystemExit(2) from None
    except Stopped as stop:
        report(str(stop), is_main)
        if isinstance(stop, Diverged) and _in_multirun():
            return None
        raise SystemExit(stop.exit_code) from None


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
