"""Adaptive methods (AdaGrad, RMSprop, Adam) against SGD with momentum.

Claim: Wilson, Roelofs, Stern, Srebro and Recht (2017), "The Marginal Value of Adaptive Gradient
Methods in Machine Learning". Section 3.3 constructs a linearly separable binary least-squares
problem with more features than samples on which gradient descent from w = 0 (and SGD) finds the
minimum-norm solution, which labels every new point correctly, while AdaGrad, RMSprop and Adam from
w = 0 converge to a solution proportional to sign(X^T y), which labels every new point +1, so their
test error is the fraction of negative labels (Lemma 3.1 and the discussion after it). Section 4
(Figures 1-4) reports that on deep networks the adaptive methods, each with its learning rate tuned,
often make faster initial progress but reach worse test accuracy than tuned SGD with momentum.

Design. (a) Digits (data=digits, model=mlp, a cosine schedule): SGD with momentum 0.9, AdaGrad,
RMSprop and Adam, each over the same log grid of learning rates and several seeds; each method's
lr is the one with the best mean final validation accuracy; speed is the number of steps to a
validation accuracy target. (b) The Section 3.3 problem, built as the paper builds it: y_i = +1
with probability p > 1/2 (redrawn until there are more positives than negatives, which the lemma
needs), x_i1 = y_i, x_i2 = x_i3 = 1, and x_ij = 1 for j = 4 + 5(i - 1), ..., 4 + 5(i - 1) + 2(1 - y_i)
(one unique feature for a positive sample, five for a negative one), 0 otherwise, d = 6n. Test
points follow the same rule with their unique features in columns that no training sample uses
(as for a sample i > n), where every method's weights stay 0. distsgd trains it as least squares
(data=npz, float targets) with model=linear without a bias from w = 0 (model.bias=false,
model.init=zeros): GD on the full batch, SGD on small batches, and AdaGrad, RMSprop and Adam on
the full batch, the setting of the lemma. Test accuracy (sign agreement) comes from the weights in
the runs' checkpoints.

Seeds. (a) Each method's lr is tuned over the grid on the tuning seed (runs.TUNING_SEED: its
validation split scores the grid), and the verdict compares the methods at those rates on the
held-out seeds (runs.HELD_OUT_SEEDS: other validation splits and initialisations); the grid, the
budget and the accuracy target were fixed on data.seed=0 (with trainer seeds 0-2, which an
earlier version also used for the verdict, so that one validation set both tuned and scored).
(b) The rates of WILSON_LRS and the problem's size were fixed on the problem of the tuning seed;
the verdict is computed on the problems of the held-out seeds (other labels), and holds when the
construction's outcome is exact on each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distsgd import figures
from distsgd.config import hydra_override
from distsgd.studies import runs

TITLE = "Adaptive methods against SGD with momentum: digits, and the construction of Wilson et al. (2017)"
ADAPTIVE = ("adagrad", "rmsprop", "adam")
METHODS = ("momentum", *ADAPTIVE)  # optim options; momentum is SGD with momentum 0.9
LABELS = {"momentum": "SGD + momentum 0.9", "adagrad": "AdaGrad", "rmsprop": "RMSprop", "adam": "Adam",
          "gd": "GD (full batch)", "sgd": "SGD"}
COLORS = {"momentum": "C0", "adagrad": "C1", "rmsprop": "C2", "adam": "C3", "gd": "C0", "sgd": "C4"}


@dataclass(frozen=True)
class Digits:
    methods: tuple[str, ...]  # momentum first: the others are measured against it
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]  # held-out: the verdict's; each method's lr is tuned on runs.TUNING_SEED
    steps: int
    val_every: int
    target_accuracy: float
    width: int = 64


@dataclass(frozen=True)
class Wilson:
    n: int  # training samples; d = 6n features
    p: float  # probability of the label +1
    test_samples: int
    steps: int
    sgd_batch: int
    lrs: dict  # by run: gd and sgd (optim=sgd), and the adaptive methods
    checkpoint_every: int
    seeds: tuple[int, ...]  # the problems of the verdict (the problem's own generator seeds)
    seed: int = 0  # the problem that make_wilson draws


@dataclass(frozen=True)
class Setting:
    digits: Digits
    wilson: Wilson


# Fixed on the tuning seed, as the grids, budgets and targets below are.
WILSON_LRS = {"gd": 0.2, "sgd": 0.05, "adagrad": 0.1, "rmsprop": 0.01, "adam": 0.01}
FULL = Setting(Digits(methods=METHODS, lrs=(0.003, 0.01, 0.03, 0.1, 0.3), seeds=runs.HELD_OUT_SEEDS, steps=660,
                      val_every=11, target_accuracy=0.95),
               Wilson(n=50, p=0.55, test_samples=1000, steps=500, sgd_batch=10, lrs=WILSON_LRS, checkpoint_every=10,
                      seeds=runs.HELD_OUT_SEEDS))
QUICK = Setting(Digits(methods=("momentum", "adam"), lrs=(0.01, 0.1), seeds=runs.HELD_OUT_SEEDS[:1], steps=44,
                       val_every=22, target_accuracy=0.8, width=32),
                Wilson(n=20, p=0.55, test_samples=200, steps=30, sgd_batch=5, lrs=WILSON_LRS, checkpoint_every=10,
                       seeds=runs.HELD_OUT_SEEDS[:1]))


def wilson_samples(starts: np.ndarray, p: float, rng: np.random.Generator, dim: int,
                   more_positives: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Samples by the rule of Section 3.3, one per entry of ``starts``, the (0-based) column where
    its unique features begin; ``more_positives``: redraw the labels until positives outnumber
    negatives."""
    y = np.where(rng.random(len(starts)) < p, 1.0, -1.0)
    while more_positives and (y > 0).sum() <= (y < 0).sum():
        y = np.where(rng.random(len(starts)) < p, 1.0, -1.0)
    x = np.zeros((len(starts), dim))
    x[:, 0], x[:, 1:3] = y, 1
    for i, (start, label) in enumerate(zip(starts, y)):
        x[i, start:start + 1 + 2 * round(1 - label)] = 1  # 1 + 2(1 - y_i): one column, or five
    return x, y


