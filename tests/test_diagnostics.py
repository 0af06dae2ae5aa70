"""The instruments: gradient noise scale against per-sample gradients, across world sizes and
resumes; per-layer statistics against hand-computed updates."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import final_params, launch_sweep, make_config, read_scalars

from distsgd import data, distributed, models
from distsgd.config import ConfigError, to_config
from distsgd.step import TrainStep
from distsgd.train import build, run

# Least squares at a point that does not move (lr 1e-8): the per-sample gradients there give the
# true |G|^2 and tr(Sigma). 819 training samples, global batch 32.
FIXED = ["data=synthetic_regression", "model=linear", "data.num_samples=1024", "data.dim=8", "data.noise=1.0",
         "optim.lr=1e-8", "data.global_batch_size=32", "trainer.val_every=1000", "diagnostics.noise_scale=true",
         "diagnostics.noise_ema_samples=100000000"]  # an EMA this long is the plain mean of the steps
GNS = ("gns/small_sq", "gns/big_sq", "gns/grad_sq", "gns/trace_cov", "gns/b_simple")


def test_noise_scale_estimates_the_true_gradient_norm_and_trace(tmp_path):
    overrides = FIXED + ["trainer.max_steps=400", "trainer.log_every=400", "trainer.accumulate=2"]
    run(make_config(*overrides), tmp_path)
    curves = read_scalars(tmp_path)
    dataset = data.load(to_config(make_config(*overrides)).data)
    params = final_params(tmp_path)
    x, y = dataset.x_train.double(), dataset.y_train.double()
    residual = x @ params["1.weight"].double().T + params["1.bias"].double() - y
    per_sample = torch.cat([2 * residual * x, 2 * residual], 1)  # gradients of the squared error
    n, mean = len(per_sample), per_sample.mean(0)
    trace = (per_sample - mean).square().sum(1).mean()
    # Batches are drawn without replacement from n samples; then the two-batch estimators'
    # expectations are exactly these (docs: README, gradient noise scale).
    expected = {"gns/trace_cov": trace * n / (n - 1), "gns/grad_sq": mean.square().sum() - trace / (n - 1)}
    expected["gns/b_simple"] = expected["gns/trace_cov"] / expected["gns/grad_sq"]
    # 10%: over 400 steps, four seeds landed within 3.3% (the mean of noisy per-step estimates);
    # 4000 steps land within 1%, so the estimator has no bias of that size.
    for tag, value in expected.items():
        assert curves[tag][-1][1] == pytest.approx(value.item(), rel=0.10), tag
    assert 5 < curves["gns/b_simple"][-1][1] < 20  # B_simple of this problem is about 10


def test_two_processes_measure_what_one_process_measures_with_micro_batches_and_resume_exactly(tmp_path):
    # 2 processes x 16 samples and 1 process x 2 micro-batches of 16 take the very same samples as
    # their small batches, so every step's estimate agrees, for both engines, also when each rank
    # takes its 16 in 2 micro-batches (the rank's gradient is measured once it is whole).
    common = FIXED + ["trainer.max_steps=30", "trainer.log_every=3", "trainer.checkpoint_every=12",
                      "diagnostics.noise_ema_samples=200", "diagnostics.layers=true"]
    run(make_config(*common, "trainer.accumulate=2"), tmp_path / "one")
    engines = ("ddp", "manual")
    done = launch_sweep(tmp_path / "two", *common, f"trainer.allreduce={','.join(engines)}", "trainer.accumulate=1,2")
    assert done.returncode == 0, done.stderr[-3000:]
    one = read_scalars(tmp_path / "one")
    layers = [tag for tag in one if tag.startswith("layers/")]
    assert len(layers) == 2 * 3  # weight and bias, three statistics each
    for job, engine in enumerate(engine for engine in engines for _ in (1, 2)):
        two = read_scalars(tmp_path / "two" / str(job))
        for tag in GNS + tuple(layers):
            assert [s for s, _ in two[tag]] == [s for s, _ in one[tag]] == list(range(0, 30, 3)) + [29]
            assert [v for _, v in two[tag]] == pytest.approx([v for _, v in one[tag]], rel=1e-4), (engine, tag)

    # Resumed from step 12, the EMAs (in the checkpoint) continue exactly.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for name in ("step_00000012.pt", "step_00000012.pt.sha256"):
        shutil.copy(tmp_path / "one" / "checkpoints" / name, resumed / "checkpoints" / name)
    run(make_config(*common, "trainer.accumulate=2"), resumed)
    after = read_scalars(resumed)
    for tag in GNS:
        assert [p for p in after[tag] if p[0] >= 12] == [p for p in one[tag] if p[0] >= 12], tag
    saved = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["diagnostics"]["noise_scale"]
    assert saved == torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)["diagnostics"]["noise_scale"]


def test_noise_scale_without_a_small_batch_refuses_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^diagnostics.noise_scale needs a small and a big batch: run on 2 or more "
                                          r"processes, or set trainer.accumulate >= 2 on one"):
        run(make_config(*FIXED, "trainer.max_steps=2"), tmp_path)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_layer_statistics_match_a_hand_computed_first_update(optim, tmp_path):
    lr = 0.01
    overrides = ["data=synthetic_regression", "model=linear", "data.num_samples=256", "data.dim=8",
                 "data.global_batch_size=32", f"optim={optim}", f"optim.lr={lr}", "trainer.max_steps=2",
                 "trainer.log_every=1", "diagnostics.layers=true"]
    config = to_config(make_config(*overrides))
    dataset = data.load(config.data)
    torch.manual_seed(config.trainer.seed)
    initial = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    run(make_config(*overrides), tmp_path)
    curves = read_scalars(tmp_path)
    for name, w in initial.named_parameters():
        weight_norm = curves[f"layers/{name}/weight_norm"][0]
        grad_norm = curves[f"layers/{name}/grad_norm"][0][1]
        assert weight_norm == (0, pytest.approx(w.norm().item(), rel=1e-6))
        # SGD moves by lr * g; Adam's first step by lr * g / (|g| + eps), lr in every coordinate.
        update = lr * grad_norm if optim == "sgd" else lr * math.sqrt(w.numel())
        assert curves[f"layers/{name}/update_ratio"][0] == (0, pytest.approx(update / w.norm().item(), rel=1e-4))
    assert sum(g[0] == 0 for g in curves["train/grad_norm"]) == 1
    whole = curves["train/grad_norm"][0][1]
    parts = [curves[f"layers/{name}/grad_norm"][0][1] for name, _ in initial.named_parameters()]
    assert math.hypot(*parts) == pytest.approx(whole, rel=1e-5)  # the layers' norms make up the whole


def test_the_noise_scale_is_given_its_unit_of_time(tmp_path):
    # Its EMA counts samples in units of the first global batch; without it, it divided by zero.
    config = to_config(make_config(*FIXED, "trainer.accumulate=2"))
    dataset = data.load(config.data)
    dist = distributed.init("cpu")
    try:
        model, optimizer, scaler = build(config, dataset, dist, 0.1)
        args = (model, optimizer, scaler, models.loss_fn(dataset.task), config.trainer, dist, config.diagnostics)
        with pytest.raises(TypeError, match="global_batch"):
            TrainStep(*args)
        step = TrainStep(*args, global_batch=32)
        result = step(dataset.x_train[:32], dataset.y_train[:32], 0.1, stop=False, observe=True)
    finally:
        distributed.shutdown()
    assert math.isfinite(result.diagnostics["gns/small_sq"]) and math.isfinite(result.diagnostics["gns/grad_sq"])
