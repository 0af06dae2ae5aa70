"""Momentum on an ill-conditioned quadratic.

Claim: on an ill-conditioned problem, heavy-ball momentum (Polyak 1964) and Nesterov's accelerated
gradient reach a given loss in far fewer steps than plain gradient descent at the same learning
rate (Sutskever, Martens, Dahl and Hinton 2013, "On the importance of initialization and momentum
in deep learning", Section 2; Goh 2017, "Why Momentum Really Works"). In the directions of low
curvature, where the heavy ball is overdamped, it moves like gradient descent at the effective
rate lr / (1 - beta), which is where the gap comes from; in the directions of high curvature it
stays stable up to lr < 2 (1 + beta) / lambda_max, whereas gradient descent needs lr < 2 / lambda_max,
so gradient descent at lr / (1 - beta) is only an option while lr < 2 (1 - beta) / lambda_max.

Design: the study writes a least-squares problem with a known Hessian spectrum to an .npz for
data=npz: x = z diag(sqrt(lambda)) R with z of orthonormal columns (scaled so that the mean squared
error's Hessian (2/N) x^T x is exactly R^T diag(lambda) R), lambda log-spaced from 1 down to
1/kappa, y = x w* + small noise. model=linear without a bias (so that the Hessian is exactly that)
trains on the full batch from w = 0. SGD, heavy ball and Nesterov at one lr and beta 0.9, and SGD at
lr / (1 - beta); then heavy ball and SGD at a rate between 2 / lambda_max and 2 (1 + beta) / lambda_max.
The excess loss over the least-squares optimum comes from train/loss (the full-batch loss before
each update); its part in the overdamped directions (lambda <= (1 - sqrt(beta))^2 / lr, where the
heavy ball's characteristic roots are real) from the weights in the runs' checkpoints.

Seeds. The problem's randomness is the quadratic's: the seed of make_quadratic draws the sample
directions z, the rotation R, w* and the noise (the spectrum is fixed). Training has none: full
batch from w = 0, so trainer.seed and data.seed change nothing (data.val_fraction=0: no split).
The rates, budgets, targets and criteria below were fixed on the quadratic of the tuning seed
(runs.TUNING_SEED), which the study trains again and reports; the verdict is computed on the
quadratics of the held-out seeds (runs.HELD_OUT_SEEDS) and holds when the criterion holds on each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distsgd import figures
from distsgd.config import hydra_override
from distsgd.studies import runs

TITLE = "Momentum: heavy ball and Nesterov against SGD on an ill-conditioned quadratic"
BETA = 0.9


@dataclass(frozen=True)
class Setting:
    dim: int
    kappa: float  # condition number of the Hessian; its largest eigenvalue is 1
    samples: int
    lr: float  # SGD, heavy ball and Nesterov alike; below 2 (1 - beta), so that SGD at lr / (1 - beta) is stable
    unstable_lr: float  # between 2 / lambda_max (SGD's limit) and 2 (1 + beta) / lambda_max (the heavy ball's)
    sgd_steps: int  # budget of SGD at lr, which needs about 1 / (1 - beta) times the others'
    steps: int  # budget of every other run
    target: float  # the target excess loss, relative to the initial one
    overdamped_target: float  # the same for the excess in the overdamped directions
    checkpoint_every: int
    noise: float = 0.01

    @property
    def effective_lr(self) -> float:
        return round(self.lr / (1 - BETA), 10)

    @property
    def overdamped_below(self) -> float:
        """The curvature under which the heavy ball at ``lr`` has real characteristic roots."""
        return (1 - math.sqrt(BETA)) ** 2 / self.lr


FULL = Setting(dim=32, kappa=1000, samples=256, lr=0.15, unstable_lr=3.0, sgd_steps=2500, steps=1000,
               target=1e-3, overdamped_target=0.1, checkpoint_every=10)
QUICK = Setting(dim=8, kappa=100, samples=32, lr=0.15, unstable_lr=3.0, sgd_steps=600, steps=100,
                target=1e-3, overdamped_target=0.1, checkpoint_every=20)


@dataclass(frozen=True)
class Quadratic:
    """The least-squares problem as distsgd trains it (float32 data), solved in float64."""

    path: Path
    eigenvalues: np.ndarray  # of the mean squared error's Hessian, descending
    eigenvectors: np.ndarray  # its columns, in the same order
    w_opt: np.ndarray
    loss_opt: float

    def excess(self, w: np.ndarray, directions: np.ndarray) -> float:
        """The excess loss of weights ``w`` in the eigen-directions selected by the mask ``directions``;
        exact, since the loss is quadratic: (w - w_opt)^T H (w - w_opt) / 2."""
        error = self.eigenvectors[:, directions].T @ (w - self.w_opt)
        return 0.5 * float(np.sum(self.eigenvalues[directions] * error**2))


def make_quadratic(path: Path, s: Setting, seed: int = 0) -> Quadratic:
    rng = np.random.default_rng(seed)
    eigenvalues = np.logspace(0, -math.log10(s.kappa), s.dim)
    z = np.linalg.qr(rng.standard_normal((s.samples, s.dim)))[0]  # z^T z = I
    rotation = np.linalg.qr(rng.standard_normal((s.dim, s.dim)))[0]
    x = math.sqrt(s.samples / 2) * z * np.sqrt(eigenvalues) @ rotation.T
    y = x @ rng.standard_normal(s.dim) + s.noise * rng.standard_normal(s.samples)
    x, y = x.astype(np.float32), y.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    x, y = x.astype(np.float64), y.astype(np.float64)
    values, vectors = np.linalg.eigh(2 / s.samples * x.T @ x)
    w_opt = np.linalg.lstsq(x, y, rcond=None)[0]
    return Quadratic(path, values[::-1], vectors[:, ::-1], w_opt, float(np.mean((x @ w_opt - y) ** 2)))


def plan(problem: Quadratic, s: Setting) -> dict[str, list[str]]:
    """The runs, by role: the same lr for SGD, heavy ball and Nesterov, SGD at lr / (1 - beta), and
    heavy ball and SGD at ``unstable_lr``."""
    base = ["data=npz", hydra_override("data.path", problem.path), "data.val_fraction=0",
            f"data.global_batch_size={s.samples}", "model=linear", "model.bias=false", "model.init=zeros",
            "trainer.log_every=1"]
    # Every checkpoint kept: the weights along the way, for the excess in the overdamped directions.
    kept = [*base, f"trainer.checkpoint_every={s.checkpoint_every}", "trainer.keep_checkpoints=0"]
    momentum = [f"optim.momentum={BETA}"]
    return {
        "sgd": [*kept, "optim=sgd", f"optim.lr={s.lr}", f"trainer.max_steps={s.sgd_steps}"],
        "momentum": [*kept, "optim=momentum", *momentum, f"optim.lr={s.lr}", f"trainer.max_steps={s.steps}"],
        "nesterov": [*kept, "optim=nesterov", *momentum, f"optim.lr={s.lr}", f"trainer.max_steps={s.steps}"],
        "sgd_effective_lr": [*kept, "optim=sgd", f"optim.lr={s.effective_lr}", f"trainer.max_steps={s.steps}"],
        "momentum_unstable_lr": [*base, "optim=momentum", *momentum, f"optim.lr={s.unstable_lr}",
                                 f"trainer.max_steps={s.steps}"],
        "sgd_unstable_lr": [*base, "optim=sgd", f"optim.lr={s.unstable_lr}", f"trainer.max_steps={s.steps}"],
    }


def excess_curve(result: runs.Result, problem: Quadratic) -> tuple[np.ndarray, np.ndarray]:
    steps, loss = result.curve("train/loss")
    return steps, loss - problem.loss_opt


def low_curvature_curve(result: runs.Result, problem: Quadratic, directions: np.ndarray):
    """The excess loss in ``directions`` at step 0 (w = 0: model.init=zeros) and at each checkpoint."""
    steps, states = result.checkpoints()
    weights = [np.zeros_like(problem.w_opt)] + [state["1.weight"].double().numpy().ravel() for state in states]
    return np.concatenate([[0], steps]), np.array([problem.excess(w, directions) for w in weights])


def diverged(result: runs.Result, problem: Quadratic) -> bool:
    """Stopped on non-finite values, or ended above where it started."""
    _, excess = excess_curve(result, problem)
    return result.diverged is not None or not (np.isfinite(excess[-1]) and excess[-1] < excess[0])


def run(out: Path, quick: bool = False) -> runs.Outcome:
    s = QUICK if quick else FULL
    held_out = runs.HELD_OUT_SEEDS[:1] if quick else runs.HELD_OUT_SEEDS
    seeds = held_out if quick else (runs.TUNING_SEED, *held_out)
    problems = {seed: make_quadratic(out / f"quadratic_seed{seed}.npz", s, seed) for seed in seeds}
    trained = runs.train_all(out, {f"seed{seed}/{role}": overrides for seed in seeds
                                   for role, overrides in plan(problems[seed], s).items()}, workers=1 if quick else 2)
    results = {seed: {role: trained[f"seed{seed}/{role}"] for role in plan(problems[seed], s)} for seed in seeds}
    measured = {seed: measure(problems[seed], results[seed], s) for seed in seeds}
    judged = {seed: judge(n) for seed, n in measured.items()}
    holds = all(judged[seed][0] for seed in held_out)
    first = held_out[0]
    numbers = {"seeds": list(held_out), "by_seed": {str(seed): {**n, "holds": judged[seed][0]}
                                                    for seed, n in measured.items()}, "holds": holds}
    others = [*held_out[1:], *([] if quick else [runs.TUNING_SEED])]
    verdict = (f"The quadratic of held-out seed {first}. {judged[first][1]}"
               + "".join(f" {summary(seed, measured[seed], judged[seed][0])}" for seed in others)
               + f" The claim {'holds' if holds else 'does not hold'} on the held-out seeds "
               f"({sum(judged[seed][0] for seed in held_out)} of {len(held_out)} meet the criterion).")
    figures = [draw(out / "momentum.png", results[first], problems[first], measured[first], first)]
    return runs.Outcome(TITLE, verdict, holds, numbers, figures)


def measure(problem: Quadratic, results: dict[str, runs.Result], s: Setting) -> dict:
    """One quadratic's numbers: its spectrum, each run's steps to the target excess overall and in
    the overdamped directions, and which runs diverged."""
    lambda_max = float(problem.eigenvalues[0])
    initial = float(excess_curve(results["sgd"], problem)[1][0])
    target = s.target * initial
    steps = {role: runs.first_step_at_or_below(*excess_curve(r, problem), target) for role, r in results.items()}
    overdamped = problem.eigenvalues <= s.overdamped_below
    low = {role: low_curvature_curve(results[role], problem, overdamped)
           for role in ("sgd", "momentum", "nesterov", "sgd_effective_lr")} if overdamped.any() else {}
    low_steps = {role: runs.first_step_at_or_below(st, v, s.overdamped_target * v[0]) for role, (st, v) in low.items()}
    numbers = {
        "dim": s.dim, "samples": s.samples, "lr": s.lr, "beta": BETA, "effective_lr": s.effective_lr,
        "unstable_lr": s.unstable_lr,
        "lambda_max": lambda_max, "lambda_min": float(problem.eigenvalues[-1]),
        "condition_number": lambda_max / float(problem.eigenvalues[-1]),
        "stable_below": {"sgd": 2 / lambda_max, "momentum": 2 * (1 + BETA) / lambda_max,
                         "nesterov": 2 * (1 + BETA) / (1 + 2 * BETA) / lambda_max},
        "initial_excess": initial, "target_excess": target, "loss_opt": problem.loss_opt,
        "steps_to_target": steps,
        "diverged": {role: diverged(r, problem) for role, r in results.items()},
        # A lower bound where SGD did not reach the target within its budget.
        "speedup_over_sgd": {role: min(steps["sgd"], s.sgd_steps) / steps[role]
                             for role in ("momentum", "nesterov", "sgd_effective_lr")},
        "sgd_steps": s.sgd_steps, "steps": s.steps,
        "overdamped_directions": int(overdamped.sum()),
        "overdamped_below": s.overdamped_below,
        "overdamped_target": s.overdamped_target, "checkpoint_every": s.checkpoint_every,
        "overdamped_steps_to_target": low_steps,
        "low_curvature_curves": {role: [c.tolist() for c in curve] for role, curve in low.items()},
    }
    return numbers


def summary(seed: int, n: dict, holds: bool) -> str:
    """One quadratic's result in a sentence."""
    steps, kind = n["steps_to_target"], "tuning" if seed == runs.TUNING_SEED else "held-out"
    return (f"On the quadratic of {kind} seed {seed}: heavy ball and Nesterov {speedup(n, 'momentum')} and "
            f"{speedup(n, 'nesterov')} fewer steps than SGD ({_steps(steps['sgd'], n['sgd_steps'])}), SGD at "
            f"lr/(1-beta) {steps['sgd_effective_lr'] / steps['momentum']:.2f} times the heavy ball's steps, at lr "
            f"{n['unstable_lr']:g} SGD {'diverged' if n['diverged']['sgd_unstable_lr'] else 'did not diverge'} and "
            f"the heavy ball {'diverged' if n['diverged']['momentum_unstable_lr'] else 'converged'}: criterion "
            f"{'met' if holds else 'not met'}.")


