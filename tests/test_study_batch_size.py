"""The batch-size study (distsgd.studies.batch_size): the fit of McCandlish et al.'s front, and the
quick version of the claim on a held-out seed, trained through distsgd."""

import math

import numpy as np

from distsgd.metrics import read_scalars
from distsgd.studies import batch_size, runs


def test_front_fit_recovers_the_hyperbola_and_the_target_step_is_interpolated():
    batches = np.array([8.0, 32.0, 128.0, 512.0])
    steps = 20.0 + 4000.0 / batches  # S_min = 20, E_min = 4000, so B_crit = 200
    assert np.allclose(batch_size.fit_front(batches, steps), (20.0, 4000.0))
    # Every point lies on (S/S_min - 1)(E/E_min - 1) = 1 (Eq. 2.11).
    assert np.allclose((steps / 20 - 1) * (steps * batches / 4000 - 1), 1.0)
    evaluations, losses = np.array([0, 10, 20, 30]), np.array([1.5, 1.2, 1.0, 0.9])
    assert math.isclose(batch_size.steps_to_target(evaluations, losses, 1.1), 15.0)
    assert batch_size.steps_to_target(evaluations, losses, 1.5) == 0.0
    assert batch_size.steps_to_target(evaluations, losses, 0.5) == math.inf
    # The verdict says how B_crit and B_simple move as the target falls, from the numbers.
    assert batch_size.trend([106, 129, 181]) == "rises at every lower target"
    assert batch_size.trend([181, 179]) == "falls at every lower target"
    assert batch_size.trend([106, 129, 181, 179]) == "does not move one way as the target falls"


def test_quick_study_shows_perfect_scaling_then_diminishing_returns_and_b_simple_near_b_crit(tmp_path):
    outcome = batch_size.run(tmp_path, quick=True)
    numbers = outcome.numbers
    # A held-out seed, to its own target: the lowest validation loss its runs logged plus the margin.
    assert numbers["seeds"] == [runs.HELD_OUT_SEEDS[0]] and list(numbers["by_seed"]) == ["3"]
    logged = [e.value for path in (tmp_path / "runs").iterdir()
              for e in read_scalars(path / "tensorboard")["val/loss"]]
    assert numbers["floor"] == {"3": min(logged)}
    steps = {int(b): row["steps"] for b, row in numbers["per_batch"].items()}
    assert sorted(steps) == batch_size.QUICK_BATCHES and numbers["all_reached"]
    # Below the knee a 4x batch takes about a quarter of the steps; far above it about as many.
    assert 0.15 < steps[64] / steps[16] < 0.45
    assert 0.7 < steps[2048] / steps[512] < 1.4
    assert numbers["s_min"] > 0 and numbers["e_min"] > 0
    grid = (min(steps), max(steps))
    assert grid[0] < numbers["b_crit"] < grid[1]
    # B_simple, measured by diagnostics.noise_scale as the runs reached the target, lies inside the
    # grid and within the study's factor of B_crit.
    assert grid[0] < numbers["b_simple"] < grid[1]
    assert 1 / batch_size.NEAR < numbers["b_simple"] / numbers["b_crit"] < batch_size.NEAR
    assert outcome.holds and outcome.verdict.endswith("The claim holds on the held-out seeds.")
    assert all(path.is_file() for path in outcome.figures)
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert len(commands) == len(batch_size.QUICK_BATCHES) and all("data.seed=3 trainer.seed=3" in c for c in commands)
