"""What every study needs: train runs as distsgd-train would, read their curves, draw figures and
state an outcome."""

from __future__ import annotations

import json
import logging
import math
import shlex
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from distsgd import data, models
from distsgd import train as trainer
from distsgd.config import CONF_DIR, Config, hydra_override, to_config
from distsgd.metrics import read_scalars
from distsgd.stopping import Stopped

log = logging.getLogger("distsgd.studies")

# Every study fixes its constants (targets, windows, grids, thresholds) on the tuning seed and
# computes its verdict on the held-out seeds, which no tuning saw. Each seed s is data.seed=s (the
# data's generation and validation split) with trainer.seed=s (initialisation and batch order).
# Seeds 1 and 2 are not used: earlier versions of the studies looked at trainer seeds 1 and 2 and
# at data.seed=1.
TUNING_SEED = 0
HELD_OUT_SEEDS = (3, 4, 5)


def seeded(seed: int) -> list[str]:
    """The overrides that make a run seed ``seed``'s: its data and its training."""
    return [f"data.seed={seed}", f"trainer.seed={seed}"]


def seeds_text(seeds: Sequence[int]) -> str:
    """How a verdict names the seeds it was computed on."""
    return f"held-out seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (data.seed = trainer.seed)"


@dataclass
class Result:
    """One finished (or diverged) training run."""

    name: str
    path: Path
    overrides: list[str]
    final: dict[str, float]  # the metrics train.run returned; empty when it stopped early
    diverged: str | None  # why the run counts as diverged: stopped on non-finite values, or ended with them
    seconds: float
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # tag -> (steps, values)

    def curve(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        return self.curves.get(tag, (np.zeros(0, dtype=int), np.zeros(0)))

    def config(self) -> Config:
        return to_config(OmegaConf.load(self.path / ".hydra" / "config.yaml"))

    def train_set_losses(self, checkpoints: Sequence[Path]) -> list[float]:
        """The mean loss over the whole training set of the model in each of ``checkpoints`` (of
        this run): train/loss is one batch's, too noisy to rank runs by."""
        model, x, y, loss_fn = model_and_training_set(self.config())
        losses = []
        for path in checkpoints:
            model.load_state_dict(torch.load(path, weights_only=True)["model"])
            with torch.no_grad():
                losses.append(loss_fn(model(x), y).item())
        return losses

    def final_train_loss(self) -> float:
        """The finished model's training-set loss; inf for a run that diverged."""
        if self.diverged:
            return math.inf
        return self.train_set_losses([self.path / "checkpoints" / "last.pt"])[0]

    def checkpoints(self) -> tuple[np.ndarray, list[dict]]:
        """The steps and model state dicts of the run's checkpoints, oldest first, last.pt
        included (trainer.checkpoint_every with trainer.keep_checkpoints=0 keeps them all)."""
        found = {}
        for path in (self.path / "checkpoints").glob("*.pt"):
            state = torch.load(path, weights_only=True, map_location="cpu")
            found[state["step"]] = state["model"]
        steps = sorted(found)
        return np.array(steps), [found[step] for step in steps]


def model_and_training_set(config: Config) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, Callable]:
    """The model as ``config`` builds it (untrained), its whole training set as the model sees it
    (inputs, targets, on the CPU), and its loss function."""
    cpu = torch.device("cpu")
    dataset = data.load(config.data).place(cpu, True, 0)
    everything = torch.arange(len(dataset.x_train))
    x, y = replace(dataset, x_val=dataset.x_train, y_val=dataset.y_train).val_batch(everything, cpu)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task).eval()
    return model, x, y, models.loss_fn(dataset.task)


