"""data=arrays: .npy files memory-mapped, read a batch of rows at a time, the same run as data=npz."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import final_params, make_config, read_scalars

from distsgd import data
from distsgd.config import ConfigError, DataConfig, to_config
from distsgd.distributed import Dist
from distsgd.train import run

CPU = torch.device("cpu")


@pytest.fixture
def same_data(tmp_path) -> dict[str, list[str]]:
    """Overrides naming one classification set twice: as x.npy and y.npy, and as one .npz."""
    gen = np.random.default_rng(0)
    x = gen.standard_normal((300, 6)).astype(np.float32)
    y = (x[:, 0] + 0.3 * gen.standard_normal(300) > 0).astype(np.int32) + 2 * (x[:, 1] > 0)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    return {"arrays": ["data=arrays", f"data.x={tmp_path / 'x.npy'}", f"data.y={tmp_path / 'y.npy'}"],
            "npz": ["data=npz", f"data.path={tmp_path / 'xy.npz'}"]}


def test_each_rank_reads_only_the_rows_of_its_batches_in_the_npz_order(same_data, monkeypatch):
    mapped = data.load(to_config(make_config(*same_data["arrays"], "data.val_fraction=0.1")).data)
    loaded = data.load(to_config(make_config(*same_data["npz"], "data.val_fraction=0.1")).data)
    assert (mapped.task, mapped.num_outputs, mapped.input_shape) == (loaded.task, loaded.num_outputs, (6,))
    assert (len(mapped.x_train), len(mapped.x_val)) == (len(loaded.x_train), len(loaded.x_val)) == (270, 30)
    val = torch.tensor([29, 3, 17])
    assert all(torch.equal(a, b) for a, b in zip(mapped.val_batch(val, CPU), loaded.val_batch(val, CPU)))

    read: list[int] = []
    file_x = mapped.x_train.array
    monkeypatch.setattr(mapped.x_train, "array", _Recording(file_x, read))
    streamed = mapped.place(CPU, in_memory=False, num_workers=0)
    for rank in (0, 1):
        read.clear()
        dist = Dist(rank=rank, world_size=2, local_rank=rank, device=CPU)
        order = data.train_order(270, rank, 2, seed=7, epoch=1, device=CPU)
        batches = list(streamed.train_batches(epoch=1, first=2, steps=6, batch=16, dist=dist, seed=7))
        expected = list(loaded.train_batches(epoch=1, first=2, steps=6, batch=16, dist=dist, seed=7))
        assert len(batches) == len(expected) == 4
        for (x, y), (x_ref, y_ref) in zip(batches, expected):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        # Steps 2..5 of the epoch, this rank's share only, each batch in file order.
        assert sorted(read) == sorted(mapped.x_train.rows[order[32:96].numpy()].tolist())
        assert all(read[k * 16:(k + 1) * 16] == sorted(read[k * 16:(k + 1) * 16]) for k in range(4))


class _Recording:
    """A memory-mapped array that notes which rows are read."""

    def __init__(self, array: np.ndarray, read: list[int]):
        self.array, self.read, self.shape, self.dtype = array, read, array.shape, array.dtype

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        self.read += rows.tolist()
        return self.array[rows]


def test_arrays_train_exactly_as_the_same_npz(same_data, tmp_path):
    common = ["data.global_batch_size=32", "model.width=8", "optim=momentum", "trainer.max_steps=20",
              "trainer.val_every=8", "trainer.log_every=4"]
    run(make_config(*same_data["npz"], *common), tmp_path / "npz")
    run(make_config(*same_data["arrays"], *common, "data.num_workers=1"), tmp_path / "arrays")
    npz, arrays = final_params(tmp_path / "npz"), final_params(tmp_path / "arrays")
    assert all(torch.equal(arrays[k], npz[k]) for k in npz)
    curves = read_scalars(tmp_path / "npz")
    assert read_scalars(tmp_path / "arrays")["val/loss"] == curves["val/loss"] and len(curves["val/loss"]) == 4


def test_regression_targets_and_bad_files(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(40, dtype=np.float64).reshape(10, 2, 2))
    np.save(tmp_path / "t.npy", np.linspace(0, 1, 10))
    reg = data.load(DataConfig(name="arrays", x=str(tmp_path / "x.npy"), y=str(tmp_path / "t.npy"), in_memory=False,
                               val_fraction=0))
    assert (reg.task, reg.num_outputs, reg.input_shape) == ("regression", 1, (2, 2))
    x, y = reg.x_train[torch.tensor([9, 0])], reg.y_train[torch.tensor([9, 0])]
    rows = reg.x_train.rows[[9, 0]]
    assert torch.equal(x, torch.arange(40, dtype=torch.float32).view(10, 2, 2)[rows])
    assert y.shape == (2, 1) and y.dtype == torch.float32

    np.save(tmp_path / "short.npy", np.zeros(9, dtype=np.int64))
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 2)))
    for y_file, message in [("missing.npy", f"data.y: no such file: {tmp_path / 'missing.npy'}"),
                            ("short.npy", "needs x of shape (N, features...) and y of length N"),
                            ("a.npz", f"data.y: {tmp_path / 'a.npz'} is not a .npy file")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            data.load(DataConfig(name="arrays", x=str(tmp_path / "x.npy"), y=str(tmp_path / y_file), in_memory=False))
    for overrides, message in [([], "data.x must be a .npy file for data=arrays, got None"),
                               (["data.x=x.npy", "data.y=y.npy", "data.in_memory=true"],
                                "data.in_memory must be false for data=arrays (they stay memory-mapped), got True")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            to_config(make_config("data=arrays", *overrides))


def _memory_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of this process; ru_maxrss would also keep the
    peak of threads that have exited, and could not be reset."""
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def test_a_run_on_a_memory_mapped_file_holds_a_small_part_of_it_in_memory(tmp_path):
    # Rows of 64 KiB, so that the pages the kernel maps around each row read count little: a
    # 210 MB file of 3200 samples, of which this run reads 80.
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(3200, 16384))
    x[:, 0] = np.arange(len(x)) % 7  # one value per row, the rest zeros (a sparse file: quick to write)
    x.flush()
    size = (tmp_path / "x.npy").stat().st_size
    del x
    # Out of the page cache, as most of a file larger than memory is: the pages just written are
    # cached in large folios, and on recent kernels a fault maps a cached folio whole (up to 2 MB).
    fd = os.open(tmp_path / "x.npy", os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    np.save(tmp_path / "y.npy", np.arange(3200) % 3)
    common = ["data.global_batch_size=16", "model.width=4", "trainer.max_steps=3", "trainer.val_every=2"]
    run(make_config(*common, "data.dim=16384", "data.num_samples=64"), tmp_path / "warm-up")  # imports, first uses
    Path("/proc/self/clear_refs").write_text("5")  # forgets the peak so far: VmHWM is VmRSS now
    before = _memory_kib("VmRSS")
    run(make_config(*common, "data=arrays", f"data.x={tmp_path / 'x.npy'}", f"data.y={tmp_path / 'y.npy'}",
                    "data.val_fraction=0.01", "data.num_workers=0"), tmp_path / "arrays")
    grown = (_memory_kib("VmHWM") - before) * 1024
    (tmp_path / "x.npy").unlink()
    assert size > 200e6 and grown < size / 5, (grown, size)  # about 15 MB: 80 rows and the pages around them
