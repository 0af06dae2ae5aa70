"""Checkpoints: plain dicts of tensors and Python values, written atomically, read with
``weights_only=True`` so that loading a file can never execute code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from distsgd.config import ConfigError


def save(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over ``path``: a crash
    mid-save leaves the old file or none, never a partial one under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"checkpoint {path} holds objects other than tensors and plain values; "
                          f"refusing to unpickle it ({first_line})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"checkpoint {path} is not a readable checkpoint ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
