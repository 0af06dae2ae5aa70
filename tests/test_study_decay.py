"""The decay study, quick, on a held-out seed: on noisy-label logistic regression, every schedule
that decays from a rate ends with a lower training loss than that rate held constant, which stalls
above the least loss."""

from __future__ import annotations

from distsgd.studies import decay, runs


def test_every_decay_ends_below_the_same_constant_rate_which_stalls_above_the_least_loss(tmp_path):
    outcome = decay.run(tmp_path, quick=True)
    n = outcome.numbers["noise_floor"]
    assert n["seeds"] == [runs.HELD_OUT_SEEDS[0]] and n["tuning"]["seed"] is None  # one rate: nothing tuned
    final = {schedule: losses[0] for schedule, losses in n["final_train_loss_by_seed"].items()}
    assert list(final) == ["constant", "step", "multistep", "exponential", "cosine"]
    least = n["least_loss_by_seed"][0]
    assert least < min(final.values())
    for schedule in decay.DECAYS:
        assert final[schedule] < final["constant"], final
    # The constant rate's excess over the least loss is its noise floor; cosine ends far below it.
    assert final["constant"] - least > 5 * (final["cosine"] - least), (final, least)
    assert all(n["beats_constant"].values()) and outcome.holds
    accuracy = n["val_accuracy"]
    assert outcome.verdict.endswith(
        "4 of 4 decays end below the constant rate by more than the seed spread. Validation accuracy at the tuned "
        f"rates: constant {accuracy['constant']:.3f}, decays {min(accuracy[s] for s in decay.DECAYS):.3f} to "
        f"{max(accuracy[s] for s in decay.DECAYS):.3f}. The claim holds on the held-out seeds.")
    commands = (tmp_path / "commands.sh").read_text()
    assert "schedule=cosine" in commands and commands.count("data.seed=3 trainer.seed=3") == 5
    assert [p.name for p in outcome.figures] == ["decay_final.png"]
