"""Sharding by DistributedSampler order, global-batch semantics, and the npz reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distsgd import data
from distsgd.config import ConfigError, DataConfig

CPU = torch.device("cpu")


def consumed(num_train: int, global_batch: int, world: int, epoch: int, seed: int = 0) -> list[list[list[int]]]:
    """batches[rank][k]: the samples rank trains on at the k-th step of the epoch."""
    batch = data.local_batch_size(global_batch, world)
    steps = data.steps_per_epoch(num_train, global_batch)
    orders = [data.train_order(num_train, r, world, seed, epoch, CPU) for r in range(world)]
    return [[o[k * batch:(k + 1) * batch].tolist() for k in range(steps)] for o in orders]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_are_disjoint_and_cover_the_dataset(world):
    n, global_batch = 96, 12
    batches = consumed(n, global_batch, world, epoch=0)
    seen = [i for rank in batches for b in rank for i in b]
    assert len(seen) == len(set(seen)) == n


def test_global_batch_is_the_same_at_every_world_size():
    n, global_batch = 100, 12  # 8 whole global batches; 4 samples left out this epoch
    reference = consumed(n, global_batch, 1, epoch=3)[0]
    for world in (2, 3, 4, 6):
        batches = consumed(n, global_batch, world, epoch=3)
        for k, expected in enumerate(reference):
            assert sorted(i for rank in batches for i in rank[k]) == sorted(expected), (world, k)


def test_set_epoch_changes_the_order_and_seed_decides_it():
    first, second = (consumed(64, 8, 2, epoch=e) for e in (0, 1))
    assert first != second
    assert consumed(64, 8, 2, epoch=1) == second
    assert consumed(64, 8, 2, epoch=1, seed=5) != second


@pytest.mark.parametrize("num_val,world", [(10, 3), (7, 2), (1, 2), (2, 4), (9, 4), (8, 1)])
def test_validation_shards_count_each_sample_once_and_an_empty_one_is_a_batch_of_none(num_val, world):
    shards = [data.val_indices(num_val, r, world, CPU) for r in range(world)]
    assert all(s.dtype == torch.int64 and s.dim() == 1 for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(num_val))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and (min(sizes) == 0) == (num_val < world)
    # Every rank, its shard empty or not, gets a batch that a model takes: a rank must not sit
    # validation out while the others wait for it in the collectives that sum the metrics.
    x = torch.arange(num_val * 3, dtype=torch.float32).view(num_val, 3)
    y = torch.arange(num_val) % 2
    dataset = data.Dataset(x, y, x, y, "classification", 2)
    for shard in shards:
        xb, yb = dataset.val_batch(shard, CPU)
        assert torch.equal(xb, x[shard]) and torch.equal(yb, y[shard])
        assert torch.nn.Linear(3, 2)(xb).shape == (len(shard), 2)


def test_indivisible_batch_and_oversized_batch_are_errors():
    with pytest.raises(ConfigError, match="data.global_batch_size=10 is not divisible by the world size 4"):
        data.local_batch_size(10, 4)
    with pytest.raises(ConfigError, match="data.global_batch_size=200 exceeds the 100 training samples"):
        data.steps_per_epoch(100, 200)


def test_synthetic_sets_are_deterministic_and_split():
    a, b = (data.load(DataConfig(num_samples=200, dim=5, val_fraction=0.25)) for _ in range(2))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert (len(a.x_train), len(a.x_val), a.task, a.num_outputs) == (150, 50, "classification", 4)
    assert set(a.y_train.tolist()) == {0, 1, 2, 3}
    other = data.load(DataConfig(num_samples=200, dim=5, val_fraction=0.25, seed=1))
    assert not torch.equal(a.x_train, other.x_train)
    reg = data.load(DataConfig(name="synthetic_regression", num_samples=50, dim=3, val_fraction=0))
    assert (reg.task, reg.num_outputs, tuple(reg.y_train.shape), len(reg.x_val)) == ("regression", 1, (50, 1), 0)


def test_npz_classification_and_regression(tmp_path):
    x = np.arange(40, dtype=np.float64).reshape(10, 4)
    np.savez(tmp_path / "cls.npz", x=x, y=np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1]))
    np.savez(tmp_path / "reg.npz", x=x, y=np.linspace(0, 1, 10))
    cls = data.load(DataConfig(name="npz", path=str(tmp_path / "cls.npz"), val_fraction=0.2))
    assert (cls.task, cls.num_outputs, len(cls.x_train), len(cls.x_val), cls.x_train.dtype) == (
        "classification", 3, 8, 2, torch.float32)
    rows = sorted(map(tuple, torch.cat([cls.x_train, cls.x_val]).tolist()))
    assert rows == sorted(map(tuple, x.astype(np.float32).tolist()))  # nothing lost or duplicated by the split
    reg = data.load(DataConfig(name="npz", path=str(tmp_path / "reg.npz"), val_fraction=0))
    assert (reg.task, reg.num_outputs, reg.y_train.dtype) == ("regression", 1, torch.float32)


@pytest.mark.parametrize("make,message", [
    (None, "no such file"),
    (lambda p: p.write_bytes(b"not a zip file at all"), "is not a readable .npz file"),
    (lambda p: np.savez(p, x=np.zeros((4, 2))), r"lacks array\(s\) \['y'\]"),
    (lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.zeros(3, dtype=np.int64)), "needs x of shape"),
    (lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.array([0, -1, 1, 0])), "must be 1-D and >= 0"),
    (lambda p: np.savez(p, x=np.zeros((2, 2)), y=np.array(["a", "b"])), "must be integer labels or float"),
    (lambda p: np.savez(p, x=np.array([object(), 1], dtype=object).reshape(2, 1), y=np.zeros(2)),
     "is not a readable .npz file"),
])
def test_npz_errors_name_the_file(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    if make:
        make(path)
    with pytest.raises(ConfigError, match=message) as failure:
        data.load(DataConfig(name="npz", path=str(path)))
    assert str(path) in str(failure.value)
    assert failure.value.args[0].startswith("data.path")
