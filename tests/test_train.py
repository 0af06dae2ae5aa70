"""The trainer in one process: what a run writes, and that SGD really converges."""

from __future__ import annotations

import math

import torch
import yaml
from conftest import final_params, make_config, read_scalars

from distsgd import data
from distsgd.config import to_config
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
