"""The momentum study's quick version: heavy ball and Nesterov against SGD on an ill-conditioned quadratic."""

import math

import numpy as np

from distsgd.studies import momentum


def test_momentum_takes_fewer_steps_and_is_stable_where_sgd_is_not(tmp_path):
    outcome = momentum.run(tmp_path, quick=True)
    n = outcome.numbers
    steps = n["steps_to_target"]
    # The problem has the spectrum it was built with: lambda_max 1, condition number kappa.
    assert math.isclose(n["lambda_max"], 1, rel_tol=1e-5)
    assert math.isclose(n["condition_number"], momentum.QUICK.kappa, rel_tol=1e-4)
    # Same lr: momentum needs a fraction of SGD's steps, about what SGD at lr / (1 - beta) needs.
    assert steps["momentum"] < steps["sgd"] / 3 and steps["nesterov"] < steps["sgd"] / 3
    assert 2 / 3 <= steps["sgd_effective_lr"] / steps["momentum"] <= 3 / 2
    assert math.isfinite(steps["sgd"])
    # Between 2 / lambda_max and 2 (1 + beta) / lambda_max only the heavy ball converges.
    assert n["stable_below"]["sgd"] < momentum.QUICK.unstable_lr < n["stable_below"]["momentum"]
    assert n["diverged"]["sgd_unstable_lr"] and not n["diverged"]["momentum_unstable_lr"]
    assert math.isinf(steps["sgd_unstable_lr"]) and math.isfinite(steps["momentum_unstable_lr"])
    assert not any(n["diverged"][role] for role in ("sgd", "momentum", "nesterov", "sgd_effective_lr"))
    assert outcome.holds and [p.name for p in outcome.figures] == ["momentum.png"] and outcome.figures[0].is_file()
    # The runs are distsgd-train commands on the generated file, without a bias, from w = 0.
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert len(commands) == 6 and all("model.bias=false model.init=zeros" in c for c in commands)
    with np.load(tmp_path / "quadratic.npz") as data:
        assert data["x"].shape == (momentum.QUICK.samples, momentum.QUICK.dim) and data["y"].dtype == np.float32
