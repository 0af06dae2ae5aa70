"""Checkpoints round-trip exactly, refuse what weights_only cannot load, detect corruption, survive
a crash mid-save, and resume picks the newest valid one."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import random
import re
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from distsgd import checkpoint
from distsgd.checkpoint import (find_latest_valid, load, prune, rng_state, save, set_rng_state, step_path,
                                verify)
from distsgd.config import ConfigError

MISMATCH = "checksum mismatch (truncated or corrupted)"


def ckpt(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step}


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_is_exact_and_loads_with_plain_torch_load(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 120,
        "nested": {"list": [1, 2.5, "x", None, True, (3, torch.arange(3, dtype=torch.int32))],
                   "tuple": (False, {"deep": torch.ones(2, dtype=torch.float64)}), 7: -1.5e-300},
        "config": "optim:\n  lr: 0.1\n",
    }
    path = step_path(tmp_path / "checkpoints", 120)
    save(state, path)

    assert path.name == "step_00000120.pt"
    assert verify(path) is None
    assert (tmp_path / "checkpoints" / "step_00000120.pt.sha256").read_text().split()[0] == \
        hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same(load(path), state)
    assert_same(torch.load(path, weights_only=True), state)
    assert type(load(path)["model"]) is OrderedDict


class Custom:
    pass


Point = namedtuple("Point", "x y")


@pytest.mark.parametrize("bad,where", [
    ({"meta": {"when": datetime.datetime(2024, 1, 1)}}, "state['meta']['when']"),
    ({"extra": [1, (2, Custom())]}, "state['extra'][1][1]"),
    ({"loss": np.float64(0.5)}, "state['loss']"),  # a float subclass: pickles as numpy's, not a float
    ({"extra": Point(1, 2)}, "state['extra']"),  # likewise a tuple subclass
    ({"extra": {Custom(): 1}}, "state['extra'] key"),
])
def test_non_plain_values_are_refused_by_path_and_nothing_is_written(tmp_path, bad, where):
    with pytest.raises(ConfigError, match=rf"checkpoint entry {re.escape(where)}"):
        save({**ckpt(1), **bad}, tmp_path / "checkpoints" / "step_00000001.pt")
    assert list(tmp_path.iterdir()) == []


class Foreign:
    """Unpickling this calls os.mkdir(marker): a stand-in for code smuggled into a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_foreign_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "step_00000001.pt"
    torch.save({**ckpt(1), "payload": Foreign(marker)}, path)
    (tmp_path / "step_00000001.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    assert verify(path) is None

    with pytest.raises(ConfigError, match=r"step_00000001\.pt holds objects other than tensors.*refusing"):
        load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload really is live: a trusting load runs it
    assert marker.exists()


@pytest.mark.parametrize("state", [{"weights": torch.ones(1)}, {"model": {}}, {"step": 3}, {"model": {}, "step": 3.0}])
def test_a_dict_without_model_and_integer_step_is_not_a_checkpoint(tmp_path, state):
    path = tmp_path / "x.pt"
    save(state, path)
    with pytest.raises(ConfigError, match="not a distsgd checkpoint"):
        load(path)


@pytest.mark.parametrize("corrupt", [truncate, flip_byte])
def test_corruption_is_detected_by_verify_and_load(tmp_path, corrupt):
    path = step_path(tmp_path, 5)
    save(ckpt(5), path)
    corrupt(path)
    assert verify(path) == MISMATCH
    with pytest.raises(ConfigError, match=rf"step_00000005\.pt: {re.escape(MISMATCH)}"):
        load(path)


def test_missing_file_and_missing_sidecar_are_reported(tmp_path):
    path = step_path(tmp_path, 5)
    assert verify(path) == "missing"
    save(ckpt(5), path)
    (tmp_path / "step_00000005.pt.sha256").unlink()
    assert verify(path) == "no .sha256 sidecar"
    with pytest.raises(ConfigError, match=r"step_00000005\.pt: no \.sha256 sidecar"):
        load(path)


def test_a_load_after_verification_reads_the_file_once_and_still_refuses_bad_content(tmp_path):
    path = step_path(tmp_path, 5)
    save(ckpt(5), path)
    (tmp_path / "step_00000005.pt.sha256").write_text("0" * 64 + "  step_00000005.pt\n")  # would fail verify
    assert verify(path) == MISMATCH
    assert load(path, verified=True)["step"] == 5
    save({"weights": torch.ones(1)}, path)
    with pytest.raises(ConfigError, match="not a distsgd checkpoint"):
        load(path, verified=True)


@pytest.fixture
def three(tmp_path) -> Path:
    for step in (10, 20, 30):
        save(ckpt(step), step_path(tmp_path, step))
    return tmp_path


def test_latest_valid_falls_back_past_a_corrupt_newest_one_with_a_warning(three, caplog):
    assert find_latest_valid(three) == step_path(three, 30)
    flip_byte(step_path(three, 30))
    with caplog.at_level(logging.WARNING, logger="distsgd"):
        assert find_latest_valid(three) == step_path(three, 20)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "distsgd"]
    assert len(warnings) == 1
    assert "step_00000030.pt" in warnings[0].getMessage() and MISMATCH in warnings[0].getMessage()


