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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distsgd import figures
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
    seeds: tuple[int, ...]
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
    seed: int = 0


@dataclass(frozen=True)
class Setting:
    digits: Digits
    wilson: Wilson


WILSON_LRS = {"gd": 0.2, "sgd": 0.05, "adagrad": 0.1, "rmsprop": 0.01, "adam": 0.01}
FULL = Setting(Digits(methods=METHODS, lrs=(0.003, 0.01, 0.03, 0.1, 0.3), seeds=(0, 1, 2), steps=660, val_every=11,
                      target_accuracy=0.95),
               Wilson(n=50, p=0.55, test_samples=1000, steps=500, sgd_batch=10, lrs=WILSON_LRS, checkpoint_every=10))
QUICK = Setting(Digits(methods=("momentum", "adam"), lrs=(0.01, 0.1), seeds=(0,), steps=44, val_every=22,
                       target_accuracy=0.8, width=32),
                Wilson(n=20, p=0.55, test_samples=200, steps=30, sgd_batch=5, lrs=WILSON_LRS, checkpoint_every=10))


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


def plan(d: Digits, w: Wilson, problem: WilsonProblem) -> dict[str, list[str]]:
    digits = ["data=digits", "model=mlp", f"model.width={d.width}", "schedule=cosine", f"trainer.max_steps={d.steps}",
              f"trainer.val_every={d.val_every}", f"trainer.log_every={d.val_every}"]
    planned = {digits_name(method, lr, seed): [*digits, f"optim={method}", f"optim.lr={lr}", f"trainer.seed={seed}"]
               for method in d.methods for lr in d.lrs for seed in d.seeds}
    wilson = ["data=npz", f"data.path={problem.path}", "data.val_fraction=0", "model=linear", "model.bias=false",
              "model.init=zeros", f"trainer.max_steps={w.steps}", "trainer.log_every=1",
              f"trainer.checkpoint_every={w.checkpoint_every}", "trainer.keep_checkpoints=0"]
    for run_name, lr in w.lrs.items():
        optimizer = "sgd" if run_name in ("gd", "sgd") else run_name
        batch = w.sgd_batch if run_name == "sgd" else w.n
        planned[f"wilson_{run_name}"] = [*wilson, f"optim={optimizer}", f"optim.lr={lr}",
                                         f"data.global_batch_size={batch}"]
    return planned


def mean_curve(results: list[runs.Result], tag: str) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' mean of a curve (they log at the same steps)."""
    curves = [r.curve(tag) for r in results]
    return curves[0][0], np.mean([values for _, values in curves], axis=0)


def digits_summary(results: dict[str, runs.Result], d: Digits) -> dict:
    """For each method and lr: final validation accuracy (mean and standard deviation over seeds),
    steps to the target accuracy (mean; inf if a seed misses it) and final training loss; and the
    lr with the best mean final accuracy (the tuned one)."""
    summary = {}
    for method in d.methods:
        grid = {}
        for lr in d.lrs:
            seeds = [results[digits_name(method, lr, seed)] for seed in d.seeds]
            accuracy = [r.final.get("val/accuracy", 0.0) for r in seeds]
            to_target = [runs.first_step_at_or_below(*_negated(r.curve("val/accuracy")), -d.target_accuracy)
                         for r in seeds]
            grid[lr] = {"final_accuracy": float(np.mean(accuracy)), "std": float(np.std(accuracy)),
                        "steps_to_target": float(np.mean(to_target)),
                        "final_train_loss": float(np.mean([r.final.get("train/loss", math.nan) for r in seeds]))}
        best = max(d.lrs, key=lambda lr: (grid[lr]["final_accuracy"], -grid[lr]["steps_to_target"]))
        summary[method] = {"tuned_lr": best, "at_grid_edge": best in (d.lrs[0], d.lrs[-1]), **grid[best],
                           "grid": grid}
    return summary


