"""Data: datasets held as tensors, and the DistributedSampler order that shards them.

Batch semantics are global-first. Every epoch the sampler shuffles the whole training set with
the same seed on every rank and deals position p to rank p % world_size; a rank's k-th local batch
of ``global_batch_size / world_size`` samples therefore holds its share of positions
[k*B, (k+1)*B) of that order, and the union over ranks is the same global batch at any world
size. Only whole global batches are used, so the sampler's padding is never trained on.

With data.batch_milestones the global batch is a function of the epoch (``BatchSchedule``); each
epoch is sliced as above with its own batch, so the same holds epoch by epoch.
"""

from __future__ import annotations

import bisect
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from distsgd import readers, transforms
from distsgd.config import ConfigError, DataConfig
from distsgd.distributed import Dist

CROP_PADDING = 4  # the usual CIFAR recipe: pad 4, crop 32x32, flip half of the images


@dataclass(frozen=True)
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    task: str  # "classification" (integer labels, cross-entropy) or "regression" (float targets, MSE)
    num_outputs: int  # classes, or regression targets per sample
    # Images stay uint8 until a batch is on its device; then crop/flip (training) and normalize
    # by these per-channel statistics (tensors on the device once ``place`` has run).
    mean_std: tuple | None = None
    crop_padding: int = 0
    # None: the tensors live on the training device. Else they stay in host memory and a
    # DataLoader with this many workers gathers batches into pinned memory.
    stream_workers: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def memory_format(self, device: torch.device) -> torch.memory_format:
        # NHWC lets cuDNN use its fastest convolution kernels; on CPU it buys nothing.
        return torch.channels_last if device.type == "cuda" and self.x_train.dim() == 4 else torch.preserve_format

    def place(self, device: torch.device, in_memory: bool, num_workers: int) -> "Dataset":
        """Hold the tensors on the training device, or keep them in (pinned) host memory for a DataLoader."""
        mean_std = None if self.mean_std is None else transforms.mean_std_on(device, self.mean_std)
        if not in_memory:
            return replace(self, stream_workers=num_workers, mean_std=mean_std)
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_val=self.x_val.to(device), y_val=self.y_val.to(device), mean_std=mean_std)

    def train_batches(self, epoch: int, first: int, steps: int, batch: int, dist: Dist,
                      seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of steps first..steps-1 of the epoch, in DistributedSampler order;
        a resumed run starts at ``first`` without reading the batches before it."""
        order = train_order(len(self.x_train), dist.rank, dist.world_size, seed, epoch, self.x_train.device)
        slices = [order[k * batch:(k + 1) * batch] for k in range(first, steps)]
        crop = None
        if self.crop_padding:
            crop = [t.to(dist.device) for t in transforms.crop_flip_params(len(self.x_train), self.crop_padding, seed, epoch)]
        if self.stream_workers is not None:
            loader = DataLoader(_Rows(self.x_train, self.y_train), batch_sampler=[s.tolist() for s in slices],
                                num_workers=self.stream_workers, collate_fn=_as_batch,
                                pin_memory=dist.device.type == "cuda")
            batches = ((idx, x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True))
                       for idx, x, y in loader)
        else:
            batches = ((idx, self.x_train[idx], self.y_train[idx]) for idx in slices)
        for idx, x, y in batches:
            if crop is not None:
                idx = idx.to(dist.device)
                x = transforms.random_crop_flip(x, crop[0][idx], crop[1][idx], crop[2][idx], self.crop_padding)
            yield self._prepare(x, dist.device), y

    def val_batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.x_val.device)
        x, y = self.x_val[idx].to(device, non_blocking=True), self.y_val[idx].to(device, non_blocking=True)
        return self._prepare(x, device), y

    def _prepare(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.mean_std is not None:
            x = transforms.normalize(x, *self.mean_std)
        return x.contiguous(memory_format=self.memory_format(device)) if x.dim() == 4 else x


class MappedRows:
    """Rows ``rows`` (in that order) of an array memory-mapped from a .npy file, standing in for a
    host tensor: indexing reads only the rows asked for, so the array never needs to fit in memory.
    Sorted, the rows of a batch are read in file order; they come back in the order asked for."""

    def __init__(self, path: Path, rows: np.ndarray, dtype: torch.dtype, row_shape: tuple[int, ...]):
        self.path, self.rows, self.dtype, self.row_shape = path, rows, dtype, row_shape
        self.array = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.rows[idx.cpu().numpy()]
        order = np.argsort(rows)
        batch = np.empty((len(rows), *self.array.shape[1:]), dtype=self.array.dtype)
        batch[order] = self.array[rows[order]]
        return torch.from_numpy(batch).to(self.dtype).reshape(len(rows), *self.row_shape)

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn or forkserver gets a copy by pickle, which would
        # hold the whole array: it opens the file anew instead.
        return {k: v for k, v in self.__dict__.items() if k != "array"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array = np.load(self.path, mmap_mode="r")


class _Rows(torch.utils.data.Dataset):
    """Rows of host tensors, fetched a whole batch at a time (DataLoader calls __getitems__)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]):
        idx = torch.tensor(indices)
        return idx, self.x[idx], self.y[idx]


