"""Text sampled from a language model at every validation, for TensorBoard's Text dashboard.

A fixed prompt (the first tokens of the first validation window, else of the first training
window) is continued greedily and at temperature 1. Rank 0 alone samples, from a torch.Generator
of its own seeded by trainer.seed and the step: the training RNG is never touched, so sampling
changes no run, and a resumed run logs the very text that the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from distsgd.data import Dataset

PROMPT_TOKENS = 32  # at most; half the block for shorter blocks
NEW_TOKENS = 128
TEMPERATURES = (0.0, 1.0, 1.0)  # 0: greedy


def decoder(dataset: Dataset) -> Callable[[list[int]], str]:
    """Token ids as UTF-8 text (invalid bytes replaced) where the data says which bytes each id
    stands for (``Dataset.token_bytes``: byte-level text, a meta.pkl vocabulary), else the ids."""
    table = dataset.token_bytes
    if table is None:
        return lambda tokens: " ".join(map(str, tokens))
    return lambda tokens: b"".join(table[t] for t in tokens).decode("utf-8", errors="replace")


class Samples:
    """``samples(model, step)``: the Markdown text of one validation's samples."""

    def __init__(self, dataset: Dataset, seed: int, device: torch.device) -> None:
        windows = dataset.x_val if len(dataset.x_val) else dataset.x_train
        length = min(PROMPT_TOKENS, max(1, dataset.input_shape[0] // 2))
        self.prompt = windows[torch.tensor([0])][:, :length].to(device)
        self.seed, self.device, self.decode = seed, device, decoder(dataset)

    def __call__(self, model: torch.nn.Module, step: int) -> str:
        """``model``: one with gpt.GPT's ``generate``."""
        seed = int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0])
        generator = torch.Generator(self.device).manual_seed(seed)
        rows = model.generate(self.prompt, NEW_TOKENS, list(TEMPERATURES), generator)[:, self.prompt.shape[1]:]
        parts = [f"Step {step}: the prompt ({self.prompt.shape[1]} tokens), then {NEW_TOKENS} tokens sampled from "
                 "it at each temperature (0: greedy).", "**prompt**", indented(self.decode(self.prompt[0].tolist()))]
        for temperature, row in zip(TEMPERATURES, rows):
            parts += [f"**temperature {temperature:g}**", indented(self.decode(row.tolist()))]
        return "\n\n".join(parts)


def indented(text: str) -> str:
    """A Markdown code block by indentation, which no character of the text can end."""
    return "\n".join("    " + line for line in text.splitlines() or [""])
