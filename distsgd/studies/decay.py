"""Learning-rate decay: at the same number of updates, a decaying rate ends with a lower training
loss than the best constant one, because constant-rate SGD stalls at a noise floor.

Claim. Bottou, Curtis and Nocedal (2018), "Optimization methods for large-scale machine learning"
(SIAM Review), Section 4.2, Theorems 4.6 and 4.7: with a fixed step size SGD's expected optimality gap
only falls to a floor proportional to the step size (and to the gradient noise), while diminishing
step sizes drive it to zero. The deep-learning recipes rely on this: He et al. (2016), "Deep
residual learning", Sections 3.4 and 4.2, divide the rate by 10 when the error plateaus (on
CIFAR-10 at 50% and 75% of training), and the error curves of their Figures 4 and 6 drop at each
division; Goyal et al. (2017), "Accurate, large minibatch SGD", divide it by 10 at fixed epochs;
Loshchilov and Hutter (2017), "SGDR", Eq. (5) and Figure 1, anneal it along a cosine.

Design. Two problems, each at a fixed budget of updates of batch 64 with plain SGD: multinomial
logistic regression on distsgd's synthetic set with noisy labels (data.noise=1.0: no model fits
every label, so the gradient noise does not vanish at the optimum, the setting of the theory; 1000
updates, rates 0.01 to 1 in half decades), and the MLP on digits, which can fit its 1437 training
images (600 updates, rates 0.178 to 1 in quarter decades). Five schedules (conf/schedule):
constant; step (x0.1 after each third); multistep (x0.1 at 50% and 75%, He et al.'s); exponential
(to a hundredth at the end); cosine (to 0). Each schedule is tuned over the same grid of initial
rates, and its runs at the best constant rate are reported too. Three seeds (trainer.seed:
initialisation and data order; the data stay the same). The loss compared is the mean over the
whole training set, of the last checkpoint and of one every 5% of the run for the curves; for the
convex problem, as the excess over the least loss the model can reach (full-batch L-BFGS from the
best run's weights).

Criterion: on the noise-floor problem, every decaying schedule, tuned over the grid, ends with a
lower training loss (mean over seeds) than the best constant rate, by more than the seed spread
(the larger max - min over seeds of the two settings compared). The digits MLP is reported beside
it as the case outside the theory's premise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from distsgd import figures
from distsgd.studies import runs

TITLE = "Learning-rate decay beats the best constant rate where SGD has a noise floor"

SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine")
COLORS = dict(zip(SCHEDULES, ["C0", "C1", "C2", "C3", "C4"]))


@dataclass(frozen=True)
class Problem:
    title: str
    overrides: tuple[str, ...]
    steps: int
    exponents: tuple[int, ...]  # the grid's initial rates are 10 ** (k / 4)
    convex: bool  # whether the least training loss is computed, to show the excess over it

    @property
    def lrs(self) -> list[float]:
        return runs.quarter_decades(self.exponents)


NOISE_FLOOR = Problem("logistic regression, noisy synthetic labels",
                      ("data=synthetic", "data.noise=1.0", "model=logistic", "optim=sgd"), 1000, (-8, -6, -4, -2, 0),
                      convex=True)
DIGITS = Problem("MLP on digits", ("data=digits", "model=mlp", "optim=sgd"), 600, (-3, -2, -1, 0), convex=False)


@dataclass(frozen=True)
class Scale:
    problems: dict[str, Problem]
    seeds: tuple[int, ...]
    workers: int
    curve_points: int | None  # checkpoints per curve run (the tuned runs, trained again); None: no curves


FULL = Scale({"noise_floor": NOISE_FLOOR, "digits": DIGITS}, (0, 1, 2), workers=2, curve_points=20)
QUICK = Scale({"noise_floor": replace(NOISE_FLOOR, steps=300, exponents=(-2,))}, (0,), workers=1, curve_points=None)


def schedules(steps: int) -> dict[str, list[str]]:
    """Each schedule's overrides for a run of ``steps`` updates (gammas from conf/schedule: 0.1)."""
    return {
        "constant": ["schedule=constant"],
        "step": ["schedule=step", f"schedule.step_size={-(-steps // 3)}"],  # rounded up: two divisions, not three
        "multistep": ["schedule=multistep", f"schedule.milestones=[{steps // 2},{3 * steps // 4}]"],
        "exponential": ["schedule=exponential", f"schedule.gamma={0.01 ** (1 / steps):.6g}"],
        "cosine": ["schedule=cosine"],
    }


def run_name(problem: str, schedule: str, lr: float, seed: int) -> str:
    return f"{problem}/{schedule}_lr{lr:.3g}_seed{seed}"


def overrides(problem: Problem, schedule: str, lr: float, seed: int) -> list[str]:
    return [*problem.overrides, *schedules(problem.steps)[schedule], f"optim.lr={lr:.4g}",
            f"trainer.max_steps={problem.steps}", f"trainer.seed={seed}", f"trainer.val_every={problem.steps // 10}"]


