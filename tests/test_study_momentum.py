"""The momentum study's quick version, on a held-out quadratic: heavy ball and Nesterov against SGD
on an ill-conditioned quadratic."""

import math

import numpy as np

from distsgd.studies import momentum, runs


def test_momentum_takes_fewer_steps_and_is_stable_where_sgd_is_not(tmp_path):
    outcome = momentum.run(tmp_path, quick=True)
    assert outcome.numbers["seeds"] == [3] and 3 in runs.HELD_OUT_SEEDS
    n = outcome.numbers["by_seed"]["3"]
    steps = n["steps_to_target"]
    # The problem has the spectrum it was built with: lambda_max 1, condition number kappa.
    assert math.isclose(n["lambda_max"], 1, rel_tol=1e-5)
    assert math.isclose(n["condition_number"], momentum.QUICK.kappa, rel_tol=1e-4)
    # Same lr: momentum needs a fraction of SGD's steps (SGD does not get there within its budget
    # on this quadratic), about what SGD at lr / (1 - beta) needs.
    assert math.isinf(steps["sgd"]) and max(steps["momentum"], steps["nesterov"]) < momentum.QUICK.sgd_steps / 3
    assert "after over 600 steps of SGD" in outcome.verdict and "more than 8.2x" in outcome.verdict
    assert 2 / 3 <= steps["sgd_effective_lr"] / steps["momentum"] <= 3 / 2
    # Between 2 / lambda_max and 2 (1 + beta) / lambda_max only the heavy ball converges.
    assert n["stable_below"]["sgd"] < momentum.QUICK.unstable_lr < n["stable_below"]["momentum"]
    assert n["diverged"]["sgd_unstable_lr"] and not n["diverged"]["momentum_unstable_lr"]
    assert math.isinf(steps["sgd_unstable_lr"]) and math.isfinite(steps["momentum_unstable_lr"])
    assert not any(n["diverged"][role] for role in ("sgd", "momentum", "nesterov", "sgd_effective_lr"))
    assert n["holds"] and outcome.holds and outcome.verdict.endswith(
        "The claim holds on the held-out seeds (1 of 1 meet the criterion).")
    assert [p.name for p in outcome.figures] == ["momentum.png"] and outcome.figures[0].is_file()
    # The runs are distsgd-train commands on the generated file, without a bias, from w = 0.
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert len(commands) == 6 and all("model.bias=false model.init=zeros" in c for c in commands)
    with np.load(tmp_path / "quadratic_seed3.npz") as data:
        assert data["x"].shape == (momentum.QUICK.samples, momentum.QUICK.dim) and data["y"].dtype == np.float32
