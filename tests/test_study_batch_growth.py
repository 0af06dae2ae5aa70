"""The quick batch-growth study (Smith et al. 2017), on a held-out seed: growing the batch where the
rate would decay ends at the same training loss and accuracy in fewer steps."""

from pytest import approx

from distsgd.metrics import read_scalars
from distsgd.studies import batch_growth, runs


def test_growing_the_batch_matches_decaying_the_rate_in_fewer_steps(tmp_path):
    outcome = batch_growth.run(tmp_path, quick=True)
    numbers = outcome.numbers
    assert numbers["seeds"] == [runs.HELD_OUT_SEEDS[0]] and "tuning" not in numbers
    # 3277 training samples: 102 steps per epoch at batch 32, 25 at 128, 6 at 512; 6 epochs.
    assert numbers["steps"] == {"decay": 6 * 102, "grow": 2 * 102 + 2 * 25 + 2 * 6}
    loss, accuracy = numbers["train_loss_mean"], numbers["accuracy_mean"]
    assert loss["decay"] < 0.6, numbers  # trained: chance is ln 4 = 1.39
    assert abs(loss["grow"] - loss["decay"]) <= numbers["loss_tolerance"] * loss["decay"], numbers
    assert abs(accuracy["grow"] - accuracy["decay"]) <= numbers["accuracy_tolerance"], numbers
    assert outcome.holds and outcome.verdict.endswith("and matches (criterion: val accuracy means within 2 pp, "
                                                      "training loss means within 10%). The claim holds on the "
                                                      "held-out seeds.")
    # Each run anneals what it says: the rate at constant batch, or the batch at constant rate.
    for name, lrs, batches in (("decay", (0.1, 0.025, 0.00625), {32}), ("grow", (0.1,), {32, 128, 512})):
        curves = read_scalars(tmp_path / "runs" / f"{name}_seed3" / "tensorboard")
        assert sorted({e.value for e in curves["train/lr"]}, reverse=True) == approx(lrs)
        assert {e.value for e in curves["train/global_batch_size"]} == batches
    assert all(path.stat().st_size > 0 for path in outcome.figures)
