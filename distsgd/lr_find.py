"""The LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks",
arXiv:1506.01186): train the run's initial model at a learning rate that grows by the same factor
every update, from ``lr_find.min_lr`` to ``lr_find.max_lr``, stop when the loss diverges, and read
rates off the curve.

    python -m distsgd.lr_find                                     # one process (or: distsgd-lr-find)
    torchrun --standalone --nproc_per_node=2 -m distsgd.lr_find   # the same sweep on 2 processes

It takes training's config and overrides, so the data order, initial model, optimizer and global
batch are the training run's; optim.lr, the schedule and the run's length are not used. Row i of
``lr_find.csv`` is update i: its rate and the global batch's loss measured before it (as
``train/loss``). Rank 0 writes ``lr_find.csv`` and ``lr_find.png`` into the run directory,
``outputs/lr_find/<id>`` unless ``hydra.run.dir`` says otherwise, and nothing else: no checkpoint,
and no config is changed.

The suggestion is the rate at which the loss falls fastest per unit of log lr. The losses are
smoothed by a moving average as they come (the stop rule needs it), which trails them: its slope at
row i shows the updates about lag(i) = beta/(1-beta) + 1/2 rows earlier (the mean age of its
weights, plus half a row because row i is measured before update i). The steepest descent is
therefore read back by that lag: row i's rate divided by the sweep's per-update factor to the
power lag(i). Read where it shows, it lands 1.7x too high on a 100-update sweep over 5 decades
(beta 0.8); docs/reproductions.md (section 1) measures both readings against grids of full runs.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distsgd import data, distributed, figures, models, optim, train
from distsgd.config import CONF_DIR, Config, ConfigError, LrFindConfig, to_config
from distsgd.distributed import Dist
from distsgd.metrics import flatten
from distsgd.step import TrainStep
from distsgd.stopping import hydra_errors, run_as_command

log = logging.getLogger("distsgd")

# The sweep stops once the smoothed loss exceeds this multiple of its lowest value so far (as
# fastai's and Lightning's do).
DIVERGENCE = 4.0
# The steepest descent is sought past this fraction of the sweep's log-lr range. Before it the
# moving average holds few losses and its slope is mostly their noise: about sigma / (n ln r) after
# n updates that each multiply the rate by r. A fixed fraction of the range keeps n ln r, hence
# that noise, the same whatever lr_find.steps (Lightning skips 10 of its 100 points alike).
SKIPPED_FRACTION = 0.1
# Unless the command names them: a sweep's folders are never a training run's.
DEFAULT_DIRS = {"hydra.run.dir": "outputs/lr_find/${distsgd_run_id:}",
                "hydra.sweep.dir": "multirun/lr_find/${distsgd_run_id:}"}


def rates(cfg: LrFindConfig) -> list[float]:
    """Update i's rate, min_lr * (max_lr / min_lr) ** (i / (steps - 1)): min_lr first, max_lr last."""
    return [cfg.min_lr * (cfg.max_lr / cfg.min_lr) ** (i / (cfg.steps - 1)) for i in range(cfg.steps)]


