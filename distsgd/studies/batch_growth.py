"""Batch growth instead of decay (Smith, Kindermans, Ying, Le 2017, "Don't Decay the Learning Rate,
Increase the Batch Size", arXiv:1711.00489, Section 5.1, Figures 1-3).

The claim: where a schedule divides the learning rate by k, multiplying the batch by k instead
gives the same training and test curves against epochs (the noise scale of SGD, about
lr * N / B, falls the same way), in fewer parameter updates. Their "hybrid" grows the batch at
the first step and decays the rate after it, and matches too.

Our design: distsgd's synthetic classification set (16384 samples, 20% held out, labels of a
random linear teacher with noise 0.5 on its logits, so that SGD's noise matters), the default
MLP, momentum SGD at lr 0.1 from batch 32, 15 epochs with k = 4 at epochs 5 and 10: decaying the
rate (schedule=multistep, gamma 1/4, at constant batch), growing the batch (data.batch_milestones,
data.batch_growth=4, at constant rate), the hybrid (batch x4 at epoch 5, rate /4 at epoch 10), and
a constant rate and batch as the control that shows the schedule matters at all; three seeds
each. Growth matches decay when the mean final validation accuracy differs by at most 0.5
percentage points and the mean final training loss (whole training set, from last.pt) by at
most 5%; the claim holds when growth matches in fewer steps and the constant control ends more
than 0.5 points below decay.

Seeds. The data set, the rate, the batches, the milestones and the tolerances were fixed on
data.seed=0 with trainer seeds 0-2, which an earlier version also used for the verdict; the
tuning seed (runs.TUNING_SEED) is trained again and reported beside the verdict, which is computed
on the held-out seeds (runs.HELD_OUT_SEEDS: each a new data set, teacher and initialisation). Each
schedule runs on the same seeds, so the means compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distsgd import data, figures
from distsgd.studies import runs

TITLE = "Batch growth instead of learning-rate decay (Smith et al. 2017)"
BASE_BATCH = 32
LR = 0.1
GROWTH = 4
STYLE = {"decay": ("C0", "-"), "grow": ("C3", "--"), "hybrid": ("C2", ":"), "constant": ("0.6", "-")}
LABELS = {"decay": f"decay: lr /{GROWTH} at each milestone, batch {BASE_BATCH}",
          "grow": f"grow: lr {LR:g}, batch x{GROWTH} at each milestone",
          "hybrid": f"hybrid: batch x{GROWTH} at the first, lr /{GROWTH} at the second",
          "constant": f"constant: lr {LR:g}, batch {BASE_BATCH}"}


@dataclass(frozen=True)
class Setting:
    data: tuple[str, ...]
    epochs: int
    milestones: tuple[int, int]  # the epochs where the rate falls or the batch grows k-fold
    schedules: tuple[str, ...]
    seeds: tuple[int, ...]  # held-out: the verdict's
    workers: int
    # A run matches the decaying rate when its mean final val accuracy is this close to decay's
    # and its mean final training loss within this fraction of decay's.
    accuracy_tolerance: float
    loss_tolerance: float


# Fixed on the tuning seed, as the rate, batches and milestones are.
FULL = Setting(("data=synthetic", "data.num_samples=16384", "data.noise=0.5"), 15, (5, 10),
               ("decay", "grow", "hybrid", "constant"), runs.HELD_OUT_SEEDS, 2, 0.005, 0.05)
# One seed, 819 validation samples (1 point = 8 of them) and 6 epochs, far from converged: looser.
QUICK = Setting(("data=synthetic", "data.num_samples=4096", "data.noise=0.5"), 6, (2, 4), ("decay", "grow"),
                runs.HELD_OUT_SEEDS[:1], 1, 0.02, 0.1)


def run(out: Path, quick: bool = False) -> runs.Outcome:
    setting = QUICK if quick else FULL
    seeds = setting.seeds if quick else (*setting.seeds, runs.TUNING_SEED)
    trained = runs.train_all(out, {f"{name}_seed{seed}": overrides(setting, name, seed)
                                   for name in setting.schedules for seed in seeds}, setting.workers)
    results = {name: [trained[f"{name}_seed{seed}"] for seed in setting.seeds] for name in setting.schedules}
    numbers = summarize(setting, results)
    holds = judge(numbers)
    if not quick:
        tuning = replace(setting, seeds=(runs.TUNING_SEED,))
        numbers["tuning"] = summarize(tuning, {name: [trained[f"{name}_seed{runs.TUNING_SEED}"]]
                                               for name in setting.schedules})
        numbers["tuning"]["holds"] = judge(numbers["tuning"])
    return runs.Outcome(TITLE, verdict(numbers, holds), holds, numbers, [plot(out, results)])


def judge(numbers: dict) -> bool:
    """Growth matches decay in fewer steps, and the control shows that annealing matters; without
    the control (quick) nothing shows that, and the rest still holds or not."""
    return (matches(numbers, "grow") and numbers["steps"]["grow"] < numbers["steps"]["decay"]
            and annealing_matters(numbers) is not False)


def schedule_overrides(setting: Setting, name: str) -> list[str]:
    """How each run anneals: the rate, the batch, the batch then the rate, or neither."""
    first, second = setting.milestones
    decay = ["schedule=multistep", f"schedule.gamma={1 / GROWTH:g}"]
    grow = [f"data.batch_growth={GROWTH}"]
    return {"decay": [*decay, f"schedule.milestones=[{first},{second}]"],
            "grow": [*grow, f"data.batch_milestones=[{first},{second}]"],
            "hybrid": [*grow, f"data.batch_milestones=[{first}]", *decay, f"schedule.milestones=[{second}]"],
            "constant": []}[name]


def overrides(setting: Setting, name: str, seed: int) -> list[str]:
    # log_every 2 leaves a dozen points in each epoch of the largest batch; val_every about one.
    return [*setting.data, "optim=momentum", f"optim.lr={LR:g}", f"data.global_batch_size={BASE_BATCH}",
            *schedule_overrides(setting, name), "schedule.unit=epochs", f"trainer.max_epochs={setting.epochs}",
            *runs.seeded(seed), "trainer.log_every=2", "trainer.val_every=25"]


def batch_schedule(result: runs.Result) -> data.BatchSchedule:
    config = result.config()
    return data.BatchSchedule.of(config.data, data.train_size(config.data))


def epochs_of(batches: data.BatchSchedule, steps: np.ndarray) -> np.ndarray:
    return np.array([float(batches.epochs_at(int(step))) for step in steps])


def summarize(setting: Setting, results: dict[str, list[runs.Result]]) -> dict:
    accuracy = {name: [r.final["val/accuracy"] if not r.diverged else float("nan") for r in rs]
                for name, rs in results.items()}
    train_loss = {name: [r.final_train_loss() if not r.diverged else float("nan") for r in rs]
                  for name, rs in results.items()}
    steps = {name: batch_schedule(rs[0]).first_step(setting.epochs) for name, rs in results.items()}
    return {"base_batch": BASE_BATCH, "lr": LR, "growth": GROWTH, "milestones": list(setting.milestones),
            "epochs": setting.epochs, "seeds": list(setting.seeds), "steps": steps,
            "accuracy": accuracy, "accuracy_mean": {name: float(np.mean(a)) for name, a in accuracy.items()},
            "accuracy_sd": {name: float(np.std(a, ddof=min(1, len(a) - 1))) for name, a in accuracy.items()},
            "train_loss": train_loss, "train_loss_mean": {name: float(np.mean(v)) for name, v in train_loss.items()},
            "accuracy_tolerance": setting.accuracy_tolerance, "loss_tolerance": setting.loss_tolerance}


def annealing_matters(numbers: dict) -> bool | None:
    """Whether the constant control ends below decay by more than the tolerance; None without it."""
    accuracy = numbers["accuracy_mean"]
    if "constant" not in accuracy:
        return None
    return accuracy["constant"] < accuracy["decay"] - numbers["accuracy_tolerance"]


def matches(numbers: dict, name: str) -> bool:
    """Whether run ``name`` matches the decaying rate by the stated criterion."""
    accuracy, loss = numbers["accuracy_mean"], numbers["train_loss_mean"]
    return (abs(accuracy[name] - accuracy["decay"]) <= numbers["accuracy_tolerance"]
            and abs(loss[name] - loss["decay"]) <= numbers["loss_tolerance"] * loss["decay"])


def plot(out: Path, results: dict[str, list[runs.Result]]) -> Path:
    fig, axes = figures.figure(ncols=2, nrows=2)
    for name, rs in results.items():
        batches = batch_schedule(rs[0])
        color, ls = STYLE[name]
        for i, result in enumerate(rs):
            # The control behind the others, which overlay each other.
            style = dict(color=color, ls=ls, lw=1.2, zorder=1 if name == "constant" else 2)
            steps, lr = result.curve("train/lr")
            _, batch = result.curve("train/global_batch_size")
            if i == 0:
                axes[0, 0].plot(epochs_of(batches, steps), lr / batch * BASE_BATCH / LR, label=LABELS[name],
                                drawstyle="steps-post", **style)
            steps, loss = result.curve("train/loss")
            epochs, mean_loss = runs.epoch_means(epochs_of(batches, steps), loss)
            axes[0, 1].plot(epochs, mean_loss, **style)
            axes[1, 0].plot(runs.epoch_means(epochs_of(batches, steps), steps)[1], mean_loss, **style)
            steps, accuracy = result.curve("val/accuracy")
            # A validation after update t belongs to the epoch that update is in; the one at step 0 to none.
            after = epochs_of(batches, steps)
            axes[1, 1].plot(*runs.epoch_means(np.ceil(after[1:]) - 1, accuracy[1:]), **style)
    labels = ((axes[0, 0], "epoch", "lr / batch, relative to the start", "Noise scale lr N / B (annealings coincide)"),
              (axes[0, 1], "epoch", "train loss (mean over each epoch)",
               "Training loss against epochs (held-out seeds)"),
              (axes[1, 0], "optimizer step", "train loss (mean over each epoch)", "Training loss against steps"),
              (axes[1, 1], "epoch", "val accuracy (mean over each epoch)", "Validation accuracy against epochs"))
    for ax, xlabel, ylabel, title in labels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[0, 0].set_yscale("log")
    finals = [r.final["val/accuracy"] for rs in results.values() for r in rs if not r.diverged]
    if finals:  # zoomed on where the runs end
        axes[1, 1].set_ylim(min(finals) - 0.05, max(finals) + 0.03)
    axes[0, 0].legend(fontsize=8, loc="lower left")
    return runs.save(fig, out / "batch_growth.png")


def verdict(numbers: dict, holds: bool) -> str:
    steps, accuracy, sd = numbers["steps"], numbers["accuracy_mean"], numbers["accuracy_sd"]
    loss, k, (first, second) = numbers["train_loss_mean"], numbers["growth"], numbers["milestones"]
    b0 = numbers["base_batch"]
    ended = {name: f"{accuracy[name]:.2%} val accuracy (sd {sd[name]:.2%}) and {loss[name]:.4f} training loss "
                   f"in {steps[name]} steps" for name in steps}
    text = (f"On the {runs.seeds_text(numbers['seeds'])}, {numbers['epochs']} epochs: dividing the rate by {k} at "
            f"epochs {first} and {second} at batch {b0} ends at {ended['decay']}; multiplying the batch by {k} "
            f"there instead ({b0}, {b0 * k}, {b0 * k * k}) at lr {numbers['lr']:g} ends at {ended['grow']}, "
            f"{steps['decay'] / steps['grow']:.2f}x fewer steps, and "
            f"{'matches' if matches(numbers, 'grow') else 'does not match'} (criterion: val accuracy means within "
            f"{numbers['accuracy_tolerance'] * 100:g} pp, training loss means within "
            f"{numbers['loss_tolerance']:.0%}). ")
    if "hybrid" in steps:
        text += (f"The hybrid (batch x{k} at epoch {first}, rate /{k} at {second}) ends at {ended['hybrid']} and "
                 f"{'matches' if matches(numbers, 'hybrid') else 'does not match'}. ")
    if "constant" in steps:
        text += (f"The control at constant rate and batch ends at {ended['constant']}: annealing the noise "
                 f"{'matters' if annealing_matters(numbers) else 'does not matter'} here. ")
    if "tuning" in numbers:
        t = numbers["tuning"]
        text += (f"On the tuning seed {t['seeds'][0]}, where the constants were fixed: decay "
                 f"{t['accuracy_mean']['decay']:.2%}, grow {t['accuracy_mean']['grow']:.2%} "
                 f"({'matches' if matches(t, 'grow') else 'does not match'}), criterion "
                 f"{'met' if t['holds'] else 'not met'}. ")
    return text + f"The claim {'holds' if holds else 'does not hold'} on the held-out seeds."