def judge(n: dict) -> tuple[bool, str]:
    """Holds when heavy ball and Nesterov need at most a third of SGD's steps, SGD at lr / (1 - beta)
    needs between 2/3 and 3/2 of the heavy ball's (overall, and in the overdamped directions where
    there are any), and at ``unstable_lr`` SGD diverges while the heavy ball reaches the target."""
    steps, div, low = n["steps_to_target"], n["diverged"], n["overdamped_steps_to_target"]
    gap = max(steps["momentum"], steps["nesterov"]) <= steps["sgd"] / 3
    ratio = steps["sgd_effective_lr"] / steps["momentum"]
    low_ratio = low["sgd_effective_lr"] / low["momentum"] if low else 1.0
    explained = 2 / 3 <= ratio <= 3 / 2 and 2 / 3 <= low_ratio <= 3 / 2
    stability = div["sgd_unstable_lr"] and not div["momentum_unstable_lr"] and math.isfinite(
        steps["momentum_unstable_lr"])
    def took(role: str, of: dict = steps) -> str:
        return _steps(of[role], n["sgd_steps"] if role == "sgd" else n["steps"])

    count = n["overdamped_directions"]
    overdamped = (f" In the {count} overdamped direction{'s' * (count > 1)} (lambda <= {n['overdamped_below']:.3g}) "
                  f"the excess fell to {n['overdamped_target']:g} of its start after {took('sgd', low)} (SGD), "
                  f"{took('momentum', low)} (heavy ball), {took('nesterov', low)} (Nesterov) and "
                  f"{took('sgd_effective_lr', low)} (SGD at lr/(1-beta)) steps (checkpoints every "
                  f"{n['checkpoint_every']} steps)." if low else "")
    verdict = (
        f"On a {n['dim']}-dimensional least-squares problem with condition number {n['condition_number']:.0f} "
        f"(lambda_max {n['lambda_max']:.3g}), full batch from w = 0 at lr {n['lr']:g} and beta {n['beta']:g}, "
        f"the excess loss fell to {n['target_excess']:.2g} ({n['target_excess'] / n['initial_excess']:.0e} of its "
        f"start) after {took('sgd')} steps of SGD, {took('momentum')} of heavy ball and {took('nesterov')} of "
        f"Nesterov ({speedup(n, 'momentum')} and {speedup(n, 'nesterov')} fewer; 1/(1-beta) = "
        f"{1 / (1 - n['beta']):.0f}). SGD at the effective rate lr/(1-beta) = {n['effective_lr']:g} took "
        f"{took('sgd_effective_lr')} steps, {ratio:.2f} times the heavy ball's.{overdamped} At lr "
        f"{n['unstable_lr']:g}, between SGD's limit 2/lambda_max = {n['stable_below']['sgd']:.2f} and the heavy "
        f"ball's 2(1+beta)/lambda_max = {n['stable_below']['momentum']:.2f}, SGD "
        f"{'diverged' if div['sgd_unstable_lr'] else 'did not diverge'} and the heavy ball "
        f"{'diverged' if div['momentum_unstable_lr'] else 'converged'} ({took('momentum_unstable_lr')} steps to the "
        f"target); the effective-rate picture holds only while lr < 2(1-beta)/lambda_max = "
        f"{2 * (1 - n['beta']) / n['lambda_max']:.2f}. Criterion: heavy ball and "
        f"Nesterov need at most a third of SGD's steps ({'met' if gap else 'not met'}), SGD at lr/(1-beta) between "
        f"2/3 and 3/2 of the heavy ball's, overall and in the overdamped directions "
        f"({'met' if explained else 'not met'}), and at lr {n['unstable_lr']:g} SGD "
        f"diverges while the heavy ball converges ({'met' if stability else 'not met'})."
    )
    return gap and explained and stability, verdict


