"""How a run ends early: stop signals, the ``Stopped`` exception, and reporting a failure the user
can act on as one line, once: on rank 0's console, in every rank's log, and in torchrun's error
file, so that torchrun's "Root Cause" shows distsgd's line rather than a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from distsgd.config import TrainerConfig

log = logging.getLogger("distsgd")

# A log record with this in ``extra`` goes to the log files only (see metrics.quiet_console).
FILE_ONLY = {"file_only": True}


class Stopped(Exception):
    """The run ended early on purpose (non-finite values, a stop signal) after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignal:
    """Remembers a SIGTERM (what schedulers send at their time limit) until the next step ends.
    Python delivers signals to the main thread only: a run in another thread (scripts/bench.py's
    second contender) listens to none."""

    def __enter__(self):
        self.received = False
        self.listening = threading.current_thread() is threading.main_thread()
        if self.listening:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        if self.listening:
            signal.signal(signal.SIGTERM, self.previous)


def nonfinite_message(step: int, loss: float, norm: float, consecutive: int, tc: TrainerConfig, path) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
    why = (f"{consecutive} consecutive non-finite steps (trainer.max_consecutive_skips={tc.max_consecutive_skips})"
           if tc.nonfinite == "skip" else "trainer.nonfinite=stop")
    return (f"non-finite {what} at step {step}; stopped after {why}; saved the last good state to {path}; "
            "try a lower optim.lr (or trainer.clip_grad_norm)")


def resume_command(run_dir: Path, world_size: int) -> str:
    """The command that continues this run: the same overrides, in the same run directory (a new
    torchrun launch would get a new run id, hence a new directory, and start afresh)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.startswith(("hydra.run.dir=", "trainer.resume="))]
    args = " ".join(shlex.quote(arg) for arg in [*kept, f"hydra.run.dir={run_dir.resolve()}"])
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

    @contextmanager
    def captured(self):
        self.real, self.kept = sys.stderr, io.StringIO()
        shown = self.real if os.environ.get("RANK", "0") == "0" else None
        sys.stderr = _Tee(shown, self.kept)
        try:
            yield self
        except SystemExit as exit_:
            if sys.stderr is not self.real and exit_.code not in (0, None):
                self.release()
                hint = "Set the environment variable HYDRA_FULL_ERROR=1"
                text = " ".join(line.strip() for line in self.kept.getvalue().splitlines()
                                if line.strip() and not line.startswith(hint))
                _write_error_file(f"distsgd: error: {text}")
            raise
        finally:
            self.release()

    def release(self) -> None:
        sys.stderr = self.real


hydra_errors = _HydraErrors()
