"""Readers of real datasets from local files (MNIST/Fashion-MNIST IDX, CIFAR-10 binary, sklearn digits).

Readers check everything they read (magic numbers, sizes, counts, label ranges) and report a bad
file as one ConfigError line naming it, so a broken download fails before training instead of
as a shape error or a silently wrong label mid-run. Images are returned as uint8 (see transforms.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distsgd.config import ConfigError

_IDX_LABELS, _IDX_IMAGES = 2049, 2051  # 0x0801, 0x0803: unsigned bytes, 1 or 3 dimensions
_CIFAR_SIDE = 32
_CIFAR_RECORD = 1 + 3 * _CIFAR_SIDE * _CIFAR_SIDE
_CIFAR_SUBDIR = "cifar-10-batches-bin"  # what cifar-10-binary.tar.gz unpacks to
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")  # in scikit-learn's package, as load_digits finds it


def read_mnist(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST (or Fashion-MNIST) IDX files, plain or .gz: x_train, y_train, x_test, y_test.

    Images are uint8 [N, 1, 28, 28], labels int64 [N].
    """
    arrays: list[Tensor] = []
    for split in ("train", "t10k"):
        images_path = _find_idx(root / f"{split}-images-idx3-ubyte")
        labels_path = _find_idx(root / f"{split}-labels-idx1-ubyte")
        images = _read_idx(images_path, _IDX_IMAGES)
        labels = _read_idx(labels_path, _IDX_LABELS)
        if images.shape[1:] != (28, 28):
            raise ConfigError(f"mnist: {images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
        if len(images) != len(labels):
            raise ConfigError(f"mnist: {images_path}: {len(images)} images, but {labels_path} has {len(labels)} labels")
        _check_labels(labels, labels_path, "mnist")
        # torch.tensor copies out of the read-only bytes, which torch.from_numpy would only warn about.
        arrays += [torch.tensor(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    x_train, y_train, x_test, y_test = arrays
    return x_train, y_train, x_test, y_test


def read_cifar10(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10's binary version, in root or its cifar-10-batches-bin/: x_train, y_train, x_test, y_test.

    Images are uint8 [N, 3, 32, 32] (RGB), labels int64 [N]. The python version is never read:
    unpickling a downloaded file can run arbitrary code.
    """
    if not (root / "test_batch.bin").is_file() and (root / _CIFAR_SUBDIR).is_dir():
        root = root / _CIFAR_SUBDIR
    x_train, y_train = _read_cifar_files([root / f"data_batch_{i}.bin" for i in range(1, 6)])
    x_test, y_test = _read_cifar_files([root / "test_batch.bin"])
    return x_train, y_train, x_test, y_test


def read_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (no download): x float32 [1797, 1, 8, 8] in [0, 1], y int64.

    Read from the file that ``sklearn.datasets.load_digits`` reads, without importing scikit-learn:
    that import (scipy.stats with it) took longer than a short run's training. Where the file is
    not found, load_digits reads it."""
    path = _digits_file()
    if path is not None:
        rows = _read_digits_csv(path)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        rows = np.column_stack([digits.data, digits.target])
    x = torch.from_numpy(rows[:, :-1].astype(np.float32) / 16).reshape(-1, 1, 8, 8)  # pixels are 0..16
    return x, torch.from_numpy(rows[:, -1].astype(np.int64))


def _digits_file() -> Path | None:
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None:
        raise ConfigError("data=digits needs scikit-learn: pip install 'distsgd[datasets]'")
    for folder in spec.submodule_search_locations or ():
        path = Path(folder).joinpath(*DIGITS_FILE)
        if path.is_file():
            return path
    return None


def _read_digits_csv(path: Path) -> np.ndarray:
    """Rows of 64 pixels (0..16) and a label (0..9), as scikit-learn writes them."""
    try:
        with gzip.open(path, "rt") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file: 0 rows, refused below
            rows = np.loadtxt(f, delimiter=",", ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise ConfigError(f"digits: {path}: unreadable ({err})") from None
    pixels, labels = rows[:, :-1], rows[:, -1]
    if not (len(rows) and rows.shape[1] == 65 and (rows == np.round(rows)).all()
            and 0 <= pixels.min() and pixels.max() <= 16 and 0 <= labels.min() and labels.max() <= 9):
        raise ConfigError(f"digits: {path}: not rows of 64 pixels in 0..16 and a label in 0..9 "
                          f"(read {rows.shape[0]} rows of {rows.shape[1]} values)")
    return rows


def _find_idx(path: Path) -> Path:
    gz = path.with_name(path.name + ".gz")
    if path.is_file():
        return path
    if gz.is_file():
        return gz
    raise ConfigError(f"mnist: {path}: no such file (nor {gz.name})")


def _read_bytes(path: Path, dataset: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"{dataset}: {path}: unreadable ({err})") from None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    raw = _read_bytes(path, "mnist")
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise ConfigError(f"mnist: {path}: truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    found, *dims = np.frombuffer(raw, dtype=">i4", count=1 + ndim).tolist()
    if found != magic:
        raise ConfigError(f"mnist: {path}: magic number {found}, expected {magic}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing data"
        raise ConfigError(f"mnist: {path}: {problem}: {len(raw)} bytes, its header {dims} promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_cifar_files(paths: list[Path]) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"cifar10: {path}: no such file (the binary version, cifar-10-binary.tar.gz, is read)")
        raw = _read_bytes(path, "cifar10")
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise ConfigError(f"cifar10: {path}: {len(raw)} bytes, not a positive multiple of the "
                              f"{_CIFAR_RECORD}-byte record (truncated?)")
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        _check_labels(records[:, 0], path, "cifar10")
        labels.append(records[:, 0])
        images.append(records[:, 1:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE))
    # concatenate copies into writable arrays, which torch.from_numpy needs.
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels).astype(np.int64))


def _check_labels(labels: np.ndarray, path: Path, dataset: str) -> None:
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise ConfigError(f"{dataset}: {path}: label {labels[bad[0]]} out of range 0..9 (sample {bad[0]})")