def test_no_valid_checkpoint_raises_and_touches_nothing(three):
    for step in (10, 20, 30):
        truncate(step_path(three, step))
    before = snapshot(three)
    with pytest.raises(ConfigError, match=f"no valid checkpoint in {re.escape(str(three))}"):
        find_latest_valid(three)
    assert snapshot(three) == before


def test_no_checkpoints_at_all_gives_none(tmp_path):
    assert find_latest_valid(tmp_path / "absent") is None
    assert find_latest_valid(tmp_path) is None
    (tmp_path / ".step_00000010.pt.tmp").write_bytes(b"left by a crash")  # neither counts as a checkpoint
    (tmp_path / "step_00000010.pt.sha256").write_text("0" * 64)
    assert find_latest_valid(tmp_path) is None


@pytest.mark.parametrize("last_step,expected", [(20, "step_00000030.pt"), (30, "last.pt"), (40, "last.pt")])
def test_last_pt_ranks_by_the_step_stored_inside_and_wins_ties(three, last_step, expected):
    save(ckpt(last_step), three / "last.pt")
    assert find_latest_valid(three) == three / expected


def test_corrupt_last_pt_is_skipped_with_a_warning(three, caplog):
    save(ckpt(40), three / "last.pt")
    truncate(three / "last.pt")
    with caplog.at_level(logging.WARNING, logger="distsgd"):
        assert find_latest_valid(three) == step_path(three, 30)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"checkpoint {three / 'last.pt'}: {MISMATCH}; skipping it"]


def test_only_a_corrupt_last_pt_raises(tmp_path):
    save(ckpt(40), tmp_path / "last.pt")
    flip_byte(tmp_path / "last.pt")
    with pytest.raises(ConfigError, match="no valid checkpoint in"):
        find_latest_valid(tmp_path)


def test_prune_keeps_the_newest_step_files_their_sidecars_and_last_pt(tmp_path):
    steps = (10, 99_999_998, 99_999_999, 100_000_000)  # the last sorts first by name
    for step in steps:
        save(ckpt(step), step_path(tmp_path, step))
    save(ckpt(200), tmp_path / "last.pt")

    prune(tmp_path, keep=0)
    prune(tmp_path, keep=10)
    assert len(list(tmp_path.iterdir())) == 10

    prune(tmp_path, keep=2)
    kept = {"step_99999999.pt", "step_100000000.pt", "last.pt"}
    assert {p.name for p in tmp_path.iterdir()} == kept | {f"{name}.sha256" for name in kept}
    assert all(verify(tmp_path / name) is None for name in kept)


def draws() -> list:
    return [torch.rand(4), torch.randn(3), np.random.rand(4), np.random.randn(3),
            [random.random() for _ in range(4)], random.gauss(0, 1)]