@dataclass(frozen=True)
class WilsonProblem:
    path: Path  # the training set, for data=npz
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def min_norm(self) -> np.ndarray:
        """Where GD and SGD from 0 go: the interpolating solution of least norm."""
        return np.linalg.pinv(self.x) @ self.y

    @property
    def sign_direction(self) -> np.ndarray:
        """Where the adaptive methods from 0 go, up to scale (Lemma 3.1)."""
        return np.sign(self.x.T @ self.y)

    def test_accuracy(self, w: np.ndarray) -> float:
        return float(np.mean(np.sign(self.x_test @ w) == self.y_test))

    def positive_fraction(self, w: np.ndarray) -> float:
        """The fraction of test points that ``w`` labels +1."""
        return float(np.mean(self.x_test @ w > 0))


def make_wilson(path: Path, w: Wilson) -> WilsonProblem:
    rng = np.random.default_rng(w.seed)
    dim = 6 * w.n
    # Sample i (from 0) starts at column 3 + 5i, the paper's 4 + 5(i - 1) counted from 1.
    x, y = wilson_samples(3 + 5 * np.arange(w.n), w.p, rng, dim, more_positives=True)
    # A new point's unique features lie where a sample i > n would have them, past the training
    # set's last column (5n + 3, 1-based), where no gradient reaches and every method's weights
    # stay 0. Within d = 6n they all share the first such block, which changes no prediction.
    x_test, y_test = wilson_samples(np.full(w.test_samples, 3 + 5 * w.n), w.p, rng, dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.float32))
    return WilsonProblem(path, x, y, x_test, y_test)


