"""The LR range test: its rules; on least squares, where it stops against the stability limit
2/lambda_max; the same sweep on 1 and 2 processes; what it writes and prints, and when it refuses."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import CONF, REPO, make_config, subprocess_env
from hydra.core.override_parser.overrides_parser import OverridesParser

from distsgd import data, lr_find
from distsgd.config import ConfigError, LrFindConfig, to_config

# y = X w* + noise with d = 8 and 2048 training samples; global batch 256, so 8 batches an epoch and
# about 10 epochs of the training run's order; rates 1e-3 to 10 in 100 updates, x1.097 each.
LEAST_SQUARES = ["data=synthetic_regression", "model=linear", "optim=sgd", "data.dim=8", "data.num_samples=2560",
                 "data.global_batch_size=256", "lr_find.min_lr=1e-3"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The least-squares sweep in this process, and as a user runs it under torchrun on 2 processes."""
    root = tmp_path_factory.mktemp("lr_find")
    one = lr_find.run(make_config(*LEAST_SQUARES), root / "one")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "distsgd.lr_find", f"hydra.run.dir={root / 'two'}", *LEAST_SQUARES],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "one": one, "stdout": done.stdout}


def stability_limit(overrides: list[str]) -> float:
    """2 / lambda_max for mse_loss in (w, b) over the training set, whose Hessian is 2 [X 1]^T [X 1] / n."""
    x = data.load(to_config(make_config(*overrides)).data).x_train.double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return 2 / torch.linalg.eigvalsh(2 * x1.T @ x1 / len(x1)).max().item()


def updates_to_grow(growth: float, ratio: float) -> int:
    """Updates past the limit until gradient descent has grown the top mode's loss ``growth``-fold:
    at u = lr / limit each update multiplies it by (2u - 1)^2, and u grows by ``ratio`` per update."""
    updates, log_growth = 0, 0.0
    while log_growth < math.log(growth):
        updates += 1
        log_growth += 2 * math.log(2 * ratio ** updates - 1)
    return updates


def test_least_squares_diverges_just_past_two_over_lambda_max_and_the_suggestions_are_below(sweeps):
    limit, result = stability_limit(LEAST_SQUARES), sweeps["one"]
    ratio, beta = result.lrs[1] / result.lrs[0], LrFindConfig().beta
    # Below the limit every mode contracts. Minibatch noise lowers the loss's own (second-moment)
    # limit only to limit / (1 + (d + 1) / B) = 0.97 limit here, and growing 4-fold takes updates
    # beyond that, so the stop comes past the limit. Above it: the smoothed loss passes 4x its
    # lowest once the raw loss has grown about 4 / (1 - beta) = 20-fold, starting from a top mode
    # that holds at least 1/1000 of the loss when the rate crosses the limit (SGD's noise keeps it
    # excited; about 1/100 here). That takes 8 updates at x1.097 (to 2.1x the limit), plus one more
    # because row i's loss is measured before update i: the stop lies in (1, 2.3) x the limit.
    updates = updates_to_grow(lr_find.DIVERGENCE / (1 - beta) * 1000, ratio)
    assert limit < result.lrs[-1] < limit * ratio ** (updates + 1), (result.lrs[-1], limit)
    assert result.stopped == f"the smoothed loss passed {lr_find.DIVERGENCE:g}x its lowest"
    suggestion = result.suggest(LrFindConfig(min_lr=1e-3))
    assert suggestion.steepest < limit and suggestion.lowest / 10 < limit, (suggestion, limit)


def read_csv(path) -> tuple[list[str], np.ndarray]:
    with path.open() as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=float)