def assert_draws_equal(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            np.testing.assert_array_equal(x, y)


def test_rng_state_restores_every_generator_also_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(1)  # leave a cached gaussian in numpy and in random
    random.gauss(0, 1)
    saved = rng_state()
    expected = draws()
    draws()

    set_rng_state(saved)
    assert_draws_equal(draws(), expected)

    path = step_path(tmp_path, 1)
    save({**ckpt(1), "rng": saved}, path)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert_draws_equal(draws(), expected)
    set_rng_state(load(path)["rng"])
    assert_draws_equal(draws(), expected)


class FakeCuda:
    """torch.cuda's generator functions on ``count`` GPUs, with ``current`` the current device.
    GPU i's state is ``gpu_state(i)``; set_rng_state calls are recorded as (state, index)."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.count, self.current, self.restored = count, current, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.restored.append(
            (state.tolist(), self.index(device))))

    def index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        assert index is not None and 0 <= index < self.count, f"no GPU {device!r} among {self.count}"
        return index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return gpu_state(self.index(device))


def gpu_state(index: int) -> torch.Tensor:
    return torch.full((16,), index, dtype=torch.uint8)


def test_a_gpu_state_saved_on_device_3_of_4_restores_onto_device_0_of_1(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch, count=4, current=3)
    path = step_path(tmp_path, 1)
    save({**ckpt(1), "rng": rng_state()}, path)
    saved = load(path)["rng"]
    assert saved["cuda"].tolist() == gpu_state(3).tolist()  # this rank's generator only, not all four
    assert rng_state(torch.device("cuda", 2))["cuda"].tolist() == gpu_state(2).tolist()

    cuda.count, cuda.current = 1, 0  # one GPU per process now, e.g. one per SLURM task
    set_rng_state(saved)
    set_rng_state(saved, torch.device("cuda"))
    set_rng_state(saved, torch.device("cuda", 0))
    assert cuda.restored == [(gpu_state(3).tolist(), 0)] * 3
    set_rng_state(saved, torch.device("cpu"))  # a CPU process does not draw from a GPU generator
    assert rng_state(torch.device("cpu"))["cuda"] is None
    assert len(cuda.restored) == 3


def test_an_old_checkpoint_with_every_gpus_state_restores_this_devices_entry_or_warns(monkeypatch, caplog):
    cuda = FakeCuda(monkeypatch, count=4, current=1)
    old = {**rng_state(), "cuda": [gpu_state(i) for i in range(2)]}  # written by a process that saw 2 GPUs
    set_rng_state(old)
    assert cuda.restored == [(gpu_state(1).tolist(), 1)]
    cuda.current = 3
    with caplog.at_level(logging.WARNING, logger="distsgd"):
        set_rng_state(old)
        set_rng_state({**old, "cuda": []})  # written without CUDA: nothing to restore, nothing to say
    assert len(cuda.restored) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "the checkpoint's RNG states cover 2 GPU(s), none for cuda:3; its generator keeps its seed"]


@pytest.mark.parametrize("cuda", [gpu_state(3), [gpu_state(0), gpu_state(1)], None, []])
def test_a_saved_gpu_state_without_cuda_restores_the_rest(monkeypatch, tmp_path, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(4)
    np.random.seed(5)
    saved = {**rng_state(), "cuda": cuda}
    assert rng_state()["cuda"] is None
    expected = draws()
    path = step_path(tmp_path, 1)
    save({**ckpt(1), "rng": saved}, path)
    set_rng_state(load(path)["rng"])
    assert_draws_equal(draws(), expected)


@pytest.mark.parametrize("name", ["step_00000020.pt", "last.pt"])
@pytest.mark.parametrize("failing", ["checkpoint", "sidecar"])
def test_a_crash_mid_save_never_leaves_a_verifying_incomplete_checkpoint(tmp_path, monkeypatch, caplog, name,
                                                                         failing):
    save(ckpt(10), step_path(tmp_path, 10))
    save(ckpt(10), tmp_path / "last.pt")
    before = snapshot(tmp_path)
    crash_at = name if failing == "checkpoint" else f"{name}.sha256"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == crash_at:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        save(ckpt(20), tmp_path / name)
    monkeypatch.undo()

    after = snapshot(tmp_path)
    assert not any(n.endswith(".tmp") for n in after)
    assert verify(step_path(tmp_path, 10)) is None
    if failing == "checkpoint":
        assert after == before  # the final name is untouched: old file (or none), old sidecar
    else:
        # the new checkpoint is in place but uncommitted: its sidecar is absent or still the old one
        assert verify(tmp_path / name) in ("no .sha256 sidecar", MISMATCH)
    with caplog.at_level(logging.WARNING, logger="distsgd"):
        assert load(find_latest_valid(tmp_path))["step"] == 10