def digits_name(method: str, lr: float, seed: int) -> str:
    return f"digits_{method}_lr{lr:g}_seed{seed}"


def digits_overrides(d: Digits, method: str, lr: float, seed: int) -> list[str]:
    return ["data=digits", "model=mlp", f"model.width={d.width}", "schedule=cosine", f"trainer.max_steps={d.steps}",
            f"trainer.val_every={d.val_every}", f"trainer.log_every={d.val_every}", f"optim={method}", f"optim.lr={lr}",
            *runs.seeded(seed)]


def wilson_plan(w: Wilson, problem: WilsonProblem) -> dict[str, list[str]]:
    """The five runs on one problem: GD and SGD (optim=sgd), and the adaptive methods."""
    wilson = ["data=npz", hydra_override("data.path", problem.path), "data.val_fraction=0", "model=linear",
              "model.bias=false", "model.init=zeros", f"trainer.max_steps={w.steps}", "trainer.log_every=1",
              f"trainer.checkpoint_every={w.checkpoint_every}", "trainer.keep_checkpoints=0"]
    planned = {}
    for run_name, lr in w.lrs.items():
        optimizer = "sgd" if run_name in ("gd", "sgd") else run_name
        batch = w.sgd_batch if run_name == "sgd" else w.n
        planned[f"wilson_seed{w.seed}/{run_name}"] = [*wilson, f"optim={optimizer}", f"optim.lr={lr}",
                                                      f"data.global_batch_size={batch}"]
    return planned


def mean_curve(results: list[runs.Result], tag: str) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' mean of a curve (they log at the same steps)."""
    curves = [r.curve(tag) for r in results]
    return curves[0][0], np.mean([values for _, values in curves], axis=0)


def steps_to_accuracy(result: runs.Result, target: float) -> float:
    return runs.first_step_at_or_below(*_negated(result.curve("val/accuracy")), -target)


def tune(out: Path, d: Digits, workers: int) -> dict:
    """Each method's lr: the grid's best final validation accuracy on the tuning seed (fewer steps
    to the target break ties), and the grid's numbers."""
    seed = runs.TUNING_SEED
    results = runs.train_all(out, {digits_name(m, lr, seed): digits_overrides(d, m, lr, seed)
                                   for m in d.methods for lr in d.lrs}, workers)
    tuned = {}
    for method in d.methods:
        grid = {lr: {"final_accuracy": results[digits_name(method, lr, seed)].final.get("val/accuracy", 0.0),
                     "steps_to_target": steps_to_accuracy(results[digits_name(method, lr, seed)], d.target_accuracy)}
                for lr in d.lrs}
        best = max(d.lrs, key=lambda lr: (grid[lr]["final_accuracy"], -grid[lr]["steps_to_target"]))
        tuned[method] = {"tuned_lr": best, "at_grid_edge": best in (d.lrs[0], d.lrs[-1]), "grid": grid}
    return tuned


def digits_summary(results: dict[str, runs.Result], d: Digits, tuned: dict) -> dict:
    """For each method at its tuned lr, over the held-out seeds: final validation accuracy (mean
    and standard deviation), steps to the target accuracy (mean; inf if a seed misses it) and
    final training loss (the last logged batch's)."""
    summary = {}
    for method in d.methods:
        seeds = [results[digits_name(method, tuned[method]["tuned_lr"], seed)] for seed in d.seeds]
        accuracy = [r.final.get("val/accuracy", 0.0) for r in seeds]
        summary[method] = {**tuned[method], "final_accuracy": float(np.mean(accuracy)), "std": float(np.std(accuracy)),
                           "accuracy_by_seed": accuracy,
                           "steps_to_target": float(np.mean([steps_to_accuracy(r, d.target_accuracy) for r in seeds])),
                           "final_train_loss": float(np.mean([r.final.get("train/loss", math.nan) for r in seeds]))}
    return summary


