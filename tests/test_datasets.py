"""Dataset readers against files written here, and the batched augmentation against a per-sample loop."""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from distsgd import data, readers
from distsgd.config import ConfigError, DataConfig
from distsgd.readers import read_cifar10, read_digits, read_mnist
from distsgd.transforms import CIFAR10_MEAN_STD, MNIST_MEAN_STD, crop_flip_params, normalize, random_crop_flip

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes()


def make_mnist(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = False) -> dict[str, np.ndarray]:
    """Random MNIST-format files in root; returns what each file holds, by file name without .gz."""
    rng = np.random.default_rng(0)
    arrays = {
        MNIST_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        MNIST_FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        MNIST_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        MNIST_FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_bytes(root / (name + ".gz" if gz else name), idx_bytes(array, 2051 if "images" in name else 2049))
    return arrays


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    return records.astype(np.uint8).tobytes()


def make_cifar(root: Path, per_file: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random CIFAR-10 binary files in root; returns (images [N,3,32,32], labels) by file name."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for i, name in enumerate([*CIFAR_TRAIN, "test_batch.bin"]):
        n = per_file + i  # different counts, so concatenation order is visible
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (root / name).write_bytes(cifar_bytes(images, labels))
        written[name] = images, labels
    return written


@pytest.mark.parametrize("gz", [False, True])
def test_read_mnist_returns_what_was_written(tmp_path, gz):
    written = make_mnist(tmp_path, gz=gz)
    x_train, y_train, x_test, y_test = read_mnist(tmp_path)
    assert x_train.shape == (20, 1, 28, 28) and x_test.shape == (10, 1, 28, 28)
    assert x_train.dtype == x_test.dtype == torch.uint8
    assert y_train.dtype == y_test.dtype == torch.int64
    np.testing.assert_array_equal(x_train[:, 0].numpy(), written[MNIST_FILES[0]])
    np.testing.assert_array_equal(y_train.numpy(), written[MNIST_FILES[1]])
    np.testing.assert_array_equal(x_test[:, 0].numpy(), written[MNIST_FILES[2]])
    np.testing.assert_array_equal(y_test.numpy(), written[MNIST_FILES[3]])


def test_read_mnist_mixes_plain_and_gz_files(tmp_path):
    written = make_mnist(tmp_path, gz=True)
    (tmp_path / (MNIST_FILES[0] + ".gz")).unlink()
    write_bytes(tmp_path / MNIST_FILES[0], idx_bytes(written[MNIST_FILES[0]], 2051))
    np.testing.assert_array_equal(read_mnist(tmp_path)[0][:, 0].numpy(), written[MNIST_FILES[0]])


def _break_mnist(root: Path, case: str) -> str:
    """Damages one file of a good MNIST folder; returns the file name the error must name."""
    images, labels = MNIST_FILES[0], MNIST_FILES[1]
    good_images = idx_bytes(np.zeros((20, 28, 28), np.uint8), 2051)
    match case:
        case "missing":
            (root / MNIST_FILES[3]).unlink()
            return MNIST_FILES[3]
        case "header":
            (root / labels).write_bytes(b"\x00\x00\x08")
            return labels
        case "image_magic":
            (root / images).write_bytes(idx_bytes(np.zeros((20, 28, 28), np.uint8), 2049))
            return images
        case "label_magic":
            (root / labels).write_bytes(idx_bytes(np.zeros(20, np.uint8), 2051))
            return labels
        case "truncated_images":
            (root / images).write_bytes(good_images[:-1])
            return images
        case "truncated_labels":
            (root / labels).write_bytes(idx_bytes(np.zeros(20, np.uint8), 2049)[:-3])
            return labels
        case "trailing_data":
            (root / images).write_bytes(good_images + b"\x00")
            return images
        case "count_mismatch":
            (root / labels).write_bytes(idx_bytes(np.zeros(19, np.uint8), 2049))
            return labels
        case "label_range":
            (root / labels).write_bytes(idx_bytes(np.array([0] * 7 + [12] + [0] * 12), 2049))
            return labels
        case "image_size":
            (root / images).write_bytes(idx_bytes(np.zeros((20, 28, 27), np.uint8), 2051))
            return images
        case "corrupt_gz":
            (root / images).unlink()
            (root / (images + ".gz")).write_bytes(b"this is not gzip data")
            return images + ".gz"
        case "truncated_gz":
            (root / images).unlink()
            (root / (images + ".gz")).write_bytes(gzip.compress(good_images)[:-20])
            return images + ".gz"
    raise AssertionError(case)


@pytest.mark.parametrize("case,problem", [
    ("missing", "no such file"),
    ("header", "truncated"),
    ("image_magic", "magic number 2049, expected 2051"),
    ("label_magic", "magic number 2051, expected 2049"),
    ("truncated_images", "truncated"),
    ("truncated_labels", "truncated"),
    ("trailing_data", "trailing data: 15697 bytes"),
    ("count_mismatch", "20 images, but .* has 19 labels"),
    ("label_range", r"label 12 out of range 0\.\.9 \(sample 7\)"),
    ("image_size", "28x27, expected 28x28"),
    ("corrupt_gz", "unreadable"),
    ("truncated_gz", "unreadable"),
])
def test_broken_mnist_files_are_named(tmp_path, case, problem):
    make_mnist(tmp_path)
    name = _break_mnist(tmp_path, case)
    with pytest.raises(ConfigError, match=problem) as err:
        read_mnist(tmp_path)
    message = str(err.value)
    assert message.startswith("mnist: ") and str(tmp_path / name) in message and "\n" not in message


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-bin"])
def test_read_cifar10_returns_what_was_written(tmp_path, subdir):
    written = make_cifar(tmp_path / subdir)
    x_train, y_train, x_test, y_test = read_cifar10(tmp_path)
    train_images = np.concatenate([written[name][0] for name in CIFAR_TRAIN])
    train_labels = np.concatenate([written[name][1] for name in CIFAR_TRAIN])
    assert x_train.shape == (len(train_images), 3, 32, 32) and x_test.shape == (8, 3, 32, 32)
    assert x_train.dtype == x_test.dtype == torch.uint8
    assert y_train.dtype == y_test.dtype == torch.int64
    np.testing.assert_array_equal(x_train.numpy(), train_images)
    np.testing.assert_array_equal(y_train.numpy(), train_labels)
    np.testing.assert_array_equal(x_test.numpy(), written["test_batch.bin"][0])
    np.testing.assert_array_equal(y_test.numpy(), written["test_batch.bin"][1])


def test_read_cifar10_record_layout_is_label_then_red_green_blue_planes(tmp_path):
    make_cifar(tmp_path)
    record = bytes([7]) + bytes(range(256)) * 4 + bytes([1]) * 1024 + bytes([2]) * 1024
    (tmp_path / "test_batch.bin").write_bytes(record)
    _, _, x_test, y_test = read_cifar10(tmp_path)
    assert y_test.tolist() == [7]
    assert x_test[0, 0, 0, :4].tolist() == [0, 1, 2, 3] and x_test[0, 0, 1, 0] == 32  # row-major red plane
    assert (x_test[0, 1] == 1).all() and (x_test[0, 2] == 2).all()


@pytest.mark.parametrize("case,problem", [
    ("missing", "no such file"),
    ("truncated", "3072 bytes, not a positive multiple of the 3073-byte record"),
    ("empty", "0 bytes"),
    ("label_range", r"label 10 out of range 0\.\.9 \(sample 1\)"),
])
def test_broken_cifar10_files_are_named(tmp_path, case, problem):
    make_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    match case:
        case "missing":
            path.unlink()
        case "truncated":
            path.write_bytes(path.read_bytes()[:3072])
        case "empty":
            path.write_bytes(b"")
        case "label_range":
            path.write_bytes(cifar_bytes(np.zeros((2, 3, 32, 32), np.uint8), np.array([3, 10])))
    with pytest.raises(ConfigError, match=problem) as err:
        read_cifar10(tmp_path)
    message = str(err.value)
    assert message.startswith(f"cifar10: {path}: ") and "\n" not in message


def test_read_digits():
    x, y = read_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    from sklearn.datasets import load_digits
    digits = load_digits()
    # Bit for bit what load_digits gives, as distsgd read it before it read the file itself.
    assert torch.equal(x, torch.from_numpy(digits.images.astype(np.float32) / 16).unsqueeze(1))
    assert torch.equal(y, torch.from_numpy(digits.target.astype(np.int64)))


def test_read_digits_reads_the_file_without_importing_scikit_learn(monkeypatch):
    expected = read_digits()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # importing it now fails
    x, y = read_digits()
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


def test_read_digits_asks_load_digits_where_the_file_is_not_found(monkeypatch):
    expected = read_digits()
    monkeypatch.setattr(readers, "DIGITS_FILE", ("datasets", "data", "moved.csv.gz"))
    x, y = read_digits()
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


def test_read_digits_without_sklearn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'distsgd[datasets]'")):
        read_digits()


DIGIT_ROW = ",".join(["16"] * 64 + ["9"]) + "\n"


@pytest.mark.parametrize("text, problem", [
    ("", "not rows of 64 pixels"),
    (DIGIT_ROW.replace("16", "17", 1), "not rows of 64 pixels"),
    (DIGIT_ROW.replace(",9", ",10"), "not rows of 64 pixels"),
    (DIGIT_ROW.replace("16", "0.5", 1), "not rows of 64 pixels"),
    (DIGIT_ROW + "1,2,3\n", "unreadable"),
    (None, "unreadable"),  # not gzip
])
def test_a_bad_digits_file_is_one_line_naming_it(tmp_path, monkeypatch, text, problem):
    path = tmp_path.joinpath(*readers.DIGITS_FILE)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"plain text" if text is None else gzip.compress(text.encode()))
    spec = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "sklearn" else None)
    with pytest.raises(ConfigError, match=problem) as err:
        read_digits()
    assert str(err.value).startswith(f"digits: {path}: ") and "\n" not in str(err.value)


