"""The GPU paths: NCCL under DDP and the manual engine, SyncBatchNorm, bf16/fp16 autocast,
torch.compile, channels_last, fused optimizers, and a GPU's RNG state restored on another GPU.

Run with ``pytest -m cuda`` (or scripts/gpu_check.sh, which adds the GPU benchmarks). Without a
CUDA GPU every test here is skipped at collection, so the default run pays nothing for them.
Tests that need two GPUs skip on one. TF32 is off, in this process and in those it launches, so
that runs on different layouts differ only by the order of float32 sums.
"""

from __future__ import annotations


import pytest
import torch
from conftest import assert_params_close, final_params, launch, make_config, read_scalars
from test_models import assert_converted_like_batchnorm
from torch import nn

from distsgd import checkpoint
from distsgd.config import OptimConfig
from distsgd.optim import build_optimizer
from distsgd.train import run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

MLP = ["data.num_samples=512", "data.dim=16", "data.global_batch_size=32", "optim=momentum", "optim.lr=0.05",
       "trainer.log_every=1", "trainer.val_every=10", "trainer.max_steps=30", "trainer.device=cuda"]
# 1797 digits, 20% for validation: 22 global batches of 64 per epoch.
RESNET = ["data=digits", "data.global_batch_size=64", "model=resnet", "model.depth=20", "optim=momentum",
          "optim.lr=0.05", "trainer.log_every=1", "trainer.val_every=10", "trainer.max_steps=10",
          "trainer.device=cuda"]


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # read by cuBLAS and cuDNN in launched processes
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def trained(run_dir, *overrides: str) -> dict[str, torch.Tensor]:
    run(make_config(*overrides), run_dir)
    return final_params(run_dir)


def losses(run_dir) -> list[float]:
    return [v for _, v in read_scalars(run_dir)["train/loss"]]


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)).item() for k in a)


def test_nccl_ddp_equals_the_manual_engine_on_one_gpu(tmp_path):
    ddp = trained(tmp_path / "ddp", *MLP, "trainer.allreduce=ddp")
    manual = trained(tmp_path / "manual", *MLP, "trainer.allreduce=manual")
    assert_params_close(manual, ddp, rtol=1e-6)
    assert losses(tmp_path / "manual") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-6)
    assert losses(tmp_path / "ddp")[-1] < 0.85 * losses(tmp_path / "ddp")[0]  # about 0.7 on CPU


