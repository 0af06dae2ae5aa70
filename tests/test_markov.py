"""data=markov: the chain's stationary distribution, entropy rate and window floor against exact
values and the generated sequence, determinism, and the floor logged by a training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_config, read_scalars

from distsgd import data, markov, models
from distsgd.config import ConfigError, DataConfig
from distsgd.train import run


def _entropy(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p)


def test_a_two_state_chain_has_its_stationary_distribution_and_entropy_rate():
    probs = np.array([[0.9, 0.1], [0.5, 0.5]])
    pi = markov.stationary_distribution(probs, 2, 1)
    assert pi == pytest.approx([5 / 6, 1 / 6], abs=1e-12)  # pi_0 * 0.1 = pi_1 * 0.5
    chain = markov.Chain(2, 1, probs, pi)
    expected = 5 / 6 * _entropy([0.9, 0.1]) + 1 / 6 * math.log(2)
    assert chain.entropy_rate == pytest.approx(expected, abs=1e-12)
    assert chain.window_floor(8) == pytest.approx(expected, abs=1e-12)  # order 1: every position has its context


def _plug_in_entropy(tokens: np.ndarray, context: int, vocab: int) -> float:
    """H(X_t | the `context` tokens before it), estimated from the counts of (context + 1)-grams."""
    grams = np.zeros(len(tokens) - context, dtype=np.int64)
    for i in range(context + 1):
        grams = grams * vocab + tokens[i:len(tokens) - context + i]
    joint = np.bincount(grams, minlength=vocab ** (context + 1)).reshape(-1, vocab) / len(grams)
    rows = joint.sum(axis=1, keepdims=True)
    inside = joint > 0
    return float(-(joint[inside] * np.log((joint / rows)[inside])).sum())


def test_the_entropy_rate_and_the_window_floor_match_the_generated_sequence():
    vocab, order, block, n = 6, 3, 16, 200_000
    rng = np.random.default_rng(0)
    chain = markov.Chain.random(vocab, order, 0.2, rng)
    tokens = chain.sample(n, rng)
    assert chain.stationary.min() > 0 and chain.stationary.sum() == pytest.approx(1, abs=1e-12)
    step = (chain.stationary[:, None] * chain.probs).reshape(vocab, -1).sum(axis=0)
    assert np.abs(step - chain.stationary).sum() < 1e-12  # pi P = pi
    # The sequence's mean -log p estimates the entropy rate with a standard error of about
    # std / sqrt(n) (its terms are nearly independent in a chain this quick to mix: 1.9e-3 here);
    # allowed: 4 of them (7.6e-3 nats). Weighting the contexts uniformly instead of by pi misses
    # by 24 of them.
    nll = -np.log(chain.probs[np.ravel_multi_index(tuple(tokens[i:n - order + i] for i in range(order)),
                                                   (vocab,) * order), tokens[order:]])
    error = 4 * nll.std() / math.sqrt(len(nll))
    assert chain.mean_nll(tokens) == pytest.approx(nll.mean(), abs=1e-12)
    assert abs(nll.mean() - chain.entropy_rate) < error
    uniform = float((-(chain.probs * np.log(chain.probs)).sum(axis=1)).mean())
    assert abs(uniform - chain.entropy_rate) > 5 * error
    # The first positions of a window see 1 and 2 tokens of the 3 the chain depends on: their
    # entropies against the counts of bigrams and trigrams, within the same 4 standard errors
    # (the plug-in estimate's bias, about cells / 2n, is below 6e-4).
    shorter = [chain.context_entropy(j) for j in (1, 2)]
    assert shorter[0] > shorter[1] > chain.entropy_rate
    for j, exact in zip((1, 2), shorter):
        assert abs(_plug_in_entropy(tokens, j, vocab) - exact) < error, j
    assert chain.window_floor(block) == pytest.approx((sum(shorter) + (block - 2) * chain.entropy_rate) / block,
                                                      abs=1e-12)


def test_markov_data_is_its_seed_s_and_states_its_floor(caplog):
    cfg = dict(name="markov", vocab_size=8, order=2, concentration=0.5, num_tokens=5000, block_size=16,
               val_fraction=0.1)
    with caplog.at_level("INFO", logger="distsgd"):
        first = data.load(DataConfig(**cfg))
    again = data.load(DataConfig(**cfg, num_workers=0))  # another cache entry: generated anew
    other = data.load(DataConfig(**{**cfg, "seed": 1}))
    every = torch.arange(len(first.x_train))
    assert torch.equal(first.x_train[every], again.x_train[every]) and first.x_train.tokens is not again.x_train.tokens
    assert not torch.equal(first.x_train[every], other.x_train[every])
    rng = np.random.default_rng(0)
    chain = markov.Chain.random(8, 2, 0.5, rng)
    sequence = chain.sample(5000, rng)
    assert torch.equal(first.x_train[torch.tensor([0])][0], torch.from_numpy(sequence[:16]))
    assert (first.task, first.num_outputs, first.loss_floor, first.bytes_per_token) == (
        "language_model", 8, pytest.approx(chain.window_floor(16), abs=1e-12), None)
    assert (len(first.x_train), len(first.x_val)) == ((4500 - 1) // 16, (500 - 1) // 16) == (
        data.train_size(DataConfig(**cfg)), len(first.x_val))
    assert (f"order-2 Markov chain over 8 tokens (data.concentration=0.5, data.seed=0), 5,000 tokens: entropy rate "
            f"{chain.entropy_rate:.6f} nats per token (the sequence's own mean -log p {chain.mean_nll(sequence):.6f}); "
            f"loss floor {chain.window_floor(16):.6f} over windows of 16") in caplog.text


@pytest.mark.parametrize("cfg,message", [
    (dict(vocab_size=16, concentration=0.01), "data.concentration=0.01 is so small that some transitions"),
    (dict(vocab_size=256, order=3), "data.vocab_size=256 with data.order=3 gives 16777216 contexts"),
    (dict(vocab_size=8, num_tokens=100, block_size=90), "data.num_tokens=100: its training part"),
])
def test_bad_chains_are_one_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        data.load(DataConfig(name="markov", **cfg))


def test_markov_keys_are_checked():
    with pytest.raises(ConfigError, match="data.vocab_size must be set for data=markov"):
        DataConfig(name="markov")
    with pytest.raises(ConfigError, match="data.concentration must be > 0"):
        DataConfig(name="markov", vocab_size=4, concentration=0)


class Bigram(torch.nn.Module):
    """Logits of the next token from the current one alone: an order-1 chain's exact model class."""

    def __init__(self, vocab: int):
        super().__init__()
        self.logits = torch.nn.Embedding(vocab, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def _token_loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=reduction)


def test_a_run_logs_the_floor_and_an_exact_model_class_reaches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "build", lambda cfg, shape, vocab, task: Bigram(vocab))
    monkeypatch.setattr(models, "loss_fn", lambda task: _token_loss)
    cfg = make_config("data=markov", "data.order=1", "data.vocab_size=8", "data.concentration=0.5",
                      "data.num_tokens=32768", "data.block_size=32", "data.global_batch_size=32", "optim=adam",
                      "optim.lr=0.1", "trainer.max_steps=150", "trainer.val_every=50", "trainer.log_every=50")
    metrics = run(cfg, tmp_path)
    scalars = read_scalars(tmp_path)
    floor = data.load(DataConfig(name="markov", order=1, vocab_size=8, concentration=0.5, num_tokens=32768,
                                 block_size=32, val_fraction=0.1)).loss_floor
    assert scalars["val/loss_floor"] == [(step, pytest.approx(floor, rel=1e-6)) for step in (0, 50, 100, 150)]
    # 150 steps of Adam: from log 8 = 2.08 nats to within 0.02 of the floor (about 1.6 here).
    assert scalars["val/loss"][0][1] - floor > 0.3
    assert 0 < metrics["val/loss"] - floor < 0.02