def test_made_datasets_are_loaded_once_per_config_and_each_load_gets_its_own_tensors(monkeypatch):
    reads = []
    monkeypatch.setattr(readers, "read_digits", lambda: reads.append(1) or read_digits())
    cfg = DataConfig(name="digits", val_fraction=0.125, seed=12345)  # a config no other test loads
    first = data.load(cfg)
    first.x_train.add_(1)  # what a run does to its tensors stays in that run
    second = data.load(replace(cfg))
    assert len(reads) == 1
    assert torch.equal(second.x_train + 1, first.x_train) and torch.equal(second.y_val, first.y_val)
    data.load(replace(cfg, seed=54321))  # another config: its own load
    assert len(reads) == 2


def test_a_made_dataset_larger_than_the_cache_is_made_anew(monkeypatch):
    reads = []
    monkeypatch.setattr(readers, "read_digits", lambda: reads.append(1) or read_digits())
    monkeypatch.setattr(data, "MADE_SAMPLES_CACHE_BYTES", 1000)  # below the digits' 0.47 MB
    cfg = DataConfig(name="digits", val_fraction=0.25, seed=12345)
    first, second = data.load(cfg), data.load(cfg)
    assert len(reads) == 2 and torch.equal(first.x_train, second.x_train)


def test_files_are_read_anew_by_every_load(tmp_path):
    path = tmp_path / "d.npz"
    cfg = DataConfig(name="npz", path=str(path), val_fraction=0)
    np.savez(path, x=np.zeros((4, 2), np.float32), y=np.arange(4))
    assert data.load(cfg).x_train.sum() == 0
    np.savez(path, x=np.ones((4, 2), np.float32), y=np.arange(4))
    assert data.load(cfg).x_train.sum() == 8