class SmoothedLoss:
    """The losses' exponential moving average with fastai's bias correction (without it the first
    values would be pulled toward 0), and the divergence rule on it."""

    def __init__(self, beta: float) -> None:
        self.beta, self.average, self.count, self.best = beta, 0.0, 0, math.inf

    def add(self, loss: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        smoothed = self.average / (1 - self.beta ** self.count)
        self.best = min(self.best, smoothed)
        return smoothed

    def diverged(self, smoothed: float) -> bool:
        return not math.isfinite(smoothed) or smoothed > DIVERGENCE * self.best


def lag(row: int, beta: float) -> float:
    """How many updates the smoothed loss's slope at ``row`` trails the rates that caused it: the
    mean age of the moving average's weights there (beta/(1-beta) once it is full, less before),
    plus 1/2 because row i is measured before update i, so that its change from row i-1 to row i+1
    is the work of updates i-1 and i. Exact while the loss is linear in the update over the
    averaging window; at a descent narrower than the window the steepest row lags less, and the
    rate read back lands up to a few updates early."""
    weights = beta ** np.arange(row + 1)
    return float(np.arange(row + 1) @ weights / weights.sum()) + 0.5


@dataclass(frozen=True)
class Suggestion:
    steepest: float  # the rate whose updates lower the loss fastest per unit of log lr, read back by the lag
    lowest: float  # the rate of the lowest smoothed loss, as fastai reads it; lowest / 10 is the other rule's rate
    rows: tuple[int, int]  # the smoothed curve's rows of steepest descent and of its lowest value


@dataclass(frozen=True)
class Sweep:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str  # why the sweep ended before lr_find.max_lr, "" if it did not
    global_batch: int

    @property
    def lowest(self) -> int:
        """The update with the lowest finite smoothed loss (0 if there is none)."""
        return int(np.argmin([s if math.isfinite(s) else math.inf for s in self.smoothed]))

    def rate_behind(self, row: int, beta: float) -> float:
        """The rate whose updates the smoothed slope at ``row`` shows: the sweep's rate ``lag``
        updates before that row's (the rates grow geometrically, so between the sweep's rows)."""
        ratio = self.lrs[1] / self.lrs[0]
        return self.lrs[row] * ratio ** -lag(row, beta)

    def suggest(self, cfg: LrFindConfig) -> Suggestion | None:
        """The rates the two rules read off the smoothed loss up to its minimum, or None when that
        minimum lies within the skipped start of the range (the loss never fell past it). The
        steepest descent is read back by the smoothing's lag: read where it shows, it lands
        beta/(1-beta) + 1/2 updates late, 1.7x too high on a 100-update sweep over 5 decades. The
        other rule is fastai's as it stands, whose factor 10 was chosen on their lagging curve."""
        first = math.ceil(SKIPPED_FRACTION * (cfg.steps - 1))
        if self.lowest <= first:
            return None
        # Only the last value can be non-finite (the sweep stops there); the slope needs finite ones.
        finite = [s for s in self.smoothed if math.isfinite(s)]
        slope = np.gradient(finite, np.log(self.lrs[:len(finite)]))
        steepest = first + int(np.argmin(slope[first:self.lowest + 1]))
        return Suggestion(self.rate_behind(steepest, cfg.beta), self.lrs[self.lowest], (steepest, self.lowest))

    def why_none(self, cfg: LrFindConfig) -> str:
        """Why ``suggest`` found no rate, and what can change that (lowering lr_find.min_lr only
        helps where the loss rose from the start)."""
        lowest = self.lowest
        if not math.isfinite(self.smoothed[0]):
            return ("the initial model's loss is not finite (row 1 is measured before any update), so no learning "
                    "rate can help: check the data (non-finite inputs or targets) and the model")
        where = f"the smoothed loss was lowest at lr {self.lrs[lowest]:.3g}, in the first {SKIPPED_FRACTION:.0%} " \
                "of the sweep"
        if not self.stopped:
            return (f"{where}, and it did not diverge up to lr_find.max_lr={cfg.max_lr:g}: no rate of the range "
                    "lowered the loss, and a lower lr_find.min_lr cannot help; raise lr_find.max_lr, or check "
                    "that the model can learn from the data")
        if len(self.lrs) <= 2 * math.ceil(SKIPPED_FRACTION * (cfg.steps - 1)) + 1:
            return (f"{where}, and it diverged soon after, at lr {self.lrs[-1]:.3g}: the range starts too high; "
                    "lower lr_find.min_lr")
        return (f"{where}; it stayed above that until it diverged at lr {self.lrs[-1]:.3g}, so no rate of the "
                "range lowered the loss and a lower lr_find.min_lr cannot help: more lr_find.steps (a finer sweep) "
                "or a larger global batch (less noise) may show a rate that does")


def sweep(config: Config, dataset: data.Dataset, dist: Dist) -> Sweep:
    """The range test on a joined process group; every rank returns the same Sweep."""
    # The first phase's batch (data.batch_milestones would grow it later in training), checked as training does.
    plan = train.Plan.of(config, len(dataset.x_train), dist.world_size)
    global_batch, seed = plan.batches.global_batch, config.trainer.seed
    batch, steps_per_epoch = plan.local_batch(0), plan.batches.steps_in(0)
    lrs = rates(config.lr_find)
    log.info("lr_find: world size %d; global batch %d, %d samples per rank and step; up to %d updates at lr "
             "%.3g to %.3g, x%.4g per update", dist.world_size, global_batch, batch, len(lrs), lrs[0], lrs[-1],
             lrs[1] / lrs[0])
    model, optimizer, scaler = train.build(config, dataset, dist, lrs[0])
    step = TrainStep(model, optimizer, scaler, models.loss_fn(dataset.task), config.trainer, dist,
                     global_batch=global_batch)
    # The training run's batches in its order, epoch after epoch for as long as the sweep lasts.
    batches = (b for epoch in itertools.count()
               for b in dataset.train_batches(epoch, 0, steps_per_epoch, batch, dist, seed))
    smoothing = SmoothedLoss(config.lr_find.beta)
    losses, smoothed = [], []
    for lr, (x, y) in zip(lrs, batches):
        result = step(x, y, lr, stop=False)
        losses.append(result.loss)
        smoothed.append(smoothing.add(result.loss))
        # result.loss is the global batch's loss, averaged over the ranks along with the gradients,
        # and result.skipped is decided from averaged values: the same numbers on every rank, so
        # every rank stops after the same update and none is left waiting in a collective that the
        # others have quit (fastai #2485 and Lightning #8983 hung on per-rank decisions).
        if result.skipped or smoothing.diverged(smoothed[-1]):
            why = (f"the smoothed loss passed {DIVERGENCE:g}x its lowest" if not result.skipped
                   else "a non-finite loss or gradient")
            return Sweep(lrs[:len(losses)], losses, smoothed, why, global_batch)
    return Sweep(lrs, losses, smoothed, "", global_batch)


def write_csv(result: Sweep, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        writer.writerows(zip(result.lrs, result.losses, result.smoothed))


def plot(result: Sweep, suggestion: Suggestion | None, path: Path) -> None:
    figure, ((ax,),) = figures.figure(width=7, height=4.5)
    ax.plot(result.lrs, result.losses, color="0.65", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed loss")
    if suggestion is not None:
        ax.axvline(result.lrs[suggestion.rows[0]], color="C2", linestyle=":", linewidth=1,
                   label="steepest descent of the smoothed loss")
        ax.axvline(suggestion.steepest, color="C2", linestyle="--",
                   label=f"suggested: the same, read back by its lag, {suggestion.steepest:.3g}")
        ax.axvline(suggestion.lowest / 10, color="C1", linestyle=":",
                   label=f"lowest smoothed loss / 10, {suggestion.lowest / 10:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="global batch loss",
           title=f"LR range test, global batch {result.global_batch}")
    figures.clamp_top(ax, result.smoothed)
    ax.legend()
    figure.savefig(path)


def describe(result: Sweep, suggestion: Suggestion, config: Config) -> list[str]:
    """What rank 0 prints: the sweep, the suggestion with its batch size, the other rule, how to use it."""
    stop = (f"stopped at lr {result.lrs[-1]:.3g}: {result.stopped}" if result.stopped
            else f"reached lr_find.max_lr={config.lr_find.max_lr:g} without diverging")
    # optim.lr is the rate at optim.reference_batch_size, and the rate used is proportional to it.
    scaling = optim.scaled_lr(config.optim, result.global_batch) / config.optim.lr
    scaled = (f" (optim.scaling={config.optim.scaling} takes it to {suggestion.steepest:.3g} at global batch "
              f"{result.global_batch})" if config.optim.scaling != "none" else "")
    return [f"lr_find: {len(result.lrs)} updates; {stop}",
            f"suggested lr: {suggestion.steepest:.3g} for global batch size {result.global_batch} "
            f"(steepest descent of the smoothed loss in log lr, shown at lr {result.lrs[suggestion.rows[0]]:.3g} "
            f"and read back by the smoothing's lag of {lag(suggestion.rows[0], config.lr_find.beta):.1f} updates)",
            f"alternative: {suggestion.lowest / 10:.3g} (lowest smoothed loss at lr {suggestion.lowest:.3g}, / 10)",
            f"nothing applied; to train at the suggestion: optim.lr={suggestion.steepest / scaling:.3g}{scaled}"]


def run(cfg: DictConfig | Config, run_dir: Path) -> Sweep:
    """The range test as the config says; rank 0 writes its CSV and plot into ``run_dir``."""
    config = cfg if isinstance(cfg, Config) else to_config(cfg)
    dataset = data.load(config.data)
    dist = distributed.init(config.trainer.device, config.trainer.collective_timeout_s)
    try:
        distributed.check_same_config({**flatten(asdict(config)), "run directory": str(run_dir)})
        result = sweep(config, dataset.place(dist.device, config.data.in_memory, config.data.num_workers), dist)
    finally:
        distributed.shutdown()
    suggestion = result.suggest(config.lr_find)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_csv(result, run_dir / "lr_find.csv")
        plot(result, suggestion, run_dir / "lr_find.png")
    if suggestion is None:
        raise ConfigError(f"lr_find: no rate to suggest: {result.why_none(config.lr_find)} "
                          f"(see {run_dir / 'lr_find.png'})")
    for line in describe(result, suggestion, config):
        log.info("%s", line)
    log.info("curve: %s, %s", run_dir / "lr_find.csv", run_dir / "lr_find.png")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_as_command(run, cfg, Path(HydraConfig.get().runtime.output_dir))


def with_default_dirs(arguments: list[str]) -> list[str]:
    """The command's arguments, plus this tool's run and sweep folders where they name none."""
    named = {argument.split("=", 1)[0].lstrip("+") for argument in arguments}
    return arguments + [f"{key}={value}" for key, value in DEFAULT_DIRS.items() if key not in named]


def main() -> None:
    """The console script and ``python -m distsgd.lr_find``."""
    sys.argv[1:] = with_default_dirs(sys.argv[1:])
    with hydra_errors.captured():
        _hydra_main()


if __name__ == "__main__":
    main()