def _negated(curve: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return curve[0], -curve[1]


def wilson_summary(results: dict[str, runs.Result], problem: WilsonProblem) -> dict:
    """Test accuracy along each run (from its checkpoints) and where each run ended: its distance
    from the minimum-norm solution and its cosine with sign(X^T y)."""
    summary = {}
    min_norm, direction = problem.min_norm, problem.sign_direction
    for run_name in WILSON_LRS:
        steps, states = results[f"wilson_{run_name}"].checkpoints()
        weights = [state["1.weight"].double().numpy().ravel() for state in states]
        last = weights[-1]
        summary[run_name] = {
            "steps": steps.tolist(), "test_accuracy_curve": [problem.test_accuracy(w) for w in weights],
            "test_accuracy": problem.test_accuracy(last), "labelled_positive": problem.positive_fraction(last),
            "final_train_loss": results[f"wilson_{run_name}"].final.get("train/loss", math.nan),
            "distance_to_min_norm": float(np.linalg.norm(last - min_norm) / np.linalg.norm(min_norm)),
            "cosine_to_sign": float(last @ direction / np.linalg.norm(last) / np.linalg.norm(direction)),
        }
    return summary


def run(out: Path, quick: bool = False) -> runs.Outcome:
    s = QUICK if quick else FULL
    problem = make_wilson(out / "wilson_train.npz", s.wilson)
    results = runs.train_all(out, plan(s.digits, s.wilson, problem), workers=1 if quick else 2)
    numbers = {
        "digits": digits_summary(results, s.digits), "methods": list(s.digits.methods), "lrs": list(s.digits.lrs),
        "seeds": list(s.digits.seeds),
        "target_accuracy": s.digits.target_accuracy, "digits_steps": s.digits.steps,
        "wilson": wilson_summary(results, problem), "wilson_lrs": s.wilson.lrs, "n": s.wilson.n, "p": s.wilson.p,
        "train_positives": int((problem.y > 0).sum()), "test_samples": s.wilson.test_samples,
        "test_positive_fraction": float(np.mean(problem.y_test > 0)),
    }
    digits_holds, digits_verdict = judge_digits(numbers)
    wilson_holds, wilson_verdict = judge_wilson(numbers)
    figures = [draw_digits(out / "adaptive.png", results, numbers, s.digits),
               draw_wilson(out / "adaptive_wilson.png", results, numbers)]
    numbers["holds"] = {"digits": digits_holds, "wilson": wilson_holds}
    return runs.Outcome(TITLE, f"{wilson_verdict} {digits_verdict}", digits_holds and wilson_holds, numbers, figures)


def judge_wilson(n: dict) -> tuple[bool, str]:
    """Holds when GD and SGD label every test point correctly and every adaptive method labels every
    test point +1 (so that its accuracy is the fraction of +1 labels)."""
    w = n["wilson"]
    holds = all(w[m]["test_accuracy"] == 1 for m in ("gd", "sgd")) and all(
        w[m]["labelled_positive"] == 1 for m in ADAPTIVE)
    verdict = (
        f"(b) On the construction of Section 3.3 with n = {n['n']} ({n['train_positives']} positive), "
        f"d = {6 * n['n']}, p = {n['p']:g}, from w = 0: GD and SGD reached test accuracy "
        f"{w['gd']['test_accuracy']:.3f} and {w['sgd']['test_accuracy']:.3f} on {n['test_samples']} new points "
        f"(their weights {w['gd']['distance_to_min_norm']:.1e} and {w['sgd']['distance_to_min_norm']:.1e} from the "
        f"minimum-norm solution, relatively), while "
        + ", ".join(f"{LABELS[m]} reached {w[m]['test_accuracy']:.3f} (labelling {w[m]['labelled_positive']:.0%} "
                    f"+1; cosine with sign(X^T y) {w[m]['cosine_to_sign']:.4f})" for m in ADAPTIVE)
        + f"; the fraction of +1 test labels is {n['test_positive_fraction']:.3f}. Criterion: GD and SGD label every "
        f"test point correctly and each adaptive method labels every one +1 ({'met' if holds else 'not met'})."
    )
    return holds, verdict


def judge_digits(n: dict) -> tuple[bool, str]:
    """Holds (Section 4's observation) when no tuned adaptive method's mean final validation accuracy
    exceeds tuned SGD with momentum's by more than the larger of their standard deviations over seeds."""
    d, methods = n["digits"], n["methods"]
    base = d["momentum"]
    ahead = [m for m in methods[1:] if d[m]["final_accuracy"] - base["final_accuracy"] > max(d[m]["std"], base["std"])]
    edges = [LABELS[m] for m in methods if d[m]["at_grid_edge"]]
    described = "; ".join(
        f"{LABELS[m]} lr {d[m]['tuned_lr']:g}: {d[m]['final_accuracy']:.2%} +- {d[m]['std']:.2%}, "
        f"{_steps(d[m]['steps_to_target'])} steps to {n['target_accuracy']:.0%}" for m in methods)
    verdict = (
        f"(a) On digits (MLP, cosine schedule, {n['digits_steps']} steps of 64), each method tuned over lr "
        f"{', '.join(f'{lr:g}' for lr in n['lrs'])} by mean final validation accuracy over {len(n['seeds'])} seed(s): "
        f"{described}."
        + (f" The tuned lr lies at the grid's edge for {', '.join(edges)}." if edges else "")
        + f" Criterion (Section 4: adaptive methods generalize no better than tuned SGD with momentum): no tuned "
        f"adaptive method ahead of it by more than the larger seed standard deviation "
        f"({'met' if not ahead else 'not met: ' + ', '.join(LABELS[m] for m in ahead) + ' ahead'}). "
        "The validation set both tunes and scores (digits has no third split), which flatters every method alike."
    )
    return not ahead, verdict


def _steps(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


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
        grid.errorbar(lrs, [summary["grid"][lr]["final_accuracy"] for lr in lrs],
                      yerr=[summary["grid"][lr]["std"] for lr in lrs], color=COLORS[method], linewidth=1, marker="o",
                      markersize=4, capsize=2, label=LABELS[method])
        grid.plot([summary["tuned_lr"]], [summary["final_accuracy"]], marker="*", markersize=13,
                  color=COLORS[method], markeredgecolor="black", linestyle="none")
    accuracy.axhline(d.target_accuracy, color="grey", linewidth=0.8, linestyle="--", label="target")
    seeds = f"mean of {len(d.seeds)} seed{'s' if len(d.seeds) > 1 else ''}"
    shown = (max(0.0, d.target_accuracy - 0.15), 1)
    accuracy.set(xlabel="step (batches of 64)", ylabel="validation accuracy", ylim=shown,
                 title=f"Digits at the tuned lr ({seeds})")
    loss.set(xlabel="step (batches of 64)", ylabel="training loss (cross-entropy of a batch)", yscale="log",
             title="Training loss at the tuned lr")
    grid.set(xscale="log", xlabel="learning rate", ylabel=f"final validation accuracy ({seeds})",
             ylim=shown, title="Tuning (star: the tuned lr)")
    for ax in (accuracy, loss, grid):
        ax.legend(fontsize=7)
    return runs.save(fig, path)


def draw_wilson(path: Path, results: dict[str, runs.Result], n: dict) -> Path:
    fig, axes = figures.figure(ncols=2, width=5.4, height=3.8)
    loss, accuracy = axes[0]
    w = n["wilson"]
    for run_name, lr in n["wilson_lrs"].items():
        label = f"{LABELS[run_name]}, lr {lr:g}"
        style = "-" if run_name in ("gd", "sgd") else "--"
        steps, values = results[f"wilson_{run_name}"].curve("train/loss")
        loss.plot(steps, values, color=COLORS[run_name], linestyle=style, label=label)
        accuracy.plot(w[run_name]["steps"], w[run_name]["test_accuracy_curve"], color=COLORS[run_name],
                      linestyle=style, marker=".", markersize=3, label=label)
    accuracy.axhline(n["test_positive_fraction"], color="grey", linewidth=0.8, linestyle=":",
                     label="fraction of +1 test labels")
    # Below 1e-12 lies float32 rounding of a loss that is exactly 0 at the interpolating solution.
    loss.set(yscale="log", ylim=(1e-12, 3), xlabel="step", ylabel="training loss (MSE; SGD: its batch)",
             title=f"Wilson et al. Section 3.3: n = {n['n']}, d = {6 * n['n']}, p = {n['p']:g}")
    accuracy.set(xlabel="step", ylabel="test accuracy (sign agreement)", ylim=(0, 1.05),
                 title=f"Test accuracy on {n['test_samples']} new points (from checkpoints)")
    loss.legend(fontsize=7)
    accuracy.legend(fontsize=7)
    return runs.save(fig, path)