def run(out: Path, quick: bool = False) -> runs.Outcome:
    scale = QUICK if quick else FULL
    results = runs.train_all(out, {
        run_name(key, schedule, lr, seed): overrides(problem, schedule, lr, seed)
        for key, problem in scale.problems.items() for schedule in SCHEDULES for lr in problem.lrs
        for seed in scale.seeds}, scale.workers)
    numbers = {key: summarize(key, problem, scale.seeds, results) for key, problem in scale.problems.items()}
    holds = all(numbers["noise_floor"]["beats_best_constant"].values())
    figures = [plot_finals(out / "decay_final.png", scale, numbers)]
    if scale.curve_points:
        figures.insert(0, plot_curves(out / "decay_curves.png", scale, numbers, train_curve_runs(out, scale, numbers)))
    return runs.Outcome(TITLE, verdict(numbers, scale), holds, {**numbers, "holds": holds}, figures)


def curve_runs(numbers: dict, scale: Scale) -> dict[str, list[tuple[str, float, str]]]:
    """Per problem, the (schedule, rate, line style) the curves show: each schedule at its tuned
    rate, and the constant rate at the cosine's tuned rate where that is not the best constant one."""
    shown = {}
    for key in scale.problems:
        tuned = numbers[key]["tuned_lr"]
        shown[key] = [(s, tuned[s], "-") for s in SCHEDULES]
        if tuned["cosine"] != tuned["constant"]:
            shown[key].append(("constant", tuned["cosine"], "--"))
    return shown


def train_curve_runs(out: Path, scale: Scale, numbers: dict) -> dict[str, runs.Result]:
    """The runs the curves show, trained again (the same updates: runs are deterministic) with a
    checkpoint every 1/curve_points of the run, whose training-set loss the curves plot; the grid
    runs keep only their last, as every checkpoint is written to disk and synced."""
    seed = scale.seeds[0]
    return runs.train_all(out, {
        f"curves/{run_name(key, schedule, lr, seed)}": [
            *overrides(scale.problems[key], schedule, lr, seed),
            f"trainer.checkpoint_every={scale.problems[key].steps // scale.curve_points}", "trainer.keep_checkpoints=0"]
        for key, shown in curve_runs(numbers, scale).items() for schedule, lr, _ in shown}, scale.workers)


def least_loss(result: runs.Result) -> float:
    """The least training-set loss of a run's convex model: full-batch L-BFGS in float64 from the
    run's final weights."""
    model, x, y, loss_fn = runs.model_and_training_set(result.config())
    model.load_state_dict(torch.load(result.path / "checkpoints" / "last.pt", weights_only=True)["model"])
    model, x = model.double(), x.double()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return loss_fn(model(x), y).item()


def summarize(key: str, problem: Problem, seeds: tuple[int, ...], results: dict[str, runs.Result]) -> dict:
    """Per schedule, by initial rate (lists in the order of ``lrs``): the final training loss's mean
    and seed spread, the validation numbers; each schedule tuned over the grid, and whether it beats
    the best constant rate by more than the seed spread."""
    lrs = problem.lrs
    grid = {s: [[results[run_name(key, s, lr, seed)] for lr in lrs] for seed in seeds] for s in SCHEDULES}
    final = {s: np.array([[r.final_train_loss() for r in row] for row in rows]) for s, rows in grid.items()}
    mean = {s: losses.mean(axis=0) for s, losses in final.items()}
    spread = {s: losses.max(axis=0) - losses.min(axis=0) for s, losses in final.items()}
    tuned = {s: int(np.argmin(mean[s])) for s in SCHEDULES}
    constant = tuned["constant"]
    margin = {s: float(mean["constant"][constant] - mean[s][tuned[s]]) for s in SCHEDULES[1:]}
    noise = {s: float(max(spread["constant"][constant], spread[s][tuned[s]])) for s in SCHEDULES[1:]}
    best = min(SCHEDULES, key=lambda s: mean[s][tuned[s]])
    validation = {tag: {s: np.array([[r.final.get(tag, math.nan) for r in row] for row in rows]).mean(axis=0).tolist()
                        for s, rows in grid.items()} for tag in ("val/accuracy", "val/loss")}
    return {
        "title": problem.title, "steps": problem.steps, "lrs": lrs, "seeds": list(seeds),
        "least_loss": least_loss(grid[best][0][tuned[best]]) if problem.convex else None,
        "final_train_loss": {s: m.tolist() for s, m in mean.items()},
        "seed_spread": {s: d.tolist() for s, d in spread.items()},
        "final_train_loss_by_seed": {s: f.tolist() for s, f in final.items()},
        "val_accuracy": validation["val/accuracy"], "val_loss": validation["val/loss"],
        "tuned_lr": {s: lrs[i] for s, i in tuned.items()},
        "tuned_loss": {s: float(mean[s][i]) for s, i in tuned.items()},
        "at_best_constant_lr": {s: float(mean[s][constant]) for s in SCHEDULES},
        "margin_over_best_constant": margin, "seed_spread_compared": noise,
        "beats_best_constant": {s: margin[s] > noise[s] for s in SCHEDULES[1:]},
    }


