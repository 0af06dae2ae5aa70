"""The learning-rate study, quick: on the digits MLP a too-low rate crawls, a too-high one blows up
to no better than chance, and the LR range test suggests a rate between them."""

from __future__ import annotations

import pytest

from distsgd.studies import learning_rate


def test_too_low_crawls_too_high_blows_up_and_the_range_test_suggests_a_rate_between(tmp_path):
    outcome = learning_rate.run(tmp_path, quick=True)
    n = outcome.numbers
    assert n["lrs"] == pytest.approx([0.01, 10 ** -0.5, 10 ** 0.5])
    low, middle, high = n["final_train_loss"]
    assert low > learning_rate.CRAWL * middle, n["final_train_loss"]
    assert high >= learning_rate.CHANCE > low, n["final_train_loss"]  # the low one did learn, barely
    assert n["blew_up_by_seed"] == [[False, False, True]]
    assert n["best_lr"] == n["lrs"][1] and n["val_accuracy"][1] > 0.8
    steepest = n["range_tests"][0]["steepest"]
    assert n["lrs"][0] < steepest < n["lrs"][2]
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert [c.split()[0] for c in commands] == ["distsgd-train"] * 3 + ["distsgd-lr-find"]
    assert all("data=digits" in c and "model=mlp" in c for c in commands)
    assert (tmp_path / "runs" / "lr_find_seed0" / "lr_find.csv").is_file()
    assert [p.name for p in outcome.figures] == ["lr_sweep.png", "lr_curves.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in outcome.figures)
