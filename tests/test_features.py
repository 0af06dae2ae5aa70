"""Training features real jobs need: gradient accumulation, mixed precision, clipping, torch.compile,
synchronized BatchNorm and streaming batches through a DataLoader, each against its exact reference."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_params_close, final_params, launch, launch_sweep, make_config, read_scalars
from test_datasets import make_cifar

from distsgd import data, models
from distsgd.config import ConfigError, to_config
from distsgd.train import run

SMALL = ["data.num_samples=512", "data.dim=16", "data.global_batch_size=32", "optim=momentum", "optim.lr=0.05",
         "trainer.log_every=1", "trainer.val_every=1000"]
STEPS_30 = SMALL + ["trainer.max_steps=30"]


def losses(run_dir) -> list[float]:
    return [v for _, v in read_scalars(run_dir)["train/loss"]]


def as_float(state: dict) -> dict:
    # BatchNorm's num_batches_tracked is an integer tensor, which has no norm.
    return {k: v.double() for k, v in state.items()}


def max_relative_difference(a: dict, b: dict) -> float:
    a, b = as_float(a), as_float(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp32")
    run(make_config(*STEPS_30), run_dir)
    return run_dir


# Gradient accumulation

def test_accumulation_in_one_process_equals_the_whole_batch(tmp_path):
    run(make_config(*SMALL, "trainer.max_steps=12"), tmp_path / "whole")
    run(make_config(*SMALL, "trainer.max_steps=12", "trainer.accumulate=4"), tmp_path / "micro")
    assert_params_close(final_params(tmp_path / "micro"), final_params(tmp_path / "whole"), rtol=1e-5)
    assert losses(tmp_path / "micro") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_accumulation_and_clipping_on_two_ranks_equal_one_process(tmp_path):
    # 2 ranks x 2 micro-batches of 8 against one process with the whole batch of 32. Clipping is
    # active, so the result also shows that it uses the norm of the all-reduced gradient: clipping
    # each rank's own gradient before the all-reduce would give a different update.
    overrides = [*SMALL, "trainer.max_steps=12", "trainer.clip_grad_norm=0.2"]
    run(make_config(*overrides), tmp_path / "one")
    done = launch(tmp_path / "two", *overrides, "trainer.accumulate=2", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_params_close(final_params(tmp_path / "two"), final_params(tmp_path / "one"), rtol=1e-5)
    norms = {name: [v for _, v in read_scalars(tmp_path / name)["train/grad_norm"]] for name in ("one", "two")}
    assert norms["two"] == pytest.approx(norms["one"], rel=1e-5)
    assert min(norms["one"]) > 0.2  # every update was clipped
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_global_batch_not_divisible_by_world_times_accumulate(tmp_path):
    message = ("data.global_batch_size=30 is not divisible by the world size 1 x trainer.accumulate=4; "
               "choose a multiple of 4")
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(make_config(*SMALL, "data.global_batch_size=30", "trainer.accumulate=4"), tmp_path)
    assert not list(tmp_path.glob("checkpoints/*.pt"))


# Mixed precision

def test_bf16_autocast_trains_close_to_fp32_but_not_equal(fp32_run, tmp_path):
    run(make_config(*STEPS_30, "trainer.precision=bf16"), tmp_path)
    bf16, fp32 = losses(tmp_path), losses(fp32_run)
    assert bf16[-1] < 0.7 * bf16[0]
    # Same initial model and batch: the first loss differs only by bf16 rounding of the forward pass.
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=1e-2)
    assert 1e-4 < max_relative_difference(final_params(tmp_path), final_params(fp32_run)) < 5e-2


def test_fp16_keeps_a_grad_scaler_whose_scale_is_checkpointed(fp32_run, tmp_path):
    run(make_config(*STEPS_30, "trainer.precision=fp16"), tmp_path)
    fp16 = losses(tmp_path)
    assert fp16[-1] < 0.7 * fp16[0]
    assert 1e-5 < max_relative_difference(final_params(tmp_path), final_params(fp32_run)) < 5e-2
    scaler = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    # torch's initial scale 2^16, which no overflow halved: 30 updates since, each counted.
    assert (scaler["scale"], scaler["growth_interval"], scaler["_growth_tracker"]) == (2.0**16, 2000, 30)
    assert torch.load(fp32_run / "checkpoints" / "last.pt", weights_only=True)["scaler"] == {}  # fp32: no scaler


# Gradient clipping

# Tolerances: fp16's rounding of the forward and backward pass against this fp32 reference; the
# update, a difference of float32 parameters, carries their rounding too.
@pytest.mark.parametrize("precision,norm_tolerance,update_tolerance", [("32", 1e-5, 1e-4), ("fp16", 1e-3, 1e-2)])
def test_clipping_scales_the_update_to_max_norm_and_logs_the_norm_before(tmp_path, precision, norm_tolerance,
                                                                         update_tolerance):
    lr, max_norm, batch = 2.0, 0.02, 32
    overrides = ["data.num_samples=512", "data.dim=16", f"data.global_batch_size={batch}", "optim=sgd",
                 f"optim.lr={lr}", "trainer.max_steps=1", f"trainer.clip_grad_norm={max_norm}",
                 f"trainer.precision={precision}"]
    run(make_config(*overrides), tmp_path)

    # The first update by hand in fp32: the same initial model and the first batch of the sampler's order.
    config = to_config(make_config(*overrides))
    dataset = data.load(config.data)
    torch.manual_seed(config.trainer.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = data.train_order(len(dataset.x_train), 0, 1, config.trainer.seed, 0, torch.device("cpu"))[:batch]
    F.cross_entropy(model(dataset.x_train[first]), dataset.y_train[first]).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grad.norm() > 10 * max_norm  # the clip really applies

    # Logged before clipping, and with fp16 after unscaling: the norm of the true gradient.
    assert read_scalars(tmp_path)["train/grad_norm"][0][1] == pytest.approx(float(grad.norm()), rel=norm_tolerance)
    final = final_params(tmp_path)
    update = torch.cat([(final[name] - initial[name]).flatten() for name, _ in model.named_parameters()])
    assert float(update.norm()) == pytest.approx(lr * max_norm, rel=1e-4)
    expected = -lr * max_norm * grad / grad.norm()
    assert (update - expected).norm() < update_tolerance * expected.norm()


# torch.compile

@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_runs_on_cpu_and_matches_eager(fp32_run, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        run(make_config(*STEPS_30, "trainer.compile=true"), tmp_path)
        assert counters["stats"]["unique_graphs"] >= 1  # the model really was compiled, not left eager
    finally:
        torch._dynamo.reset()
    assert_params_close(final_params(tmp_path), final_params(fp32_run), rtol=1e-5)


# Synchronized BatchNorm

BATCHNORM = ["data=digits", "model=resnet", "model.depth=20", "data.global_batch_size=32", "optim=momentum",
             "optim.lr=0.05", "trainer.max_steps=4", "trainer.val_every=1000"]


@pytest.fixture(scope="module")
def batchnorm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("batchnorm")
    run(make_config(*BATCHNORM, "model.sync_bn=true"), root / "one")
    # Both 2-process runs in one torchrun, as a sweep: jobs 0 and 1 (true, false).
    done = launch_sweep(root / "two", "model.sync_bn=true,false", *BATCHNORM)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_sync_bn_makes_a_batchnorm_model_world_size_invariant(batchnorm_runs):
    one, two = final_params(batchnorm_runs / "one"), final_params(batchnorm_runs / "two" / "0")
    assert sum(k.endswith("running_var") for k in one) == 19  # the stem's and two per block
    # Parameters and BatchNorm buffers (running mean, variance, count) alike.
    assert_params_close(as_float(two), as_float(one), rtol=1e-5)


def test_without_sync_bn_each_rank_normalizes_by_its_own_half(batchnorm_runs):
    one, two = final_params(batchnorm_runs / "one"), final_params(batchnorm_runs / "two" / "1")
    assert max_relative_difference(two, one) > 1e-3


# Streaming batches through a DataLoader

def test_streaming_through_a_dataloader_equals_in_memory(tmp_path):
    # CIFAR-10 files with augmentation: uint8 images, crops and flips by sample index, normalization.
    make_cifar(tmp_path / "cifar")
    overrides = ["data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.global_batch_size=8", "model=cnn",
                 "model.width=8", "trainer.max_steps=6", "trainer.val_every=1000"]  # 25 samples: 2 epochs
    run(make_config(*overrides), tmp_path / "memory")
    run(make_config(*overrides, "data.in_memory=false", "data.num_workers=2"), tmp_path / "stream")
    memory, stream = final_params(tmp_path / "memory"), final_params(tmp_path / "stream")
    assert all(torch.equal(stream[k], memory[k]) for k in memory)