def validation_size(config: Config) -> int:
    """The validation samples that ``config``'s data hold out (figure titles say how many scored)."""
    return len(data.load(config.data).x_val)


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config that distsgd's commands compose from ``overrides`` of the shipped one."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def prepare(out: Path, name: str, overrides: Sequence[str], program: str = "distsgd-train") -> tuple[DictConfig, Path]:
    """The config and folder (``out/runs/<name>``) of a run of ``program`` with ``overrides``; its
    command line goes into ``out/commands.sh``, and its config where Hydra would keep it, so that
    distsgd-report reads the run's config and overrides."""
    run_dir = out / "runs" / name
    cfg = compose_config(overrides)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    # Quoted for Hydra (a folder named like a sweep job's, a=1,b=2, is grammar to it), then for the shell.
    with (out / "commands.sh").open("a") as f:
        f.write(shlex.join([program, hydra_override("hydra.run.dir", run_dir), *overrides]) + "\n")
    return cfg, run_dir


def train(out: Path, name: str, overrides: Sequence[str]) -> Result:
    """Train ``overrides`` (Hydra overrides of the shipped config) into ``out/runs/<name>``, as
    ``distsgd-train`` would, and record the equivalent command in ``out/commands.sh``. A run that
    stops on non-finite values is a result (it diverged), not an error."""
    overrides = list(overrides)
    cfg, run_dir = prepare(out, name, overrides)
    started = time.perf_counter()
    final, diverged = {}, None
    try:
        final = trainer.run(cfg, run_dir)
    except Stopped as stop:
        diverged = str(stop)
    if final and not math.isfinite(final.get("train/loss", 0.0)):
        diverged = f"ended with train/loss {final['train/loss']} after {final['train/skipped_steps']} skipped steps"
    curves = {tag: (np.array([e.step for e in events]), np.array([e.value for e in events]))
              for tag, events in read_scalars(run_dir / "tensorboard").items()}
    result = Result(name, run_dir, overrides, final, diverged, time.perf_counter() - started, curves)
    shown = {key: value for key, value in sorted(final.items()) if key.startswith("val/") or key == "train/loss"}
    log.warning("%s: %s (%.1f s)", name, "diverged" if diverged else
                ", ".join(f"{key} {value:.4g}" for key, value in shown.items()), result.seconds)
    return result


def train_all(out: Path, runs: dict[str, Sequence[str]], workers: int = 1) -> dict[str, Result]:
    """``train`` for each named run; with ``workers`` > 1 that many at a time, each in its own
    process with one thread (the runs are independent, and the results the same either way)."""
    out.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        return {name: train(out, name, overrides) for name, overrides in runs.items()}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_setup) as pool:
        futures = {name: pool.submit(train, out, name, overrides) for name, overrides in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def _worker_setup() -> None:
    torch.set_num_threads(1)
    quiet()


def quiet() -> None:
    """Only each run's one summary line (and warnings) on the console."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("distsgd").setLevel(logging.WARNING)


def quarter_decades(exponents: Sequence[int]) -> list[float]:
    """The rates 10 ** (k / 4): four to a decade, evenly spaced on a log axis."""
    return [10 ** (k / 4) for k in exponents]


def first_step_at_or_below(steps: np.ndarray, values: np.ndarray, target: float) -> float:
    """The first logged step whose value is <= target; inf when none is."""
    hits = np.flatnonzero(values <= target)
    return float(steps[hits[0]]) if len(hits) else math.inf


def save(fig: Figure, path: Path) -> Path:
    """The figure as a PNG of at most 256 colours: a third of the bytes for line plots, which the
    repository keeps (docs/reproductions/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    return path


def epoch_means(epochs: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the points logged within each epoch, placed at the epoch's middle."""
    bins = np.floor(epochs).astype(int)
    whole = np.unique(bins)
    return whole + 0.5, np.array([values[bins == e].mean() for e in whole])


@dataclass
class Outcome:
    """What a study found: its one-paragraph verdict (Markdown), whether the claim held at our
    scale, the numbers behind it and the figures that show it."""

    title: str
    verdict: str
    holds: bool
    numbers: dict = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "numbers.json").write_text(json.dumps(self.numbers, indent=2, default=float) + "\n")
        lines = [f"# {self.title}", "", self.verdict, "",
                 f"Claim {'holds' if self.holds else 'does not hold'} on the held-out seeds at this scale.", ""]
        lines += [f"![{path.stem}]({path.relative_to(out) if path.is_relative_to(out) else path})"
                  for path in self.figures]
        (out / "verdict.md").write_text("\n".join(lines) + "\n")
