"""Real data through the whole trainer: the digits presets reach 95% on 2 processes, and MNIST and
CIFAR-10 files written here train end to end, augmentation included, at any world size."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_params_close, final_params, launch, launch_sweep, make_config, read_scalars
from omegaconf import OmegaConf
from test_datasets import MNIST_FILES, make_cifar, make_mnist

from distsgd.train import run


def test_digits_presets_reach_95_percent_on_two_processes(tmp_path):
    experiments = ("digits_mlp", "digits_cnn")
    done = launch_sweep(tmp_path, f"experiment={','.join(experiments)}")
    assert done.returncode == 0, done.stderr[-3000:]
    for job, experiment in enumerate(experiments):
        step, accuracy = read_scalars(tmp_path / str(job))["val/accuracy"][-1]
        last = torch.load(tmp_path / str(job) / "checkpoints" / "last.pt", weights_only=True)
        assert step == last["step"]  # after the last update
        assert OmegaConf.create(last["config"]).model.name == experiment.removeprefix("digits_")  # the job's own
        assert accuracy >= 0.95, f"experiment={experiment}: validation accuracy {accuracy:.4f} < 0.95"


def test_mnist_files_train_end_to_end(tmp_path):
    (tmp_path / "mnist").mkdir()
    make_mnist(tmp_path / "mnist", n_train=40, n_test=10, gz=True)  # .gz, as downloaded
    metrics = run(make_config("data=mnist", f"data.root={tmp_path / 'mnist'}", "data.global_batch_size=8",
                              "model=cnn", "model.width=8", "trainer.max_steps=4", "trainer.val_every=2"),
                  tmp_path / "run")
    assert [s for s, _ in read_scalars(tmp_path / "run")["val/accuracy"]] == [0, 2, 4]
    assert metrics["val/accuracy"] in [pytest.approx(k / 10) for k in range(11)]  # of the 10 test images
    assert read_scalars(tmp_path / "run")["val/loss"][-1] == (4, pytest.approx(metrics["val/loss"], rel=1e-6))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["model"]["0.weight"].shape == (4, 1, 5, 5)  # one input channel


# make_cifar writes 25 training images (3 + 4 + 5 + 6 + 7) and 8 test images: 3 global batches
# of 8 per epoch, so 6 steps cover 2 epochs, each with its own crops and flips.
CIFAR = ["data=cifar10", "data.global_batch_size=8", "model=cnn", "model.width=8", "optim=momentum",
         "optim.lr=0.01", "trainer.max_steps=6", "trainer.val_every=3"]


@pytest.fixture(scope="module")
def cifar_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(root / "files" / "cifar-10-batches-bin")  # what the archive unpacks to; data.root is above it
    overrides = [*CIFAR, f"data.root={root / 'files'}"]
    run(make_config(*overrides, "data.augment=false"), root / "plain")
    run(make_config(*overrides, "data.augment=true"), root / "one")
    done = launch(root / "two", *overrides, "data.augment=true", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("name", ["plain", "one", "two"])
def test_cifar10_files_train_end_to_end(cifar_runs, name):
    curves = read_scalars(cifar_runs / name)
    assert [s for s, _ in curves["val/loss"]] == [s for s, _ in curves["val/accuracy"]] == [0, 3, 6]
    assert all(math.isfinite(v) for _, v in curves["val/loss"])
    # Before the first update: the same initial model on the same test images, augmented or not, 1 or 2 ranks.
    assert curves["val/loss"][0][1] == pytest.approx(read_scalars(cifar_runs / "plain")["val/loss"][0][1], rel=1e-6)
    state = torch.load(cifar_runs / name / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["model"]["0.weight"].shape == (4, 3, 5, 5)


def test_cifar10_augmentation_changes_what_is_trained_on(cifar_runs):
    plain, augmented = final_params(cifar_runs / "plain"), final_params(cifar_runs / "one")
    assert not torch.allclose(augmented["0.weight"], plain["0.weight"], rtol=1e-3)


def test_cifar10_augmentation_does_not_depend_on_the_world_size(cifar_runs):
    assert_params_close(final_params(cifar_runs / "two"), final_params(cifar_runs / "one"), rtol=1e-5)
    one, two = ([v for _, v in read_scalars(cifar_runs / name)["val/loss"]] for name in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-5)


def test_a_broken_file_stops_the_trainer_with_exit_code_2_naming_it(tmp_path):
    (tmp_path / "mnist").mkdir()
    make_mnist(tmp_path / "mnist")
    broken = tmp_path / "mnist" / MNIST_FILES[0]
    broken.write_bytes(broken.read_bytes()[:-100])
    done = launch(tmp_path / "run", "data=mnist", f"data.root={tmp_path / 'mnist'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"distsgd: error: mnist: {broken}: truncated" in done.stderr
    assert "Traceback" not in done.stderr