def test_normalize_by_hand():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # [1, 2, 1, 2]
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]])
    out = normalize(x, (0.5, 0.2), (0.5, 0.1))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    # Floats are taken to be in [0, 1] already: not divided by 255 again.
    torch.testing.assert_close(normalize(x.double() / 255, (0.5, 0.2), (0.5, 0.1)), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_with_a_batchs_own_statistics_gives_zero_mean_and_unit_std_per_channel(channels):
    x = torch.randint(0, 256, (6, channels, 5, 7), generator=torch.Generator().manual_seed(channels),
                      dtype=torch.uint8)
    x[:, 0] //= 4  # channels of different mean and spread: a mix-up of channels shows
    pixels = x.double().div(255).transpose(0, 1).reshape(channels, -1)
    mean, std = pixels.mean(1).tolist(), pixels.std(1, correction=0).tolist()
    out = normalize(x, mean, std).double()
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(channels, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3), correction=0), torch.ones(channels, dtype=torch.float64),
                               atol=1e-6, rtol=0)


# The constants are the per-channel mean and standard deviation of the training images' pixels in
# [0, 1]: MNIST's 60000 and CIFAR-10's 50000 (torchvision's reference values; CIFAR-10's std is not
# the often copied (0.2023, 0.1994, 0.2010), an average of per-image deviations). Without the
# datasets they cannot be recomputed here. What must hold: one entry per channel of the reader's
# images, and values that can be statistics of numbers in [0, 1]: 0 < mean < 1 and
# std <= sqrt(mean (1 - mean)) (Bhatia-Davis), which values on the 0..255 scale break.
@pytest.mark.parametrize("mean_std,make,read", [(MNIST_MEAN_STD, make_mnist, read_mnist),
                                                (CIFAR10_MEAN_STD, make_cifar, read_cifar10)])
