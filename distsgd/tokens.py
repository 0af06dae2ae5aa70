"""Token sequences as samples: windows of ``block_size`` tokens at fixed offsets.

A language-model sample is one window: sample i of a split is the ``block_size + 1`` tokens from
``first + i * block_size``, x the first block_size of them and y the last block_size (x shifted by
one token). Windows start a block apart, so the inputs of consecutive windows do not overlap and
an epoch sees each token once; a sample is an index, as for every other dataset, and the
DistributedSampler order, the global batch, epochs, batch-size schedules and exact resume work on
it unchanged. Windows never cross the end of their split: no validation window (targets
included) overlaps the training text.

The tokens are a file memory-mapped (numpy memmap: a batch reads only its windows) or a tensor;
``data.in_memory=true`` copies them, once and not window by window, to the training device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distsgd.config import ConfigError


def held_dtype(vocab_size: int) -> np.dtype:
    """The narrowest type that holds every token id and that torch indexes on any device
    (torch's uint16 has few kernels, so larger ids are held as int32)."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.int32)


def held_bytes(num_tokens: int, dtype: np.dtype) -> int:
    """What ``Tokens.on`` holds on the device for num_tokens tokens stored as ``dtype``."""
    return num_tokens * (1 if dtype == np.uint8 else 4)


class Tokens:
    """A 1-D sequence of token ids: a file of ``dtype`` values, memory-mapped, or a tensor."""

    def __init__(self, path: Path | None = None, dtype: np.dtype | None = None, tensor: torch.Tensor | None = None):
        self.path, self.dtype, self.tensor = path, dtype, tensor
        self.placed: dict[str, Tokens] = {}
        self.array = np.memmap(path, dtype=dtype, mode="r") if tensor is None else tensor

    def __len__(self) -> int:
        return len(self.array)

    @property
    def device(self) -> torch.device:
        return self.tensor.device if self.tensor is not None else torch.device("cpu")

    def on(self, device: torch.device) -> "Tokens":
        """The same tokens as a tensor on ``device``: copied once, shared by every window over them."""
        key = str(device)
        if key not in self.placed:
            held = self.tensor
            if held is None:  # a copy in memory: nanoGPT's uint16 ids as int32, bytes as they are
                held = torch.from_numpy(np.array(self.array, dtype=np.uint8 if self.dtype == np.uint8 else np.int32))
            self.placed[key] = Tokens(tensor=held.to(device))
        return self.placed[key]

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn or forkserver gets a copy by pickle, which would hold
        # the whole file: it maps the file anew instead.
        return {**self.__dict__, "array": None, "placed": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array = np.memmap(self.path, dtype=self.dtype, mode="r") if self.tensor is None else self.tensor


class TokenWindows:
    """``count`` windows of ``block_size`` tokens, window i starting at ``first + shift + i * block_size``
    (shift 0: the inputs, 1: the targets), standing in for an int64 tensor (count, block_size):
    indexing by a tensor of window indices gives those windows, in that order."""

    def __init__(self, tokens: Tokens, first: int, count: int, block_size: int, shift: int):
        self.tokens, self.first, self.count, self.block_size, self.shift = tokens, first, count, block_size, shift

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.block_size)

    def dim(self) -> int:
        return 2

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device) -> "TokenWindows":
        return TokenWindows(self.tokens.on(device), self.first, self.count, self.block_size, self.shift)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        start = self.first + self.shift
        # Consecutive windows a block apart are the rows of a plain reshape: a view, nothing read.
        rows = self.tokens.array[start:start + self.count * self.block_size].reshape(self.count, self.block_size)
        if isinstance(rows, torch.Tensor):
            # index_select, not rows[idx]: on CPU advanced indexing took 20 us with one thread and
            # 8 ms with torch's default thread pool on a busy machine, index_select 3-5 us.
            return rows.index_select(0, idx.to(rows.device)).long()
        idx = idx.cpu().numpy()
        order = np.argsort(idx, kind="stable")  # read in file order; return in the order asked
        batch = np.empty((len(idx), self.block_size), dtype=np.int64)
        batch[order] = rows[idx[order]]
        return torch.from_numpy(batch)


def windows(tokens: Tokens, first: int, end: int, block_size: int) -> tuple[TokenWindows, TokenWindows]:
    """x and y of the whole windows in tokens[first:end]."""
    count = window_count(end - first, block_size)
    return TokenWindows(tokens, first, count, block_size, 0), TokenWindows(tokens, first, count, block_size, 1)


def window_count(num_tokens: int, block_size: int) -> int:
    """Windows of block_size + 1 tokens, a block apart, in num_tokens tokens."""
    return max(num_tokens - 1, 0) // block_size


def check_windows(num_tokens: int, block_size: int, source: str) -> None:
    if window_count(num_tokens, block_size) == 0:
        raise ConfigError(f"{source}: {num_tokens} tokens, fewer than one window of data.block_size + 1 = "
                          f"{block_size + 1}")


def split_point(num_tokens: int, val_fraction: float, block_size: int, source: str) -> int:
    """Where the validation tokens begin: the last ``val_fraction`` of the sequence, contiguous.
    Each side must hold a window (the validation side only when val_fraction > 0)."""
    n_val = int(round(num_tokens * val_fraction))
    check_windows(num_tokens - n_val, block_size, f"{source}: its training part (data.val_fraction={val_fraction})")
    if val_fraction:
        check_windows(n_val, block_size, f"{source}: its validation part (data.val_fraction={val_fraction})")
    return num_tokens - n_val