def speedup(n: dict, role: str) -> str:
    """How many times fewer steps ``role`` took than SGD: a lower bound where SGD never got there."""
    bound = "more than " if math.isinf(n["steps_to_target"]["sgd"]) else ""
    return f"{bound}{n['speedup_over_sgd'][role]:.1f}x"


def _steps(value: float, budget: int) -> str:
    return f"over {budget}" if math.isinf(value) else "n/a" if math.isnan(value) else f"{value:.0f}"


LABELS = {"sgd": "SGD, lr {lr:g}", "momentum": "heavy ball, lr {lr:g}", "nesterov": "Nesterov, lr {lr:g}",
          "sgd_effective_lr": "SGD, lr/(1-beta) = {effective_lr:g}",
          "momentum_unstable_lr": "heavy ball, lr {unstable_lr:g}", "sgd_unstable_lr": "SGD, lr {unstable_lr:g}"}
STYLES = {"sgd": ("C0", "-"), "momentum": ("C1", "-"), "nesterov": ("C2", "-"), "sgd_effective_lr": ("C3", "--"),
          "momentum_unstable_lr": ("C1", ":"), "sgd_unstable_lr": ("C0", ":")}


def draw(path: Path, results: dict[str, runs.Result], problem: Quadratic, n: dict, seed: int) -> Path:
    fig, axes = figures.figure(ncols=3, width=5.2, height=4.0)
    plot_excess(axes[0][0], results, problem, n, seed)
    low = {role: tuple(map(np.array, curve)) for role, curve in n["low_curvature_curves"].items()}
    plot_overdamped(axes[0][1], low, n)
    plot_steps(axes[0][2], list(results), n)
    return runs.save(fig, path)