@two_gpus
def test_nccl_on_two_gpus_ddp_and_manual_equal_one_gpu(tmp_path):
    one = trained(tmp_path / "one", *MLP)
    for engine in ("ddp", "manual"):
        done = launch(tmp_path / engine, *MLP, f"trainer.allreduce={engine}", nproc=2, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_params_close(final_params(tmp_path / engine), one, rtol=1e-5)
        assert losses(tmp_path / engine) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_sync_bn_on_cuda_is_torchs_syncbatchnorm_and_steps_like_batchnorm_on_one_rank():
    assert_converted_like_batchnorm(torch.device("cuda", 0), "nccl", nn.SyncBatchNorm, batch=8, out_rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sync_bn_trains_under_autocast_with_fp32_statistics(tmp_path, precision):
    fp32 = trained(tmp_path / "fp32", *RESNET, "model.sync_bn=true")
    mixed = trained(tmp_path / precision, *RESNET, "model.sync_bn=true", f"trainer.precision={precision}")
    stats = {k: v for k, v in mixed.items() if k.endswith(("running_mean", "running_var"))}
    assert stats and all(v.dtype == torch.float32 and v.isfinite().all() for v in stats.values())
    assert 1e-5 < max_relative_difference(mixed, fp32) < 0.1


@two_gpus
def test_sync_bn_on_two_gpus_equals_batchnorm_on_the_whole_batch_also_under_bf16(tmp_path):
    one = trained(tmp_path / "one", *RESNET)
    for precision in ("32", "bf16"):
        done = launch(tmp_path / precision, *RESNET, "model.sync_bn=true", f"trainer.precision={precision}", nproc=2,
                      timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_params_close(final_params(tmp_path / "32"), one, rtol=1e-4)  # running statistics included
    assert max_relative_difference(final_params(tmp_path / "bf16"), one) < 0.1


@pytest.mark.parametrize("precision,least", [("bf16", 1e-4), ("fp16", 1e-5)])
def test_autocast_on_cuda_trains_close_to_fp32_but_not_equal(tmp_path, precision, least):
    fp32 = trained(tmp_path / "fp32", *MLP)
    mixed = trained(tmp_path / precision, *MLP, f"trainer.precision={precision}")
    curve = losses(tmp_path / precision)
    assert curve[-1] < 0.85 * curve[0]
    assert curve[0] != losses(tmp_path / "fp32")[0] and curve[0] == pytest.approx(losses(tmp_path / "fp32")[0], rel=1e-2)
    assert least < max_relative_difference(mixed, fp32) < 5e-2
    scaler = torch.load(tmp_path / precision / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert (scaler != {}) == (precision == "fp16")


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    eager = trained(tmp_path / "eager", *MLP)
    compiled = trained(tmp_path / "compiled", *MLP, "trainer.compile=true")
    assert set(compiled) == set(eager)  # no _orig_mod. prefix: checkpoints load into an eager model
    assert_params_close(compiled, eager, rtol=1e-5)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)


def test_convolutions_train_in_channels_last_and_equal_the_cpu_run(tmp_path):
    cnn = ["data=digits", "data.global_batch_size=64", "model=cnn", "model.width=16", "optim=momentum",
           "optim.lr=0.05", "trainer.max_steps=10", "trainer.val_every=10"]
    gpu = trained(tmp_path / "cuda", *cnn, "trainer.device=cuda")
    cpu = trained(tmp_path / "cpu", *cnn, "trainer.device=cpu")
    # A convolution with several input channels, where the two layouts differ (the first has 1).
    weight = next(v for v in gpu.values() if v.dim() == 4 and v.shape[1] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert_params_close(gpu, cpu, rtol=1e-4)


@pytest.mark.parametrize("cfg", [
    OptimConfig(name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-2),
    OptimConfig(name="adam", weight_decay=0.1),
    OptimConfig(name="adamw", weight_decay=0.1),
    OptimConfig(name="adagrad"),
    OptimConfig(name="rmsprop", momentum=0.5),
], ids=lambda cfg: cfg.name)
def test_fused_and_foreach_optimizers_on_cuda_equal_the_cpu_ones(cfg):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(257, generator=gen), torch.randn(16, 8, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(5)]
    results, optimizers = {}, {}
    for device in (torch.device("cpu"), torch.device("cuda")):
        params = [nn.Parameter(p.to(device)) for p in start]
        optimizers[device.type] = optimizer = build_optimizer(cfg, params, 0.01, device)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device)
            optimizer.step()
        results[device.type] = [p.detach().cpu() for p in params]
    fused = cfg.name in ("sgd", "adam", "adamw")
    assert optimizers["cuda"].defaults["fused" if fused else "foreach"] is True
    assert not optimizers["cpu"].defaults.get("fused")
    for got, expected in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_gpu_rng_state_restores_on_another_gpu_and_through_a_checkpoint(tmp_path):
    source = torch.device("cuda", 0)
    target = torch.device("cuda", torch.cuda.device_count() - 1)  # another GPU where there are two
    torch.cuda.manual_seed_all(7)
    torch.rand(3, device=source)  # away from the seed
    with torch.cuda.device(source):
        saved = checkpoint.rng_state()  # the current device's, as the trainer's ranks save it
    assert torch.equal(saved["cuda"], checkpoint.rng_state(source)["cuda"])
    expected = torch.rand(5, device=source).cpu()
    path = checkpoint.step_path(tmp_path, 1)
    checkpoint.save({"model": {}, "step": 1, "rng": saved}, path)
    loaded = checkpoint.load(path)["rng"]

    torch.cuda.manual_seed_all(8)
    checkpoint.set_rng_state(loaded, target)
    assert torch.equal(torch.rand(5, device=target).cpu(), expected)
    # A checkpoint from before per-device states: every GPU's state of a process that saw 8,
    # of which the entry of the target's index is restored.
    old = [checkpoint.rng_state(source)["cuda"]] * 8
    old[target.index] = loaded["cuda"]
    checkpoint.set_rng_state({**loaded, "cuda": old}, target)
    assert torch.equal(torch.rand(5, device=target).cpu(), expected)
