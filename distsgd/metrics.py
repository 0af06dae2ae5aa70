"""Logs: TensorBoard scalars and a progress bar on rank 0, a no-op logger everywhere else."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm


class NullLogger:
    """What non-writing ranks get, so the loop never asks who it is."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def progress(self, step: int, **shown: float) -> None:
        pass

    def hparams(self, hparams: dict, final_metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir: Path, total_steps: int, first_step: int = 0):
        # Imported here: only rank 0 pays for TensorBoard's start-up.
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides the points an interrupted run logged past its checkpoint, so each
        # curve keeps one value per step.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step or None)
        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, **shown: float) -> None:
        if shown:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def hparams(self, hparams: dict, final_metrics: dict[str, float]) -> None:
        """One HParams entry for the run; its metrics are the scalar tags already logged, so the
        dashboard compares a sweep on the final values of the very curves shown elsewhere."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for summary in hparams_summary(hparams, final_metrics):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested config as flat ``group.key`` entries of the types the HParams plugin accepts."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


class Throughput:
    """Training samples per second between logged steps; time spent validating is left out."""

    def __init__(self, samples_before: int) -> None:
        # A resumed run has trained from its first step on, not after it, when it first logs.
        self.last_samples, self.last_time = samples_before, time.perf_counter()
        self.excluded = 0.0

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def samples_per_sec(self, step: int, samples: int) -> float | None:
        """Since the last call, ``samples`` being all the samples trained on up to now (None at
        step 0: its time is mostly start-up)."""
        now = time.perf_counter()
        rate = (samples - self.last_samples) / (now - self.last_time - self.excluded) if step else None
        self.last_samples, self.last_time, self.excluded = samples, now, 0.0
        return rate


def quiet_console(is_main: bool) -> None:
    """Rank 0 alone talks on the console; every rank keeps everything in its own log file. Records
    logged with ``extra={"file_only": True}`` (stopping.FILE_ONLY) stay off the console."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # the console; FileHandler is a subclass
            handler.addFilter(lambda record: is_main and not getattr(record, "file_only", False))
