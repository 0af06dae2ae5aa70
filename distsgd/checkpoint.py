"""Checkpoints: plain dicts of tensors and Python values, written atomically with a SHA-256
sidecar, read with ``weights_only=True`` so that loading a file can never execute code.

A run's ``checkpoints/`` folder holds ``step_<8-digit step>.pt`` files and ``last.pt`` (written
when a run ends), each next to ``<name>.sha256``. A checkpoint counts only once its sidecar
matches it: the sidecar is renamed into place last, so it is what commits a save.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
import socket
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from distsgd.config import ConfigError

log = logging.getLogger("distsgd")

_LAST = "last.pt"
_STEP_FILE = re.compile(r"step_(\d+)\.pt")
# Exact types, not isinstance: subclasses (numpy.float64 is a float, a namedtuple a tuple) pickle
# as their own class, which weights_only loading refuses. model.state_dict() is an OrderedDict.
_LEAVES = (str, int, float, bool, type(None), torch.Tensor, torch.nn.Parameter)


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def check_writable(directory: Path, what: str = "checkpoint folder") -> None:
    """Fail before training, not at the first save hours later, when ``directory`` cannot be
    created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{socket.gethostname()}-{os.getpid()}"  # unique on shared disks
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{what} {directory} is not writable ({err.strerror or err})") from None


def save(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` and its SHA-256 to ``path.sha256``, both atomically.

    Both files are written to temporaries and fsynced before either is renamed, and the
    checkpoint is renamed before its sidecar: a crash at any point leaves the old pair, the new
    pair, or a checkpoint whose sidecar is absent or stale, which ``verify`` rejects.
    """
    _check_plain(state)  # before touching the disk, so a refused state writes nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = _sidecar(path)
    tmp, tmp_sidecar = path.with_name(f".{path.name}.tmp"), sidecar.with_name(f".{sidecar.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            _sync(f)
        with open(tmp_sidecar, "w") as f:
            f.write(f"{writer.sha256.hexdigest()}  {path.name}\n")  # sha256sum's format: `sha256sum -c` works too
            _sync(f)
        os.replace(tmp, path)
        os.replace(tmp_sidecar, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def verify(path: Path) -> str | None:
    """None when ``path`` matches its sidecar; otherwise why it cannot be trusted."""
    if not path.is_file():
        return "not a file" if path.exists() else "missing"  # e.g. trainer.resume=<a folder>
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return "no .sha256 sidecar"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    recorded = sidecar.read_text(errors="replace").split()
    if not recorded or recorded[0] != digest.hexdigest():
        return "checksum mismatch (truncated or corrupted)"
    return None


def load(path: Path, verified: bool = False) -> dict:
    """The checkpoint at ``path``, checked against its sidecar first unless ``verified`` says
    that was done moments ago (a second full read of a large file buys nothing)."""
    return _read(path, check=not verified)


def find_latest_valid(directory: Path) -> Path | None:
    """The newest checkpoint in ``directory`` that verifies; None when there is none at all.

    Step files rank by the step in their name, ``last.pt`` by the step stored inside it, and on a
    tie ``last.pt`` wins (same state). A newer checkpoint that fails verification is logged and
    skipped. Raises ConfigError, deleting nothing, when checkpoints exist but none is valid.
    """
    candidates = _step_files(directory)
    last = directory / _LAST
    if last.is_file():
        try:
            # mmap: its tensors are mapped, not copied into memory, just to learn its step.
            candidates.append((_read(last, mmap=True)["step"], last))
        except ConfigError as err:
            log.warning("%s; skipping it", err)
    candidates.sort(key=lambda c: (c[0], c[1].name == _LAST), reverse=True)
    for _, path in candidates:
        reason = None if path.name == _LAST else verify(path)  # last.pt was verified by _read
        if reason is None:
            return path
        log.warning("checkpoint %s: %s; falling back to an older one", path, reason)
    if candidates or last.is_file():
        raise ConfigError(f"no valid checkpoint in {directory} (each one is invalid; see the warnings above)")
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (keep <= 0 keeps all); last.pt stays."""
    if keep <= 0:
        return
    for _, path in _step_files(directory)[keep:]:
        # Checkpoint before sidecar: a crash in between leaves a stray sidecar, never an
        # unverifiable checkpoint that a later search would warn about.
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states, as tensors and plain values only (loadable with weights_only).

    Of the GPUs' generators only that of ``device`` is kept (by default the current CUDA device,
    where CUDA is available; none for a CPU device): it is the one this rank draws from, and a
    resume may see other GPUs, e.g. one per SLURM task where a node's eight were visible."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    gpu = _gpu_index(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": None if gpu is None else torch.cuda.get_rng_state(gpu),
        # int64, not uint32: it holds every key exactly, and uint32 tensors are a limited dtype in torch.
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved; its GPU generator goes to ``device`` (as in rng_state),
    whichever GPU it was saved from. A CPU process leaves a saved GPU state unused."""
    torch.set_rng_state(state["torch"])
    gpu = _gpu_index(device)
    cuda = None if gpu is None else _saved_gpu_state(state["cuda"], gpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, gpu)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _gpu_index(device: torch.device | None) -> int | None:
    """The index of the GPU whose generator this process uses; None when it uses none."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def _saved_gpu_state(saved: torch.Tensor | list | None, gpu: int) -> torch.Tensor | None:
    """The saved generator state for GPU ``gpu``: the one state saved, or in checkpoints from before
    per-device states (a list of every visible GPU's) the entry of the same index, where there is one."""
    if not isinstance(saved, list):
        return saved
    if gpu < len(saved):
        return saved[gpu]
    if saved:
        log.warning("the checkpoint's RNG states cover %d GPU(s), none for cuda:%d; its generator keeps its seed",
                    len(saved), gpu)
    return None


def _check_plain(value: object, where: str = "state") -> None:
    """Raise ConfigError naming the first entry that weights_only loading would refuse."""
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif type(value) not in _LEAVES:
        kind = type(value)
        raise ConfigError(f"checkpoint entry {where} is a {kind.__module__}.{kind.__qualname__}, not a tensor "
                          f"or plain value (dict, list, tuple, str, int, float, bool, None); convert it first")


def _read(path: Path, mmap: bool = False, check: bool = True) -> dict:
    reason = verify(path) if check else None
    if reason is not None:
        raise ConfigError(f"checkpoint {path}: {reason}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # no class or function named at all: bytes that are no pickle
            raise ConfigError(f"checkpoint {path} is not a readable checkpoint "
                              f"(UnpicklingError: {_first_line(err)})") from None
        raise ConfigError(f"checkpoint {path} holds objects other than tensors and plain values; "
                          f"refusing to unpickle it ({_first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"checkpoint {path} is not a readable checkpoint "
                          f"({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("step"), int):
        raise ConfigError(f"checkpoint {path} is not a distsgd checkpoint (no 'model' and integer 'step' entries)")
    return state


def _first_line(err: BaseException) -> str:
    # torch's weights_only refusal opens with how to bypass the check (unsafe advice here) and ends
    # with a link; what it refused lies between, after this marker where there is one.
    text = str(err).partition("WeightsUnpickler error:")[2] or str(err)
    boilerplate = ("Weights only load failed", "Check the documentation of torch.load")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return (lines or [type(err).__name__])[0]


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = ((int(m[1]), p) for p in directory.iterdir() if (m := _STEP_FILE.fullmatch(p.name)))
    return sorted(found, reverse=True)


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


class _HashingWriter:
    """Hashes the bytes on their way to the file, so the checksum costs no second read."""

    def __init__(self, f) -> None:
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