def test_two_processes_sweep_as_one_stop_together_and_rank_0_alone_reports(sweeps):
    root, one = sweeps["root"], sweeps["one"]
    (header, single), (header_two, double) = read_csv(root / "one/lr_find.csv"), read_csv(root / "two/lr_find.csv")
    assert header == header_two == ["lr", "loss", "smoothed_loss"]
    assert single.T.tolist() == [one.lrs, one.losses, one.smoothed]
    # Both stopped after the same update, well before the last: neither rank waited for the other.
    assert len(double) == len(single) < LrFindConfig().steps
    assert double[:, 0].tolist() == single[:, 0].tolist()
    # The same global batches, summed in another order in float32 (two halves, then their mean):
    # about 1e-7 apart per update, up to 1.3e-6 in the last rows, where the diverging mode grows
    # 10-fold an update and carries its rounding along.
    np.testing.assert_allclose(double[:, 1:], single[:, 1:], rtol=2e-6)

    assert sorted(p.name for p in (root / "two").iterdir()) == [".hydra", "lr_find.csv", "lr_find.png",
                                                                 "rank0.log", "rank1.log"]  # no checkpoint
    png = (root / "two/lr_find.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    stdout, suggestion = sweeps["stdout"], one.suggest(LrFindConfig(min_lr=1e-3))
    assert stdout.count("suggested lr:") == 1, stdout
    assert f"suggested lr: {suggestion.steepest:.3g} for global batch size 256 (steepest descent of the smoothed " \
           f"loss in log lr, shown at lr {one.lrs[suggestion.rows[0]]:.3g} and read back by the smoothing's lag of " \
           f"{lr_find.lag(suggestion.rows[0], 0.8):.1f} updates)" in stdout
    assert f"alternative: {suggestion.lowest / 10:.3g} (lowest smoothed loss at lr {suggestion.lowest:.3g}" in stdout


def test_rates_smoothing_and_the_stop_rule():
    assert lr_find.rates(LrFindConfig(min_lr=1e-3, max_lr=10, steps=21))[::5] == pytest.approx(
        [1e-3, 1e-2, 0.1, 1, 10], rel=1e-12)
    smoothing = lr_find.SmoothedLoss(beta=0.5)
    assert smoothing.add(4.0) == 4.0  # bias-corrected: the first loss is its own average
    assert smoothing.add(1.0) == pytest.approx((0.5 * 4.0 + 1.0) / 1.5)  # = 2, the lowest so far
    assert not smoothing.diverged(8.0) and smoothing.diverged(8.001)
    assert smoothing.diverged(math.nan) and smoothing.diverged(math.inf)


def test_the_suggestions_follow_their_rules():
    cfg = LrFindConfig(min_lr=1e-4, max_lr=1, steps=21)  # the first 2 points are skipped
    lrs = lr_find.rates(cfg)
    # A steeper drop within the skipped start and another after the minimum (index 12) are decoys;
    # the steepest descent between them is at index 7 (central differences: -1.4 per step).
    smoothed = [9, 5, 5, 5, 4.9, 4.7, 4.3, 3.5, 1.5, 1.2, 1.0, 0.9, 0.85, 8.0, 1.0, 2.0, math.inf]
    suggestion = lr_find.Sweep(lrs[:17], smoothed, smoothed, "diverged", 32).suggest(cfg)
    assert suggestion.rows == (7, 12) and suggestion.lowest == lrs[12]
    # Row 7's slope shows the updates lag(7) rows earlier: the mean age of the moving average's 8
    # weights 0.8^k, plus half a row (a row is measured before its own update).
    weights = 0.8 ** np.arange(8)
    assert lr_find.lag(7, 0.8) == pytest.approx(np.arange(8) @ weights / weights.sum() + 0.5)
    assert lr_find.lag(500, 0.8) == pytest.approx(0.8 / 0.2 + 0.5)
    assert suggestion.steepest == pytest.approx(lrs[7] * (lrs[1] / lrs[0]) ** -lr_find.lag(7, 0.8))
    assert lr_find.Sweep(lrs[:5], [3, 2, 1.9, 3, 20], [3, 2, 1.9, 3, 20], "diverged", 32).suggest(cfg) is None
    assert lr_find.Sweep(lrs[:1], [math.nan], [math.nan], "non-finite", 32).suggest(cfg) is None


def test_the_suggestion_is_read_back_by_the_smoothings_lag():
    """On a loss whose updates lower it fastest at update 45, the suggestion lands within one of
    the sweep's steps of that update's rate; read where the smoothed slope shows it, it would land
    lag = beta/(1-beta) + 1/2 = 4.5 updates later."""
    cfg = LrFindConfig(min_lr=1e-4, max_lr=10, steps=100)
    lrs, ratio = lr_find.rates(cfg), 10 ** (5 / 99)
    drops = 0.05 * np.exp(-((np.arange(100) - 45) / 15) ** 2)  # what update j takes off the loss
    losses = [3 - drops[:i].sum() + 0.02 * max(0, i - 80) ** 2 for i in range(100)]  # row i: before update i
    smoothing = lr_find.SmoothedLoss(cfg.beta)
    suggestion = lr_find.Sweep(lrs, losses, [smoothing.add(loss) for loss in losses], "", 32).suggest(cfg)
    assert abs(math.log(suggestion.steepest / lrs[45])) <= math.log(ratio), suggestion
    assert suggestion.rows[0] - 45 in (4, 5), suggestion


def test_no_rate_to_suggest_says_what_can_help():
    cfg = LrFindConfig(min_lr=1e-7, max_lr=1e-3, steps=20)
    lrs = lr_find.rates(cfg)
    # The initial model's loss is not finite: no range helps.
    why = lr_find.Sweep(lrs[:1], [math.nan], [math.nan], "a non-finite loss or gradient", 32).why_none(cfg)
    assert why.startswith("the initial model's loss is not finite") and "min_lr" not in why
    # The whole range ran without the loss falling past its start: the rates were too low.
    flat = [2.0, 1.9] + [2.0] * 18
    why = lr_find.Sweep(lrs, flat, flat, "", 32).why_none(cfg)
    assert "a lower lr_find.min_lr cannot help; raise lr_find.max_lr" in why, why
    # Flat until it diverged, late in the range: neither end of the range is the trouble.
    late = [2.0, 1.9] + [2.0] * 14 + [9.0]
    why = lr_find.Sweep(lrs[:17], late, late, "diverged", 32).why_none(cfg)
    assert "a lower lr_find.min_lr cannot help: more lr_find.steps" in why, why


def test_a_sweep_that_diverges_from_the_start_writes_its_curve_and_refuses_to_suggest(tmp_path):
    with pytest.raises(ConfigError, match=r"lr_find: no rate to suggest: the smoothed loss was lowest at lr 5, in the "
                                          r"first 10% of the sweep, and it diverged soon after, at lr \S+: the range "
                                          r"starts too high; lower lr_find.min_lr \(see "):
        lr_find.run(make_config(*LEAST_SQUARES, "lr_find.min_lr=5", "lr_find.max_lr=50", "lr_find.steps=20"), tmp_path)
    header, rows = read_csv(tmp_path / "lr_find.csv")
    assert rows[0, 0] == 5 and 2 <= len(rows) < 20
    assert (tmp_path / "lr_find.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("override,message", [
    ("lr_find.min_lr=0", "lr_find.min_lr must be > 0"),
    ("lr_find.max_lr=1e-8", "lr_find.max_lr must be > lr_find.min_lr=1e-07, got 1e-08"),
    ("lr_find.steps=2", "lr_find.steps must be >= 20 (the rate is read past the sweep's first 10%, from a moving "
                        "average of several updates: shorter sweeps leave no rate to read), got 2"),
    ("lr_find.beta=1", "lr_find.beta must be in [0, 1)"),
])
def test_bad_keys_name_themselves(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_config(make_config(override))


def test_a_sweep_gets_folders_of_its_own_unless_the_command_names_them():
    training = yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]
    added = lr_find.with_default_dirs(["optim=adam"])[1:]
    assert [o.split("=", 1)[0] for o in added] == ["hydra.run.dir", "hydra.sweep.dir"]
    assert added[0].split("=", 1)[1] != training["run"]["dir"]
    assert added[1].split("=", 1)[1] != training["sweep"]["dir"]
    OverridesParser.create().parse_overrides(added)  # Hydra's grammar takes them as they are
    named = ["hydra.run.dir=runs/x", "++hydra.sweep.dir=runs/y"]
    assert lr_find.with_default_dirs(named) == named