def _as_batch(batch):
    return batch


def load(cfg: DataConfig) -> Dataset:
    match cfg.name:
        case "synthetic" | "synthetic_regression" | "digits":
            x, y = _made_samples(cfg)
        case "npz":
            x, y = _read_npz(Path(cfg.path))
        case "arrays":
            return _read_arrays(Path(cfg.x), Path(cfg.y), cfg.val_fraction, cfg.seed)
        case "mnist":
            # The official test set is the validation set; data.val_fraction does not apply.
            return Dataset(*_checked_root(cfg, readers.read_mnist), "classification", 10,
                           mean_std=transforms.MNIST_MEAN_STD)
        case "cifar10":
            return Dataset(*_checked_root(cfg, readers.read_cifar10), "classification", 10,
                           mean_std=transforms.CIFAR10_MEAN_STD, crop_padding=CROP_PADDING if cfg.augment else 0)
    return _split(x, y, cfg.val_fraction, cfg.seed)


def train_size(cfg: DataConfig) -> int:
    """The training samples that ``cfg`` gives: what an epoch holds."""
    return len(load(cfg).x_train)


# Samples that distsgd makes (synthetic) or reads from a package (digits), by data config, kept
# for the process's next load: the jobs of a sweep in one process share them. Files a user names
# (npz, arrays, mnist, cifar10) are read anew every time, so a changed file is never served stale.
MADE_SAMPLES_CACHE_BYTES = 2**28
_made_samples_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _made_samples(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of data=synthetic, synthetic_regression or digits. The cached tensors are never handed
    out: the split copies them (indexing by a permutation), so no run changes what the next gets."""
    key = repr(cfg)  # every field, so that no config can get another's samples
    samples = _made_samples_cache.get(key)
    if samples is None:
        match cfg.name:
            case "synthetic":
                samples = _synthetic_classification(cfg)
            case "synthetic_regression":
                samples = _synthetic_regression(cfg)
            case "digits":
                samples = readers.read_digits()
        _made_samples_cache[key] = samples
        # Oldest first, this one too when it alone is larger than the budget.
        while sum(x.nbytes + y.nbytes for x, y in _made_samples_cache.values()) > MADE_SAMPLES_CACHE_BYTES:
            del _made_samples_cache[next(iter(_made_samples_cache))]
    return samples


def _checked_root(cfg: DataConfig, reader):
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: no such folder: {root} (data={cfg.name} reads its files from there)")
    return reader(root)


def _synthetic_classification(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # Labels of a random linear teacher with Gaussian noise on its logits: learnable, not trivial.
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.num_samples, cfg.dim, generator=gen)
    teacher = torch.randn(cfg.dim, cfg.num_classes, generator=gen) / cfg.dim**0.5
    logits = x @ teacher + cfg.noise * torch.randn(cfg.num_samples, cfg.num_classes, generator=gen)
    return x, logits.argmax(dim=1)


def _synthetic_regression(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # y = X w* + noise: the least-squares optimum is known, so convergence can be measured.
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.num_samples, cfg.dim, generator=gen)
    w_star = torch.randn(cfg.dim, 1, generator=gen)
    return x, x @ w_star + cfg.noise * torch.randn(cfg.num_samples, 1, generator=gen)


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"data.path: no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise ConfigError(f"data.path: {path} lacks array(s) {sorted(missing)}; it has {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"data.path: {path} is not a readable .npz file ({err})") from None
    _check_arrays(x, y, f"data.path: {path}")
    if np.issubdtype(y.dtype, np.integer):
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32).reshape(len(y), -1))


def _check_arrays(x: np.ndarray, y: np.ndarray, source: str) -> None:
    """Samples x (N, features...) and their labels or targets y, as data=npz and data=arrays take them."""
    if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"{source} needs x of shape (N, features...) and y of length N, "
                          f"got x {x.shape} and y {y.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ConfigError(f"{source}: x must hold numbers, it holds {x.dtype} values")
    if np.issubdtype(y.dtype, np.integer):
        if y.ndim != 1 or y.min() < 0:
            raise ConfigError(f"{source}: integer labels y must be 1-D and >= 0")
    elif not np.issubdtype(y.dtype, np.floating) or y.ndim > 2:
        raise ConfigError(f"{source}: y must be integer labels or float targets of shape (N,) or (N, k)")


def _read_arrays(x_path: Path, y_path: Path, val_fraction: float, seed: int) -> Dataset:
    """data=arrays: the same samples as data=npz, split alike, but memory-mapped: only indices are
    split and shuffled, and each batch reads its rows from the files."""
    x, y = _map_npy(x_path, "data.x"), _map_npy(y_path, "data.y")
    _check_arrays(x, y, f"data.x={x_path} with data.y={y_path}")
    train, val = _split_indices(len(x), val_fraction, seed)
    if np.issubdtype(y.dtype, np.integer):
        task, num_outputs, y_dtype, y_shape = "classification", int(y.max()) + 1, torch.int64, ()
    else:
        targets = y.shape[1] if y.ndim == 2 else 1
        task, num_outputs, y_dtype, y_shape = "regression", targets, torch.float32, (targets,)
    rows = [(MappedRows(x_path, idx, torch.float32, x.shape[1:]), MappedRows(y_path, idx, y_dtype, y_shape))
            for idx in (train.numpy(), val.numpy())]
    return Dataset(*rows[0], *rows[1], task, num_outputs)


def _map_npy(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"{key}: no such file: {path}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ConfigError(f"{key}: {path} is not a readable .npy file ({err})") from None
    if not isinstance(array, np.memmap):  # an .npz archive, which np.load opens whole
        raise ConfigError(f"{key}: {path} is not a .npy file (data=npz reads .npz archives)")
    return array


def _split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> Dataset:
    train, val = _split_indices(len(x), val_fraction, seed)
    if y.dtype == torch.int64:
        task, num_outputs = "classification", int(y.max()) + 1
    else:
        task, num_outputs = "regression", y.shape[1]
    return Dataset(x[train], y[train], x[val], y[val], task, num_outputs)


def _split_indices(num_samples: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation indices: a random permutation, validation first."""
    n_val = int(round(num_samples * val_fraction))
    if n_val >= num_samples:
        raise ConfigError(f"data.val_fraction={val_fraction} leaves no training samples out of {num_samples}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def local_batch_size(global_batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Samples per rank and step; each step splits them into ``accumulate`` equal micro-batches."""
    parts = world_size * accumulate
    if global_batch_size % parts:
        by = f"the world size {world_size}" + (f" x trainer.accumulate={accumulate}" if accumulate > 1 else "")
        raise ConfigError(f"data.global_batch_size={global_batch_size} is not divisible by {by}; "
                          f"choose a multiple of {parts}")
    return global_batch_size // world_size


def steps_per_epoch(num_train: int, global_batch_size: int, name: str = "") -> int:
    """Whole global batches in an epoch; ``name`` says which batch it is in an error."""
    if global_batch_size > num_train:
        raise ConfigError(f"{name or f'data.global_batch_size={global_batch_size}'} exceeds the {num_train} "
                          "training samples")
    return num_train // global_batch_size


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch of every epoch, and where each optimizer step falls.

    Epoch e trains with ``B_e = global_batch * growth**(number of milestones <= e)`` in
    ``floor(num_train / B_e)`` steps. The epochs from one milestone to the next form a phase.
    Steps count on across epochs, so step t is step ``index`` of epoch ``epoch`` for the one pair
    with ``first_step(epoch) + index == t``: a pure function of these four numbers, which is what
    lets a checkpoint's step alone place a resumed run."""

    num_train: int
    global_batch: int
    growth: int = 1
    milestones: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        steps_per_epoch(self.num_train, self.global_batch)

    def check_reached(self, max_epochs: int | None, max_steps: int | None) -> None:
        """Every phase that a run of ``max_epochs`` epochs and ``max_steps`` steps (None: no such
        limit) enters must have a whole global batch; a phase it never reaches need not."""
        for start, first, batch in zip(self.phase_starts[1:], self.phase_first_steps[1:], self.phase_batches[1:]):
            if (max_epochs is None or start < max_epochs) and (max_steps is None or first < max_steps):
                steps_per_epoch(self.num_train, batch, f"data.batch_milestones={list(self.milestones)} with "
                                                       f"data.batch_growth={self.growth}: the global batch {batch} "
                                                       f"from epoch {start}")

    @staticmethod
    def of(cfg: DataConfig, num_train: int) -> "BatchSchedule":
        return BatchSchedule(num_train, cfg.global_batch_size, cfg.batch_growth, tuple(cfg.batch_milestones))

    @property
    def phase_starts(self) -> tuple[int, ...]:
        """The first epoch of each phase."""
        return (0, *self.milestones)

    @property
    def phase_batches(self) -> tuple[int, ...]:
        return tuple(self.global_batch * self.growth**p for p in range(len(self.phase_starts)))

    @property
    def phase_first_steps(self) -> tuple[int, ...]:
        firsts = [0]
        for start, end, batch in zip(self.phase_starts, self.milestones, self.phase_batches):
            firsts.append(firsts[-1] + (end - start) * (self.num_train // batch))
        return tuple(firsts)

    def phase(self, epoch: int) -> int:
        return bisect.bisect_right(self.milestones, epoch)

    def batch(self, epoch: int) -> int:
        return self.phase_batches[self.phase(epoch)]

    def steps_in(self, epoch: int) -> int:
        return self.num_train // self.batch(epoch)

    def first_step(self, epoch: int) -> int:
        """Steps in the epochs before ``epoch``."""
        p = self.phase(epoch)
        return self.phase_first_steps[p] + (epoch - self.phase_starts[p]) * self.steps_in(epoch)

    def step_phase(self, step: int) -> int:
        """The phase that update ``step`` is in."""
        return bisect.bisect_right(self.phase_first_steps, step) - 1

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index of the step in that epoch)."""
        p = self.step_phase(step)
        epochs, index = divmod(step - self.phase_first_steps[p], self.num_train // self.phase_batches[p])
        return self.phase_starts[p] + epochs, index

    def epochs_at(self, step: int) -> Fraction:
        """Epochs done before update ``step``: ``epoch + index / steps in that epoch``, exact."""
        epoch, index = self.locate(step)
        return epoch + Fraction(index, self.steps_in(epoch))

    def samples_before(self, step: int) -> int:
        """Samples in the global batches of updates 0..step-1."""
        ends = (*self.phase_first_steps[1:], step)
        return sum(max(min(step, end) - first, 0) * batch
                   for first, end, batch in zip(self.phase_first_steps, ends, self.phase_batches))


def train_order(num_train: int, rank: int, world_size: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """This rank's share of the epoch's shuffled order; its k-th batch is the k-th slice."""
    sampler = DistributedSampler(range(num_train), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long, device=device)


def val_indices(num_val: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """This rank's validation shard without the sampler's padding, so each sample counts once."""
    sampler = DistributedSampler(range(num_val), num_replicas=world_size, rank=rank, shuffle=False)
    real = len(range(rank, num_val, world_size))  # padded positions (>= num_val) come last
    return torch.tensor(list(sampler)[:real], dtype=torch.long, device=device)
