"""The adaptive study's quick version: the construction of Wilson et al. (2017), Section 3.3, and a
small tuned comparison on digits."""

import numpy as np
import pytest

from distsgd.studies import adaptive, runs


def test_wilson_samples_follow_the_papers_rule():
    rng = np.random.default_rng(0)
    x, y = adaptive.wilson_samples(3 + 5 * np.arange(12), 0.55, rng, 72, more_positives=True)
    assert (y > 0).sum() > (y < 0).sum()
    assert (x[:, 0] == y).all() and (x[:, 1:3] == 1).all()
    # Unique features: one column for +1, five for -1, sample i's from 0-based column 3 + 5i.
    for i, label in enumerate(y):
        unique = np.flatnonzero(x[i, 3:]) + 3
        assert unique.tolist() == list(range(3 + 5 * i, 3 + 5 * i + (1 if label > 0 else 5)))
    assert not x[:, 3 + 5 * 12:].any()


def test_gd_generalizes_and_adaptive_methods_label_everything_positive(tmp_path):
    outcome = adaptive.run(tmp_path, quick=True)
    n = outcome.numbers
    assert list(n["wilson"]) == ["3"] and n["seeds"] == [3] and 3 in runs.HELD_OUT_SEEDS
    problem = n["wilson"]["3"]
    w, positives = problem["runs"], problem["test_positive_fraction"]
    assert 0 < positives < 1
    for method in ("gd", "sgd"):
        assert w[method]["test_accuracy"] == 1.0
        assert w[method]["distance_to_min_norm"] < 0.05  # GD and SGD from 0 head for the minimum-norm solution
    for method in adaptive.ADAPTIVE:
        assert w[method]["labelled_positive"] == 1.0
        assert w[method]["test_accuracy"] == pytest.approx(positives)
        assert w[method]["cosine_to_sign"] > 0.999  # proportional to sign(X^T y), as Lemma 3.1 says
    assert n["holds"]["wilson"] and "met on 1 of 1." in outcome.verdict
    # Digits: tuned over the grid on the tuning seed, Adam makes faster initial progress than SGD with
    # momentum on the held-out seed; 44 steps are too few for momentum to train, so the quick
    # version's generalization criterion is not met, and says so.
    d = n["digits"]
    assert d["adam"]["steps_to_target"] < d["momentum"]["steps_to_target"]
    assert d["momentum"]["tuned_lr"] == 0.1 and d["momentum"]["grid"][0.1]["final_accuracy"] > \
        d["momentum"]["grid"][0.01]["final_accuracy"]
    assert not n["holds"]["digits"] and "(not met: Adam ahead)" in outcome.verdict and not outcome.holds
    assert [p.name for p in outcome.figures] == ["adaptive.png", "adaptive_wilson.png"]
    assert all(p.is_file() for p in outcome.figures)
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert sum("model.bias=false model.init=zeros" in c for c in commands) == 5
    # The grid on the tuning seed, then each method at its tuned rate on the held-out seed.
    assert [c.count("data.seed=0 trainer.seed=0") for c in commands[:4]] == [1] * 4
    assert sum("data.seed=3 trainer.seed=3" in c for c in commands) == 2
