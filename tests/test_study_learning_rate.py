"""The learning-rate study, quick, on a held-out seed: on the digits MLP a too-low rate crawls, a
too-high one blows up to no better than chance, and the LR range test suggests a rate near the best."""

from __future__ import annotations

import pytest

from distsgd.studies import learning_rate, runs


def test_too_low_crawls_too_high_blows_up_and_the_range_test_suggests_near_the_best(tmp_path):
    outcome = learning_rate.run(tmp_path, quick=True)
    n = outcome.numbers
    assert n["seeds"] == [4] and 4 in runs.HELD_OUT_SEEDS and "tuning" not in n
    assert n["lrs"] == pytest.approx([0.01, 10 ** -0.5, 1, 10 ** 0.5])
    low, best, _, high = n["final_train_loss"]
    assert low > learning_rate.CRAWL * best, n["final_train_loss"]
    assert high >= learning_rate.CHANCE > low, n["final_train_loss"]  # the low one did learn, barely
    assert n["blew_up_by_seed"] == [[False, False, True, True]]
    assert n["best_lr"] == n["lrs"][1] and n["val_accuracy"][1] > 0.8
    # The suggestion, read back by the smoothing's lag, lies within x3 of the best grid rate.
    test = n["range_tests"][0]
    assert 1 / learning_rate.NEAR < test["steepest"] / n["best_lr"] < learning_rate.NEAR, test["steepest"]
    assert test["steepest"] < test["steepest_as_read"]
    assert outcome.holds and all(n["checks"].values())
    assert outcome.verdict.endswith("The claim holds on the held-out seeds.")
    assert f"batch {n['global_batch']}" in outcome.verdict and n["validation_samples"] == 359
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert [c.split()[0] for c in commands] == ["distsgd-train"] * 4 + ["distsgd-lr-find"]
    assert all("data=digits" in c and "model=mlp" in c and "data.seed=4 trainer.seed=4" in c for c in commands)
    assert (tmp_path / "runs" / "lr_find_seed4" / "lr_find.csv").is_file()
    assert [p.name for p in outcome.figures] == ["lr_sweep.png", "lr_curves.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in outcome.figures)
