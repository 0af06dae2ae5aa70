"""data=markov: a synthetic language with a known loss floor, a random order-k Markov chain.

Each context of ``order`` tokens (a state; V**order of them) has its own next-token distribution,
drawn from a symmetric Dirichlet(concentration): small concentrations give peaked distributions
and a low entropy rate. Every transition must have a positive probability: then every state
reaches every other in exactly ``order`` steps, the chain is ergodic and its stationary
distribution unique. The sequence starts from that distribution, so every position of it is
distributed alike.

Its entropy rate is ``h = sum_s pi(s) H(P(.|s))`` nats per token. A model that sees a window of
block_size tokens predicts position p (0-based) from the p + 1 tokens before it: the first
``order - 1`` positions lack part of their context, and the least expected loss over a window is
the mean over its positions of ``H(X_t | the min(p + 1, order) tokens before it)``: the window's
loss floor, h itself for order 1 and above h by O(order / block_size) otherwise.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from distsgd.config import ConfigError

MAX_TRANSITIONS = 2**24  # V**(order + 1) probabilities in float64: 128 MiB
MAX_ITERATIONS = 10_000  # of the power iteration; a chain that needs more barely mixes
TOLERANCE = 1e-13  # of the stationary distribution, in L1


@dataclass(frozen=True)
class Chain:
    vocab_size: int
    order: int
    probs: np.ndarray  # (V**order, V): row s, the next-token distribution of state s
    stationary: np.ndarray  # (V**order,)

    @staticmethod
    def random(vocab_size: int, order: int, concentration: float, rng: np.random.Generator) -> "Chain":
        states = vocab_size**order
        if states * vocab_size > MAX_TRANSITIONS:
            raise ConfigError(f"data.vocab_size={vocab_size} with data.order={order} gives {states} contexts of "
                              f"{vocab_size} transitions each, more than {MAX_TRANSITIONS}: lower one of them")
        probs = rng.dirichlet(np.full(vocab_size, concentration), size=states)
        if not (probs > 0).all():
            raise ConfigError(f"data.concentration={concentration} is so small that some transitions of the "
                              f"{vocab_size}-token chain have probability 0 (underflow), so it may not be ergodic "
                              "and its floor would depend on where it starts: raise it")
        return Chain(vocab_size, order, probs, stationary_distribution(probs, vocab_size, order))

    def context_entropy(self, context: int) -> float:
        """H(X_t | X_{t-context}..X_{t-1}) in nats under the stationary distribution (context <= order)."""
        v, k = self.vocab_size, self.order
        joint = (self.stationary[:, None] * self.probs).reshape((v,) * (k + 1))  # oldest token first
        joint = joint.sum(axis=tuple(range(k - context)))  # keep the newest `context` tokens
        joint = joint.reshape(-1, v)
        marginal = joint.sum(axis=1, keepdims=True)
        return float(-(joint * np.log(joint / marginal)).sum())

    @property
    def entropy_rate(self) -> float:
        return self.context_entropy(self.order)

    def window_floor(self, block_size: int) -> float:
        """The least expected loss (nats per token) of a model over windows of block_size tokens."""
        entropies = [self.context_entropy(min(p + 1, self.order)) for p in range(min(block_size, self.order))]
        return (sum(entropies) + (block_size - len(entropies)) * self.entropy_rate) / block_size

    def sample(self, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """num_tokens tokens of the chain, started from its stationary distribution."""
        v, k = self.vocab_size, self.order
        state = int(rng.choice(len(self.stationary), p=self.stationary))
        start = [state // v**(k - 1 - i) % v for i in range(k)]
        cumulative = np.cumsum(self.probs, axis=1)
        cumulative[:, -1] = 1.0  # so that every uniform draw in [0, 1) finds a token
        rows = cumulative.tolist()  # bisect on lists: about 0.2 us per token, 10x numpy's per-call cost
        tokens = start + [0] * max(num_tokens - k, 0)
        below, find = v**(k - 1), bisect.bisect_right
        for t, u in enumerate(rng.random(max(num_tokens - k, 0)).tolist(), start=k):
            token = find(rows[state], u)
            tokens[t] = token
            state = state % below * v + token
        return np.array(tokens[:num_tokens], dtype=np.int64)

    def mean_nll(self, tokens: np.ndarray) -> float:
        """The sequence's mean -log p of each token after the first ``order``, by the chain's own
        probabilities: an estimate of the entropy rate."""
        v, k = self.vocab_size, self.order
        states = np.zeros(len(tokens) - k, dtype=np.int64)
        for i in range(k):
            states = states * v + tokens[i:len(tokens) - k + i]
        return float(-np.log(self.probs[states, tokens[k:]]).mean())


def stationary_distribution(probs: np.ndarray, vocab_size: int, order: int) -> np.ndarray:
    """pi with pi P = pi, by power iteration: the next state drops a context's oldest token and
    appends the new one, so one step sums the joint (state, next token) over the oldest token."""
    v, k = vocab_size, order
    pi = np.full(v**k, 1.0 / v**k)
    for _ in range(MAX_ITERATIONS):
        new = (pi[:, None] * probs).reshape(v, -1).sum(axis=0)
        new /= new.sum()
        if np.abs(new - pi).sum() < TOLERANCE:
            return new
        pi = new
    raise ConfigError(f"the data=markov chain (data.vocab_size={v}, data.order={k}) mixes too slowly for its "
                      f"stationary distribution to converge in {MAX_ITERATIONS} steps: raise data.concentration")