def plot_excess(ax, results: dict[str, runs.Result], problem: Quadratic, n: dict, seed: int) -> None:
    floor, ceiling = n["target_excess"] * 1e-4, n["initial_excess"] * 1e3
    for role, result in results.items():
        steps, excess = excess_curve(result, problem)
        # Below the floor is float32 rounding (the excess can even come out negative).
        shown = np.isfinite(excess) & (excess > floor)
        color, line = STYLES[role]
        ax.plot(steps[shown], np.minimum(excess[shown], ceiling), color=color, linestyle=line,
                label=LABELS[role].format(**n) + (" (diverged)" if n["diverged"][role] else ""))
    ax.axhline(n["target_excess"], color="grey", linewidth=0.8, linestyle="--", label="target")
    ax.set(yscale="log", ylim=(floor, ceiling), xlabel="step (full-batch updates)",
           ylabel="excess loss L(w) - L* (MSE)",
           title=f"Excess loss; condition number {n['condition_number']:.0f}, quadratic of seed {seed}")
    ax.legend(fontsize=7)


def plot_overdamped(ax, low: dict, n: dict) -> None:
    for role, (steps, excess) in low.items():
        color, line = STYLES[role]
        ax.plot(steps, excess, color=color, linestyle=line, marker=".", markersize=3, label=LABELS[role].format(**n))
    ax.set_title(f"{n['overdamped_directions']} overdamped directions (lambda <= {n['overdamped_below']:.3g})",
                 fontsize=10)
    ax.set(xlabel="step (full-batch updates)", ylabel="excess loss in those directions")
    if low:
        ax.set_yscale("log")
        ax.legend(fontsize=7)


def plot_steps(ax, roles: list[str], n: dict) -> None:
    steps = [n["steps_to_target"][role] for role in roles]
    ax.bar(range(len(roles)), [h if math.isfinite(h) else 0 for h in steps], color=[STYLES[r][0] for r in roles])
    for i, (role, h) in enumerate(zip(roles, steps)):
        if math.isfinite(h):
            ax.annotate(f"{h:.0f}", (i, h), ha="center", va="bottom", fontsize=8)
        else:  # no bar: written from the bottom of the panel up
            ax.text(i, 0.03, "diverged" if n["diverged"][role] else "not reached", rotation=90, ha="center",
                    va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(roles)), [LABELS[role].format(**n).replace(", ", "\n") for role in roles], fontsize=7)
    ax.set(yscale="log", ylabel="steps to the target excess loss")
    ax.set_title(f"Steps to excess {n['target_excess']:.2g} ({n['target_excess'] / n['initial_excess']:.0e} of start)",
                 fontsize=10)