def test_mean_std_constants_fit_their_readers_images(tmp_path, mean_std, make, read):
    make(tmp_path)
    images = read(tmp_path)[0]
    mean, std = mean_std
    assert len(mean) == len(std) == images.shape[1]
    for m, s in zip(mean, std):
        assert 0 < m < 1 and 0 < s <= math.sqrt(m * (1 - m)), (m, s)
    assert normalize(images, mean, std).shape == images.shape


def reference_crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                        padding: int) -> torch.Tensor:
    _, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(len(x)):
        padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
        padded[:, padding:padding + h, padding:padding + w] = x[i]
        crop = padded[:, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@pytest.mark.parametrize("padding", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_a_per_sample_loop(padding, dtype):
    x = torch.randint(1, 256, (16, 3, 5, 7), generator=torch.Generator().manual_seed(padding)).to(dtype)
    dy, dx, flip = crop_flip_params(16, padding, seed=3, epoch=padding)
    out = random_crop_flip(x, dy, dx, flip, padding)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, reference_crop_flip(x, dy, dx, flip, padding))
    assert (out == 0).any() and flip.any() and not flip.all()  # borders and flips really were exercised


def test_random_crop_flip_by_hand():
    x = torch.arange(1, 7, dtype=torch.uint8).view(1, 1, 2, 3)  # [[1, 2, 3], [4, 5, 6]]
    one = torch.tensor([1])
    assert random_crop_flip(x, one * 0, one * 2, torch.tensor([False]), 1)[0, 0].tolist() == [[0, 0, 0], [2, 3, 0]]
    assert random_crop_flip(x, one * 2, one * 0, torch.tensor([True]), 1)[0, 0].tolist() == [[5, 4, 0], [0, 0, 0]]


def test_padding_zero_without_flip_is_the_identity():
    x = torch.rand(4, 3, 6, 6)
    zeros = torch.zeros(4, dtype=torch.long)
    assert torch.equal(random_crop_flip(x, zeros, zeros, torch.zeros(4, dtype=torch.bool), 0), x)
    assert torch.equal(random_crop_flip(x, zeros, zeros, torch.ones(4, dtype=torch.bool), 0), x.flip(-1))


def test_crop_flip_params_depend_on_seed_and_epoch_only():
    dy, dx, flip = crop_flip_params(1000, 2, seed=5, epoch=1)
    assert dy.dtype == dx.dtype == torch.int64 and flip.dtype == torch.bool
    assert dy.shape == dx.shape == flip.shape == (1000,)
    assert set(dy.tolist()) == set(dx.tolist()) == {0, 1, 2, 3, 4}
    assert 400 < int(flip.sum()) < 600
    assert not torch.equal(dy, dx)
    for a, b in zip(crop_flip_params(1000, 2, seed=5, epoch=1), (dy, dx, flip)):
        assert torch.equal(a, b)
    for other in (crop_flip_params(1000, 2, seed=5, epoch=2), crop_flip_params(1000, 2, seed=6, epoch=0),
                  crop_flip_params(1000, 2, seed=4, epoch=2)):  # seed + epoch is the same: must still differ
        assert not torch.equal(other[0], dy) and not torch.equal(other[2], flip)
    dy, dx, _ = crop_flip_params(50, 0, seed=0, epoch=0)
    assert not dy.any() and not dx.any()


def test_augmentation_of_a_sample_does_not_depend_on_its_batch():
    # Two ranks each augmenting their share of the epoch equal one process augmenting the whole set.
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    dy, dx, flip = crop_flip_params(12, 2, seed=0, epoch=0)
    whole = random_crop_flip(x, dy, dx, flip, 2)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    for rank in range(2):
        idx = order[rank::2]
        assert torch.equal(random_crop_flip(x[idx], dy[idx], dx[idx], flip[idx], 2), whole[idx])