def loss_curve(result: runs.Result, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The training-set loss at each of the run's checkpoints, by update."""
    directory = result.path / "checkpoints"
    paths = sorted(directory.glob("step_*.pt"))
    at = [int(path.stem.removeprefix("step_")) for path in paths] + [steps]
    return np.array(at), np.array(result.train_set_losses([*paths, directory / "last.pt"]))


def plot_curves(path: Path, scale: Scale, numbers: dict, results: dict[str, runs.Result]) -> Path:
    """Per problem, the training-set loss of the runs ``curve_runs`` names (first seed), their rates beneath."""
    fig, axes = figures.figure(ncols=len(scale.problems), nrows=2, width=5.2, height=3.0)
    for column, (key, shown) in enumerate(curve_runs(numbers, scale).items()):
        problem, seed, least = scale.problems[key], scale.seeds[0], numbers[key]["least_loss"] or 0.0
        for schedule, lr, style in shown:
            result = results[f"curves/{run_name(key, schedule, lr, seed)}"]
            steps, losses = loss_curve(result, problem.steps)
            axes[0, column].plot(steps, losses - least, style, color=COLORS[schedule], label=f"{schedule}, lr {lr:.3g}")
            axes[1, column].plot(*result.curve("train/lr"), style, color=COLORS[schedule])
        excess = " - least" if problem.convex else ""
        axes[0, column].set(yscale="log", ylabel=f"training-set loss{excess}",
                            title=f"{problem.title}\n{problem.steps} updates of batch 64, seed {seed}")
        axes[1, column].set(yscale="log", xlabel="update", ylabel="learning rate")
        axes[0, column].legend(fontsize=7)
    return runs.save(fig, path)


def plot_finals(path: Path, scale: Scale, numbers: dict) -> Path:
    """Per problem, each schedule's final training-set loss against its initial rate: mean over
    seeds, bars from the lowest to the highest seed, a star at the tuned rate."""
    fig, axes = figures.figure(ncols=len(scale.problems), width=5.6, height=3.8)
    for ax, (key, problem) in zip(axes[0], scale.problems.items()):
        n = numbers[key]
        least, lrs = n["least_loss"] or 0.0, np.array(n["lrs"])
        for offset, schedule in enumerate(SCHEDULES):
            by_seed = np.array(n["final_train_loss_by_seed"][schedule]) - least
            mean = by_seed.mean(axis=0)
            shifted = lrs * 1.04 ** (offset - 2)  # side by side, so that the bars do not hide each other
            ax.errorbar(shifted, mean, yerr=[mean - by_seed.min(axis=0), by_seed.max(axis=0) - mean], marker="o",
                        markersize=3, capsize=2, color=COLORS[schedule], label=schedule)
            tuned = n["lrs"].index(n["tuned_lr"][schedule])
            ax.plot(shifted[tuned], mean[tuned], "*", markersize=12, color=COLORS[schedule])
        excess = " - least" if problem.convex else ""
        ax.set(xscale="log", yscale="log", xlabel="initial learning rate", ylabel=f"final training-set loss{excess}",
               title=f"{problem.title}: {len(n['seeds'])} seeds, star = tuned")
        ax.set_xticks(lrs, [f"{lr:.3g}" for lr in lrs], minor=False)
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=7)
    return runs.save(fig, path)


def verdict(numbers: dict, scale: Scale) -> str:
    return " ".join(describe(problem, numbers[key]) for key, problem in scale.problems.items())


def describe(problem: Problem, n: dict) -> str:
    """One problem's part of the verdict; on the convex problem, losses as their excess over the least."""
    least, decays = n["least_loss"] or 0.0, SCHEDULES[1:]
    above = f" above the least training loss ({least:.5g})" if problem.convex else ""
    tuned = ", ".join(f"{s} {n['tuned_loss'][s] - least:.2g} (from {n['tuned_lr'][s]:.3g})"
                      for s in sorted(decays, key=n["tuned_loss"].get))
    margins = [n["margin_over_best_constant"][s] for s in decays]
    started = [n["at_best_constant_lr"][s] - least for s in decays]
    accuracy = [n["val_accuracy"][s][n["lrs"].index(n["tuned_lr"][s])] for s in SCHEDULES]
    return (
        f"{problem.title[0].upper()}{problem.title[1:]} ({problem.steps} updates, {len(n['seeds'])} seeds): the best "
        f"constant rate, {n['tuned_lr']['constant']:.3g}, ends at loss "
        f"{n['tuned_loss']['constant'] - least:.2g}{above}; "
        f"each decay tuned over the same grid ends at {tuned}: {sum(n['beats_best_constant'].values())} of "
        f"{len(decays)} beat the best constant rate by more than the seed spread (its loss minus theirs "
        f"{min(margins):.2g} to {max(margins):.2g}, against a spread of at most "
        f"{max(n['seed_spread_compared'].values()):.2g}). Started from the best constant rate instead, the decays end "
        f"at {min(started):.2g} to {max(started):.2g}. Validation accuracy at the tuned rates: constant "
        f"{accuracy[0]:.3f}, decays {min(accuracy[1:]):.3f} to {max(accuracy[1:]):.3f}.")
