"""The trainer in one process: what a run writes, and that SGD really converges."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from conftest import final_params, make_config, read_scalars

from distsgd import data, metrics, transforms
from distsgd.config import to_config
from distsgd.stopping import Stopped
from distsgd.train import run

SMALL = ["data.num_samples=512", "data.global_batch_size=32", "trainer.log_every=4", "trainer.val_every=10"]


def test_a_run_writes_curves_and_a_plain_checkpoint(tmp_path):
    metrics = run(make_config(*SMALL, "trainer.max_steps=30", "optim=momentum", "schedule=cosine",
                              "schedule.warmup_steps=5"), tmp_path)
    curves = read_scalars(tmp_path)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_sec", "val/loss", "val/accuracy"} <= set(curves)
    # x-axis: the optimizer step; train/* every log_every updates and at the last one, val/* every val_every.
    assert [s for s, _ in curves["train/loss"]] == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    assert [s for s, _ in curves["val/loss"]] == [0, 10, 20, 30]
    assert curves["train/lr"][0][1] == pytest_approx(0.1 / 5) and curves["train/lr"][1][1] == pytest_approx(0.1)
    assert curves["val/loss"][-1][1] < curves["val/loss"][0][1]
    assert 0 <= metrics["val/accuracy"] <= 1 and curves["val/accuracy"][-1][1] == pytest_approx(metrics["val/accuracy"])

    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 30 and state["scheduler"]["name"] == "cosine"
    assert yaml.safe_load(state["config"])["optim"]["momentum"] == 0.9
    assert set(state["model"]) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert state["optimizer"]["state"][0]["momentum_buffer"].shape == state["model"]["1.weight"].shape


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-6)


def test_max_epochs_and_max_steps_whichever_ends_first(tmp_path):
    # 512 samples, 20% for validation: 409 training samples, 12 global batches of 32 per epoch.
    metrics = run(make_config(*SMALL, "trainer.max_steps=100", "trainer.max_epochs=2"), tmp_path / "a")
    assert read_scalars(tmp_path / "a")["val/loss"][-1] == (24, pytest_approx(metrics["val/loss"]))
    assert torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["step"] == 24
    run(make_config(*SMALL, "trainer.max_steps=5", "trainer.max_epochs=2"), tmp_path / "b")
    assert torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["step"] == 5


def test_sgd_reaches_the_least_squares_optimum(tmp_path):
    overrides = ["experiment=regression_sgd", "data.num_samples=1024", "data.dim=8", "data.val_fraction=0",
                 "data.global_batch_size=32", "optim.lr=0.1", "trainer.max_steps=300"]
    run(make_config(*overrides), tmp_path)
    dataset = data.load(to_config(make_config(*overrides)).data)
    design = torch.cat([dataset.x_train, torch.ones(len(dataset.x_train), 1)], 1).double()
    optimum = torch.linalg.lstsq(design, dataset.y_train.double()).solution.flatten()
    params = final_params(tmp_path)
    reached = torch.cat([params["1.weight"].flatten(), params["1.bias"]]).double()
    # Minibatch SGD with a cosine decay to 0 lands within 0.1% of the optimum (measured: 2.5e-4).
    assert (reached - optimum).norm() / optimum.norm() < 1e-3


def test_same_seed_same_model_and_seed_matters(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(make_config(*SMALL, "trainer.max_steps=8", f"trainer.seed={seed}"), tmp_path / name)
    a, b, c = (final_params(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])


def test_linear_scaling_changes_the_logged_rate(tmp_path):
    run(make_config(*SMALL, "trainer.max_steps=2", "optim.lr=0.1", "optim.reference_batch_size=8",
                    "optim.scaling=sqrt"), tmp_path)
    assert read_scalars(tmp_path)["train/lr"][0][1] == pytest_approx(0.1 * math.sqrt(32 / 8))


def test_a_stopped_run_closes_its_curves_with_an_hparams_entry(tmp_path):
    # lr 1e6 on least squares: the loss overflows within a few steps and nonfinite=stop ends the run.
    with pytest.raises(Stopped, match=r"non-finite .* at step (\d+); stopped after trainer.nonfinite=stop") as stop:
        run(make_config("experiment=regression_sgd", "optim.lr=1e6", "trainer.log_every=1",
                        "trainer.nonfinite=stop"), tmp_path)
    step = int(re.search(r"at step (\d+)", str(stop.value))[1])
    curves = read_scalars(tmp_path)
    assert [s for s, _ in curves["train/loss"]] == list(range(step))  # every logged point reached the file
    events = next((tmp_path / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
    assert b"_hparams_/session_start_info" in events and b"_hparams_/session_end_info" in events


def test_samples_per_sec_counts_every_sample_trained_since_the_last_point(monkeypatch):
    clock = iter([100.0, 106.0, 107.0, 108.0, 109.0, 200.0, 201.0])  # each reading of the clock, in order
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    resumed = metrics.Throughput(samples_before=250)  # resumed at step 25 of 10-sample steps
    assert resumed.samples_per_sec(30, samples=310) == pytest_approx(6 * 10 / 6)  # steps 25..30
    with resumed.paused():  # 107 to 108: validation is not training
        pass
    assert resumed.samples_per_sec(40, samples=410) == pytest_approx(10 * 10 / 2)  # 3 s less 1
    fresh = metrics.Throughput(samples_before=0)
    assert fresh.samples_per_sec(0, samples=10) is None  # step 0's time is mostly start-up


def test_normalisation_statistics_are_on_the_device_once_placed():
    raw = data.Dataset(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                       torch.full((2, 3, 2, 2), 255, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                       "classification", 10, mean_std=transforms.CIFAR10_MEAN_STD)
    placed = raw.place(torch.device("cpu"), in_memory=True, num_workers=0)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in placed.mean_std)
    x, _ = placed.val_batch(torch.arange(2), torch.device("cpu"))
    mean, std = transforms.CIFAR10_MEAN_STD
    expected = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    torch.testing.assert_close(x, expected)
