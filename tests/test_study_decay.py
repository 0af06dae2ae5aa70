"""The decay study, quick: on noisy-label logistic regression, every schedule that decays from a
rate ends with a lower training loss than that rate held constant, which stalls above the least loss."""

from __future__ import annotations

from distsgd.studies import decay


def test_every_decay_ends_below_the_same_constant_rate_which_stalls_above_the_least_loss(tmp_path):
    outcome = decay.run(tmp_path, quick=True)
    n = outcome.numbers["noise_floor"]
    final = {schedule: losses[0] for schedule, losses in n["final_train_loss"].items()}
    assert list(final) == ["constant", "step", "multistep", "exponential", "cosine"]
    least = n["least_loss"]
    assert least < min(final.values())
    for schedule in ("step", "multistep", "exponential", "cosine"):
        assert final[schedule] < final["constant"], final
    # The constant rate's excess over the least loss is its noise floor; cosine ends far below it.
    assert final["constant"] - least > 5 * (final["cosine"] - least), (final, least)
    assert all(n["beats_best_constant"].values()) and outcome.holds
    assert "schedule=cosine" in (tmp_path / "commands.sh").read_text()
    assert [p.name for p in outcome.figures] == ["decay_final.png"]