def _negated(curve: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return curve[0], -curve[1]


def wilson_summary(results: dict[str, runs.Result], problem: WilsonProblem, seed: int) -> dict:
    """Test accuracy along each run (from its checkpoints) and where each run ended: its distance
    from the minimum-norm solution and its cosine with sign(X^T y)."""
    summary = {}
    min_norm, direction = problem.min_norm, problem.sign_direction
    for run_name in WILSON_LRS:
        result = results[f"wilson_seed{seed}/{run_name}"]
        steps, states = result.checkpoints()
        weights = [state["1.weight"].double().numpy().ravel() for state in states]
        last = weights[-1]
        summary[run_name] = {
            "steps": steps.tolist(), "test_accuracy_curve": [problem.test_accuracy(w) for w in weights],
            "test_accuracy": problem.test_accuracy(last), "labelled_positive": problem.positive_fraction(last),
            "final_train_loss": result.final.get("train/loss", math.nan),
            "distance_to_min_norm": float(np.linalg.norm(last - min_norm) / np.linalg.norm(min_norm)),
            "cosine_to_sign": float(last @ direction / np.linalg.norm(last) / np.linalg.norm(direction)),
        }
    return {"runs": summary, "train_positives": int((problem.y > 0).sum()),
            "test_positive_fraction": float(np.mean(problem.y_test > 0))}


def run(out: Path, quick: bool = False) -> runs.Outcome:
    s = QUICK if quick else FULL
    workers = 1 if quick else 2
    tuned = tune(out, s.digits, workers)
    problems = {seed: make_wilson(out / f"wilson_train_seed{seed}.npz", replace(s.wilson, seed=seed))
                for seed in s.wilson.seeds}
    planned = {digits_name(m, tuned[m]["tuned_lr"], seed): digits_overrides(s.digits, m, tuned[m]["tuned_lr"], seed)
               for m in s.digits.methods for seed in s.digits.seeds}
    for seed, problem in problems.items():
        planned |= wilson_plan(replace(s.wilson, seed=seed), problem)
    results = runs.train_all(out, planned, workers)
    numbers = {
        "digits": digits_summary(results, s.digits, tuned), "methods": list(s.digits.methods),
        "lrs": list(s.digits.lrs), "seeds": list(s.digits.seeds), "tuning_seed": runs.TUNING_SEED,
        "target_accuracy": s.digits.target_accuracy, "digits_steps": s.digits.steps,
        "wilson": {str(seed): wilson_summary(results, problem, seed) for seed, problem in problems.items()},
        "wilson_lrs": s.wilson.lrs, "n": s.wilson.n, "p": s.wilson.p, "test_samples": s.wilson.test_samples,
    }
    config = results[digits_name(s.digits.methods[0], tuned[s.digits.methods[0]]["tuned_lr"], s.digits.seeds[0])]
    numbers["global_batch"] = config.config().data.global_batch_size
    digits_holds, digits_verdict = judge_digits(numbers)
    wilson_holds, wilson_verdict = judge_wilson(numbers)
    first = s.wilson.seeds[0]
    figures = [draw_digits(out / "adaptive.png", results, numbers, s.digits),
               draw_wilson(out / "adaptive_wilson.png", results, numbers, first)]
    numbers["holds"] = {"digits": digits_holds, "wilson": wilson_holds}
    holds = digits_holds and wilson_holds
    return runs.Outcome(TITLE, f"{wilson_verdict} {digits_verdict} The claim {'holds' if holds else 'does not hold'} "
                               "as a whole on the held-out seeds (both parts must).", holds, numbers, figures)


def wilson_holds(w: dict) -> bool:
    """GD and SGD label every test point correctly and every adaptive method labels every test
    point +1 (so that its accuracy is the fraction of +1 labels)."""
    return all(w[m]["test_accuracy"] == 1 for m in ("gd", "sgd")) and all(
        w[m]["labelled_positive"] == 1 for m in ADAPTIVE)


def judge_wilson(n: dict) -> tuple[bool, str]:
    """Holds when the construction's outcome (wilson_holds) is exact on every held-out problem."""
    problems = n["wilson"]
    met = {seed: wilson_holds(problem["runs"]) for seed, problem in problems.items()}
    first = next(iter(problems))
    w, positives = problems[first]["runs"], problems[first]["test_positive_fraction"]
    verdict = (
        f"(b) On the construction of Section 3.3 with n = {n['n']}, d = {6 * n['n']}, p = {n['p']:g}, from w = 0, "
        f"on the problems of held-out seeds {', '.join(problems)}. Seed {first} "
        f"({problems[first]['train_positives']} positive): GD and SGD reached test accuracy "
        f"{w['gd']['test_accuracy']:.3f} and {w['sgd']['test_accuracy']:.3f} on {n['test_samples']} new points "
        f"(their weights {w['gd']['distance_to_min_norm']:.1e} and {w['sgd']['distance_to_min_norm']:.1e} from the "
        f"minimum-norm solution, relatively), while "
        + ", ".join(f"{LABELS[m]} reached {w[m]['test_accuracy']:.3f} (labelling {w[m]['labelled_positive']:.0%} "
                    f"+1; cosine with sign(X^T y) {w[m]['cosine_to_sign']:.4f})" for m in ADAPTIVE)
        + f"; the fraction of +1 test labels is {positives:.3f}. Criterion, on each problem: GD and SGD label every "
        f"test point correctly and each adaptive method labels every one +1: met on {sum(met.values())} of "
        f"{len(met)}"
        + ("" if all(met.values()) else f" (not on seed {', '.join(seed for seed, ok in met.items() if not ok)})")
        + "."
    )
    return all(met.values()), verdict


def judge_digits(n: dict) -> tuple[bool, str]:
    """Holds (Section 4's observation) when no tuned adaptive method's mean final validation accuracy
    on the held-out seeds exceeds tuned SGD with momentum's by more than the larger of their
    standard deviations over those seeds."""
    d, methods = n["digits"], n["methods"]
    base = d["momentum"]
    gap = {m: d[m]["final_accuracy"] - base["final_accuracy"] for m in methods[1:]}
    ahead = [m for m in methods[1:] if gap[m] > max(d[m]["std"], base["std"])]
    behind = [m for m in methods[1:] if -gap[m] > max(d[m]["std"], base["std"])]
    level = [LABELS[m] for m in methods[1:] if m not in ahead and m not in behind]
    edges = [LABELS[m] for m in methods if d[m]["at_grid_edge"]]
    described = "; ".join(
        f"{LABELS[m]} lr {d[m]['tuned_lr']:g}: {d[m]['final_accuracy']:.2%} +- {d[m]['std']:.2%}, "
        f"{reached(d[m]['steps_to_target'], n['target_accuracy'])}" for m in methods)
    verdict = (
        f"(a) On digits (MLP, cosine schedule, {n['digits_steps']} steps of {n['global_batch']}), each method's lr "
        f"tuned over {', '.join(f'{lr:g}' for lr in n['lrs'])} by final validation accuracy on the tuning seed "
        f"{n['tuning_seed']}, then scored on the {runs.seeds_text(n['seeds'])}, whose validation splits the tuning "
        f"never saw: {described}."
        + (f" The tuned lr lies at the grid's edge for {', '.join(edges)}." if edges else "")
        + f" Criterion (Section 4: adaptive methods generalize no better than tuned SGD with momentum): no tuned "
        f"adaptive method ahead of it by more than the larger seed standard deviation "
        f"({'met' if not ahead else 'not met: ' + ', '.join(LABELS[m] for m in ahead) + ' ahead'}"
        + (f"; {', '.join(LABELS[m] for m in behind)} behind it by more" if behind else "")
        + (f"; {', '.join(level)} level with it" if level else "") + ")."
    )
    return not ahead, verdict


def reached(steps: float, target: float) -> str:
    return f"{target:.0%} not reached" if math.isinf(steps) else f"{steps:.0f} steps to {target:.0%}"


def draw_digits(path: Path, results: dict[str, runs.Result], n: dict, d: Digits) -> Path:
    fig, axes = figures.figure(ncols=3, width=4.2, height=3.2)
    accuracy, loss, grid = axes[0]
    for method in d.methods:
        summary = n["digits"][method]
        tuned = [results[digits_name(method, summary["tuned_lr"], seed)] for seed in d.seeds]
        label = f"{LABELS[method]}, lr {summary['tuned_lr']:g}"
        accuracy.plot(*mean_curve(tuned, "val/accuracy"), color=COLORS[method], linewidth=1, label=label)
        loss.plot(*mean_curve(tuned, "train/loss"), color=COLORS[method], linewidth=1, label=label)
        lrs = list(summary["grid"])
        grid.plot(lrs, [summary["grid"][lr]["final_accuracy"] for lr in lrs], color=COLORS[method], linewidth=1,
                  marker="o", markersize=4, label=LABELS[method])
        grid.plot([summary["tuned_lr"]], [summary["grid"][summary["tuned_lr"]]["final_accuracy"]], marker="*",
                  markersize=13, color=COLORS[method], markeredgecolor="black", linestyle="none")
    accuracy.axhline(d.target_accuracy, color="grey", linewidth=0.8, linestyle="--", label="target")
    seeds = f"mean of held-out seed{'s' if len(d.seeds) > 1 else ''} {', '.join(map(str, d.seeds))}"
    shown = (max(0.0, d.target_accuracy - 0.15), 1)
    accuracy.set(xlabel=f"step (batches of {n['global_batch']})", ylabel="validation accuracy", ylim=shown,
                 title=f"Digits at the tuned lr ({seeds})")
    loss.set(xlabel=f"step (batches of {n['global_batch']})", ylabel="training loss (cross-entropy of a batch)",
             yscale="log", title="Training loss at the tuned lr")
    grid.set(xscale="log", xlabel="learning rate", ylabel="final validation accuracy", ylim=shown,
             title=f"Tuning on seed {n['tuning_seed']} (star: the tuned lr)")
    for ax in (accuracy, loss, grid):
        ax.legend(fontsize=7)
    return runs.save(fig, path)


def draw_wilson(path: Path, results: dict[str, runs.Result], n: dict, seed: int) -> Path:
    fig, axes = figures.figure(ncols=2, width=5.4, height=3.8)
    loss, accuracy = axes[0]
    problem = n["wilson"][str(seed)]
    w = problem["runs"]
    for run_name, lr in n["wilson_lrs"].items():
        label = f"{LABELS[run_name]}, lr {lr:g}"
        style = "-" if run_name in ("gd", "sgd") else "--"
        steps, values = results[f"wilson_seed{seed}/{run_name}"].curve("train/loss")
        loss.plot(steps, values, color=COLORS[run_name], linestyle=style, label=label)
        accuracy.plot(w[run_name]["steps"], w[run_name]["test_accuracy_curve"], color=COLORS[run_name],
                      linestyle=style, marker=".", markersize=3, label=label)
    accuracy.axhline(problem["test_positive_fraction"], color="grey", linewidth=0.8, linestyle=":",
                     label="fraction of +1 test labels")
    # Below 1e-12 lies float32 rounding of a loss that is exactly 0 at the interpolating solution.
    loss.set(yscale="log", ylim=(1e-12, 3), xlabel="step", ylabel="training loss (MSE; SGD: its batch)",
             title=f"Wilson et al. Section 3.3: n = {n['n']}, d = {6 * n['n']}, p = {n['p']:g}, seed {seed}")
    accuracy.set(xlabel="step", ylabel="test accuracy (sign agreement)", ylim=(0, 1.05),
                 title=f"Test accuracy on {n['test_samples']} new points (from checkpoints)")
    loss.legend(fontsize=7)
    accuracy.legend(fontsize=7)
    return runs.save(fig, path)
