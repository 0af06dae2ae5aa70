"""Logs: TensorBoard scalars and a progress bar on rank 0, a no-op logger everywhere else."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

# The best value so far of a validation curve, logged beside it: (curve, better of two values).
BEST = {"val/loss": ("val/best_loss", min), "val/accuracy": ("val/best_accuracy", max)}
# Rank 0 writes it into the folder of a run that diverged (stopping.mark_diverged); reports and the
# sweep's closing line read it.
DIVERGED_MARKER = "diverged.json"
# The metrics an HParams entry leads with: TensorBoard's HParams dashboard shows the first five
# metrics of an experiment and hides the rest until asked.
LEADING_METRICS = ("val/loss", "val/accuracy", "val/best_loss", "val/best_accuracy", "train/loss")


class NullLogger:
    """What non-writing ranks get, so the loop never asks who it is."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def progress(self, step: int, **shown: float) -> None:
        pass

    def text(self, step: int, tag: str, markdown: str) -> None:
        pass

    def hparams(self, hparams: dict, final_metrics: dict[str, float], varied: Sequence[str] = (),
                config_text: str = "", status: str = "STATUS_SUCCESS") -> None:
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
        from tensorboard.compat.proto.summary_pb2 import Summary

        # One event holding all of a step's values, each as add_scalar writes it: add_scalar itself
        # costs about 25 us of Python per value, which per-layer statistics multiply by 3 per tensor.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])
        self.writer.file_writer.add_summary(summary, step)

    def progress(self, step: int, **shown: float) -> None:
        if shown:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def text(self, step: int, tag: str, markdown: str) -> None:
        """In TensorBoard's Text dashboard, which renders Markdown."""
        self.writer.add_text(tag, markdown, step)

    def hparams(self, hparams: dict, final_metrics: dict[str, float], varied: Sequence[str] = (),
                config_text: str = "", status: str = "STATUS_SUCCESS") -> None:
        """One HParams entry for the run (see ``hparams_entry``), and the whole config, as
        ``config_text``, in the Text dashboard (tag ``config``). The entry's metrics are the scalar
        tags already logged, so the dashboard compares a sweep on the final values of the very
        curves shown elsewhere, and on the best validation values: LEADING_METRICS first, whatever
        order the run logged its tags in (a resumed run logs train/* before its first validation).
        ``status``: how the run ended (TensorBoard's Status name: FAILURE for a diverged run)."""
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
        from tensorboard.plugins.hparams.api_pb2 import Status
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metrics = {tag: final_metrics[tag] for tag in LEADING_METRICS if tag in final_metrics} | final_metrics
        experiment, start, end = hparams_summary(hparams_entry(hparams, varied), metrics)
        [value] = experiment.value
        data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for info in data.experiment.hparam_infos:
            info.differs = True  # they are what the runs vary
        value.metadata.plugin_data.content = data.SerializeToString()
        [value] = end.value
        data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
        data.session_end_info.status = Status.Value(status)
        value.metadata.plugin_data.content = data.SerializeToString()
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        if config_text:
            self.writer.add_text("config", f"```yaml\n{config_text}```")

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def hparams_entry(config: dict, varied: Sequence[str]) -> dict:
    """The HParams entry of a run whose flat ``config`` varies the keys ``varied`` (a group stands
    for its ``name`` key): those keys alone, in that order. TensorBoard's HParams dashboard (2.21)
    shows the first five keys of an entry and the first five metrics: an entry that listed every
    key would show unvaried ones before the metrics, and an entry cannot mark a key as hidden. The
    whole config is in the Text dashboard instead (``TensorBoardLogger.hparams``)."""
    keys = dict.fromkeys(key if key in config else f"{key}.name" for key in varied)
    return {key: config[key] for key in keys if key in config}


def read_scalars(log_dir: Path) -> dict:
    """Every scalar curve in a TensorBoard folder, as {tag: [ScalarEvent(wall_time, step, value)]},
    through TensorBoard's own loader: each step once, as the newest writer left it (a resumed run
    purges the points past its checkpoint), and none dropped ({"scalars": 0} keeps them all)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    tensorboard_log = logging.getLogger("tensorboard")
    level = tensorboard_log.level
    # It warns of every purge, which is how a resumed run keeps one point per step: no news here.
    tensorboard_log.setLevel(logging.ERROR)
    try:
        events.Reload()
    finally:
        tensorboard_log.setLevel(level)
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


class BestValues:
    """The best finite value so far of each validation curve, under its BEST tag (in checkpoints,
    so that a resumed run's best covers the steps before the resume, wherever it resumes)."""

    def __init__(self, state: dict[str, float] | None = None) -> None:
        self.best = dict(state or {})

    def update(self, values: dict[str, float]) -> dict[str, float]:
        """Fold in a validation's values; the best ones so far, to log beside them."""
        for tag in BEST.keys() & values.keys():
            best_tag, better = BEST[tag]
            if math.isfinite(values[tag]):
                self.best[best_tag] = better(self.best.get(best_tag, values[tag]), values[tag])
        return dict(self.best)

    def state_dict(self) -> dict[str, float]:
        return dict(self.best)


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


# Dense bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets (without sparsity), by a
# substring of torch.cuda.get_device_name(); the first match counts, so the PCIe H100 comes first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0))


def peak_flops(device: torch.device, peak_tflops: float | None) -> float | None:
    """One device's peak FLOP/s: trainer.peak_tflops, else PEAK_TFLOPS for a GPU it names; None if unknown."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    import torch  # here: distsgd-report reads these logs without torch

    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


@dataclass(frozen=True)
class TokenRates:
    """A language model's samples/s in tokens/s and, against the devices' peak, as model FLOPs
    utilisation: train/mfu = tokens/s x FLOPs per token / (world size x one device's peak)."""

    tokens_per_sample: int
    flops_per_token: int | None
    peak_flops: float | None  # all devices together; None: no train/mfu

    def of(self, samples_per_sec: float) -> dict[str, float]:
        tokens = samples_per_sec * self.tokens_per_sample
        rates = {"train/tokens_per_sec": tokens}
        if self.flops_per_token and self.peak_flops:
            rates["train/mfu"] = tokens * self.flops_per_token / self.peak_flops
        return rates


class OnRankZero(logging.Filter):
    """Hydra's own console lines (the sweeper's, the launcher's) on rank 0 only: every rank of a
    torchrun job runs Hydra, before any process group exists (conf/config.yaml, hydra_logging)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from distsgd.distributed import launch_rank

        return launch_rank() == 0


def quiet_console(is_main: bool) -> None:
    """Rank 0 alone talks on the console; every rank keeps everything in its own log file. Records
    logged with ``extra={"file_only": True}`` (stopping.FILE_ONLY) stay off the console."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # the console; FileHandler is a subclass
            handler.addFilter(lambda record: is_main and not getattr(record, "file_only", False))
