"""Gradient communication (trainer.comm_hook) on 2 processes: what each hook does to the result,
exact resumes, and the refusals.

Two processes are spawned once and train every run in-process (``train.train``, as
test_combinations does); a run is then resumed from each of its steps K in a fresh directory
holding its checkpoints up to K, as a run killed right after saving step K leaves it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed
from conftest import make_config, on_two_gloo_ranks, read_scalars
from test_combinations import assert_same_values, train_in
from test_resume import assert_bitwise_equal, interrupted_after

from distsgd import comm, data, models
from distsgd.config import ConfigError, to_config
from distsgd.distributed import Dist
from distsgd.train import run

WORLD_SIZE = 2
STEPS = 6
# 320 samples of 32 features, a fifth for validation: 256 training samples, 8 global batches of 32
# per epoch. Momentum: each rank's own optimizer state matters under local SGD.
COMMON = ["data.num_samples=320", "data.dim=32", "data.global_batch_size=32", "optim=momentum", "optim.lr=0.05",
          "trainer.device=cpu", f"trainer.max_steps={STEPS}", "trainer.val_every=3", "trainer.log_every=1"]


def hourglass(*args, **kwargs) -> torch.nn.Module:
    """The model of every run: weight matrices 32x32, 16x32, 32x16, 32x32 and 4x32, so that torch's
    PowerSGD lays out its Qs grouped by shape, not in the order of the layers. tanh: no dead units,
    so every weight gradient has full rank (PowerSGD at full rank is then exact but for rounding)."""
    widths = (32, 32, 16, 32, 32)
    layers = [module for a, b in zip(widths, widths[1:]) for module in (torch.nn.Linear(a, b), torch.nn.Tanh())]
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, 4))
# name: (overrides, the steps K to resume from, torch's PowerSGD min_compression_rate)
RUNS: dict[str, tuple[list[str], tuple[int, ...], float]] = {
    "none": (["trainer.checkpoint_every=2"], (), comm.MIN_COMPRESSION_RATE),
    "fp16": (["trainer.comm_hook=fp16", "trainer.checkpoint_every=3"], (3,), comm.MIN_COMPRESSION_RATE),
    # H=1 after 2 synchronous steps: the step-2 checkpoint is none's, bitwise.
    "local_sgd_h1": (["trainer.comm_hook=local_sgd", "trainer.local_sgd_period=1", "trainer.local_sgd_warmup_steps=2",
                      "trainer.checkpoint_every=2"], (), comm.MIN_COMPRESSION_RATE),
    # Averaged after updates 1, 3 and 5: at step 3 the ranks' parameters and momenta differ.
    "local_sgd_h2": (["trainer.comm_hook=local_sgd", "trainer.local_sgd_period=2", "trainer.local_sgd_warmup_steps=1",
                      "trainer.checkpoint_every=3"], (3,), comm.MIN_COMPRESSION_RATE),
    # The same, validated and saved only at the end: validation and checkpoints see the average of
    # the ranks' parameters, yet training goes on from each rank's own, so the result is the same.
    "local_sgd_h2_quiet": (["trainer.comm_hook=local_sgd", "trainer.local_sgd_period=2",
                            "trainer.local_sgd_warmup_steps=1", "trainer.val_every=100"],
                           (), comm.MIN_COMPRESSION_RATE),
    # Plain SGD averaged after every step, its per-layer statistics on: they describe rank 0's own
    # step, its gradient and the optimizer's update to it, before the average.
    "local_sgd_layers": (["trainer.comm_hook=local_sgd", "trainer.local_sgd_period=1", "diagnostics.layers=true",
                          "optim.momentum=0.0"], (), comm.MIN_COMPRESSION_RATE),
    # Every matrix compressed (min_compression_rate 0) at the rank of its smaller side.
    "powersgd_full": (["trainer.comm_hook=powersgd", "trainer.powersgd_rank=32", "trainer.powersgd_warmup_steps=2"],
                      (), 0.0),
    # Compressed from step 2: the step-4 checkpoint holds two steps' error feedback and Qs; the
    # step-2 one none, and the resumed DDP's first buckets differ from those that drew the first Qs.
    "powersgd_r1": (["trainer.comm_hook=powersgd", "trainer.powersgd_rank=1", "trainer.powersgd_warmup_steps=2",
                     "trainer.checkpoint_every=2"], (2, 4), comm.MIN_COMPRESSION_RATE),
    # A NaN feature in one sample of rank 0's batch at step 3 (nan_data): that step is skipped on
    # both ranks, and the following steps must not inherit the NaN (PowerSGD's error feedback):
    # the step after it starts afresh, also when a resume starts there.
    "powersgd_nan": (["trainer.comm_hook=powersgd", "trainer.powersgd_rank=1", "trainer.powersgd_warmup_steps=2",
                      "data=npz", "data.path={nan_data}", "trainer.checkpoint_every=4"], (4,), comm.MIN_COMPRESSION_RATE),
    "local_sgd_nan": (["trainer.comm_hook=local_sgd", "trainer.local_sgd_period=2", "data=npz",
                       "data.path={nan_data}"], (), comm.MIN_COMPRESSION_RATE),
}
NAN_AT = 3
# The loss of a noisy least-squares problem, about 1.6e5 at first: above float16's largest value,
# 65504, while its gradients (norm ~300) are well within float16's range.
BIG_LOSS = ["data=synthetic_regression", "model=linear", "data.dim=8", "data.noise=400", "data.num_samples=1024",
            "optim.lr=1e-4", "trainer.max_steps=20", "trainer.device=cpu", "trainer.log_every=1"]
BIG_RUNS = {"big_none": [], "big_fp16": ["trainer.comm_hook=fp16"],
            "big_powersgd": ["trainer.comm_hook=powersgd", "trainer.powersgd_warmup_steps=2"]}


def train_every_run(dist: Dist, root: Path) -> dict:
    """One rank's part (conftest.on_two_gloo_ranks): every run, and its resumes."""
    results = {}
    for name, overrides in BIG_RUNS.items():
        config = to_config(make_config(*BIG_LOSS, *overrides))
        train_in(config, data.load(config.data).place(dist.device, True, 0), dist, root / name)
    models.build = hourglass
    built = []  # each run's Communication, to read torch's own PowerSGD statistics
    build = comm.build
    comm.build = lambda *args: built.append(build(*args)) or built[-1]
    datasets = {}
    for name, (overrides, resume_steps, min_rate) in RUNS.items():
        config = to_config(make_config(*COMMON, *(o.format(nan_data=root / "nan.npz") for o in overrides)))
        if config.data.name not in datasets:
            datasets[config.data.name] = data.load(config.data).place(dist.device, True, 0)
        dataset = datasets[config.data.name]
        comm.MIN_COMPRESSION_RATE = min_rate
        results[name] = {"uninterrupted": train_in(config, dataset, dist, root / name / "uninterrupted")}
        if name.startswith("powersgd"):
            results[name]["torch_compression"] = built[-1].state.compression_stats()[0]
        for k in resume_steps:
            if dist.is_main:
                interrupted_after(root / name / "uninterrupted", k, root / name / f"resumed_{k}")
            torch.distributed.barrier()
            results[name][f"resumed_{k}"] = train_in(config, dataset, dist, root / name / f"resumed_{k}")
    return results


def checkpoint(root: Path, name: str, file: str = "last.pt", run: str = "uninterrupted") -> dict:
    return torch.load(root / name / run / "checkpoints" / file, weights_only=True)


def relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def write_nan_data(path: Path) -> None:
    """Classification data with one NaN feature, in the sample that rank 0 draws first at step NAN_AT."""
    gen = np.random.default_rng(0)
    x = gen.normal(size=(320, 32)).astype(np.float32)
    y = (x @ gen.normal(size=(32, 4))).argmax(1)
    np.savez(path, x=x, y=y)
    train = data.load(to_config(make_config(*COMMON, "data=npz", f"data.path={path}")).data).x_train  # shuffled
    first = data.train_order(len(train), 0, WORLD_SIZE, 0, 0, torch.device("cpu"))[NAN_AT * 32 // WORLD_SIZE]
    x[np.flatnonzero((x == train[first].numpy()).all(1))[0], 0] = np.nan
    np.savez(path, x=x, y=y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """(root, what each run returned on rank 0); rank 1's in root/results1.json."""
    root = tmp_path_factory.mktemp("comm")
    write_nan_data(root / "nan.npz")
    return root, on_two_gloo_ranks(train_every_run, root)[0]


def test_hooks_change_the_result_as_much_as_their_maths_says(runs):
    root, results = runs
    none = checkpoint(root, "none")["model"]
    moved = relative_difference(checkpoint(root, "none", "step_00000002.pt")["model"], none)
    assert moved > 1e-2  # the model does move: the bounds below mean something
    # fp16: each averaged gradient rounded to 11 significant bits (relative error <= 2^-11 ~ 5e-4);
    # the loss travels apart, unrounded: at step 0, before any rounded update, it is none's exactly.
    assert 0 < relative_difference(checkpoint(root, "fp16")["model"], none) < 1e-3
    losses = {name: [v for _, v in read_scalars(root / name / "uninterrupted")["train/loss"]] for name in ("none", "fp16")}
    assert losses["fp16"][0] == losses["none"][0] and losses["fp16"] == pytest.approx(losses["none"], rel=1e-3)
    # Local SGD at H=1: its synchronous warm-up is DDP's all-reduce, bitwise; after it, SGD with
    # momentum is linear in the gradient, so averaging the parameters after each local step equals
    # averaging the gradients before it, but for rounding.
    assert_bitwise_equal(checkpoint(root, "local_sgd_h1", "step_00000002.pt")["model"],
                         checkpoint(root, "none", "step_00000002.pt")["model"], "local SGD's warm-up")
    assert relative_difference(checkpoint(root, "local_sgd_h1")["model"], none) < 1e-5
    # PowerSGD at full rank: P Q^T is the averaged gradient itself, up to Gram-Schmidt's rounding;
    # the error feedback of each rank (its gradient minus the mean) cancels in the mean.
    assert relative_difference(checkpoint(root, "powersgd_full")["model"], none) < 1e-4
    # At rank 1 it really compresses: the ratio torch counted is the one distsgd logs.
    params = list(hourglass().parameters())  # step.WithStepStats's floats travel apart, not in the buckets
    config = to_config(make_config(*COMMON, *RUNS["powersgd_r1"][0])).trainer
    ratio = sum(p.numel() * 4 for p in params) / (comm.bytes_per_step(config, params) - comm.STEP_STATS_BYTES)
    assert results["powersgd_r1"]["torch_compression"] == pytest.approx(ratio, rel=1e-12)
    assert ratio > 7
    assert relative_difference(checkpoint(root, "powersgd_r1")["model"], none) > 1e-3
    # Logged at every step here, the ratio for the model's gradients: 1 until compression starts
    # (warm-up of 2 steps); fp16 halves them; both send the loss, flag and norm apart; local SGD
    # after its 1 synchronous step sends those each step and the parameters every second one.
    def logged_ratio(name: str) -> list[float]:
        return [v for _, v in read_scalars(root / name / "uninterrupted")["comm/compression_ratio"]]
    full = sum(p.numel() * 4 for p in params)
    assert logged_ratio("powersgd_r1") == pytest.approx([1, 1] + [full / comm.bytes_per_step(config, params)] * 4)
    assert logged_ratio("fp16") == pytest.approx([full / (full / 2 + 12)] * STEPS)
    assert logged_ratio("local_sgd_h2") == pytest.approx([1] + [full / (full / 2 + 12)] * (STEPS - 1))
    assert "comm/compression_ratio" not in read_scalars(root / "none" / "uninterrupted")


def test_step_statistics_travel_unrounded_whatever_the_hook_does_to_gradients(runs):
    root, _ = runs
    curves = {name: read_scalars(root / name) for name in BIG_RUNS}
    losses = {name: [v for _, v in curve["train/loss"]] for name, curve in curves.items()}
    assert len(losses["big_none"]) == 20 and all(65504 < loss < 1e6 for loss in losses["big_none"])
    for name in ("big_fp16", "big_powersgd"):
        # Every step trained (fp16 turned the loss into inf and skipped them), at the exact loss.
        assert curves[name]["train/skipped_steps"][-1][1] == 0, name
        assert losses[name][0] == losses["big_none"][0], name
        assert losses[name] == pytest.approx(losses["big_none"], rel=1e-3), name


def test_local_sgd_per_layer_statistics_describe_the_optimizers_update(runs):
    root, _ = runs
    curves = read_scalars(root / "local_sgd_layers" / "uninterrupted")
    names = [tag[len("layers/"):-len("/update_ratio")] for tag in curves if tag.endswith("/update_ratio")]
    assert len(names) == 10
    for name in names:
        # Plain SGD's update is -lr g: |delta w| / |w| = lr |g| / |w| for rank 0's own gradient g,
        # where the average of the ranks' steps, lr |mean g|, is smaller.
        ratio, weight, grad = (curves[f"layers/{name}/{what}"] for what in ("update_ratio", "weight_norm", "grad_norm"))
        assert [r * w for (_, r), (_, w) in zip(ratio, weight)] == pytest.approx([0.05 * g for _, g in grad],
                                                                                 rel=1e-4), name


@pytest.mark.parametrize("name", ["powersgd_nan", "local_sgd_nan"])
def test_a_nonfinite_step_is_skipped_on_every_rank_and_leaves_no_trace(runs, name):
    root, results = runs
    final = results[name]["uninterrupted"]
    assert final["train/skipped_steps"] == 1 and np.isfinite(final["train/loss"]) and np.isfinite(final["val/loss"])
    # Rank 1 saw no NaN itself, yet reached the same verdicts and the same global numbers.
    rank1 = json.loads((root / "results1.json").read_text())[name]["uninterrupted"]
    assert {k: v for k, v in rank1.items() if k != "train/samples_per_sec"} == \
        {k: v for k, v in final.items() if k != "train/samples_per_sec"}
    saved = checkpoint(root, name)
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    if name == "powersgd_nan":
        assert all(torch.isfinite(t).all() for rank in saved["comm"] for t in rank["powersgd"]["error"].values())


@pytest.mark.parametrize(("name", "step"), [(name, k) for name, (_, steps, _) in RUNS.items() for k in steps])
def test_resume_is_exact(runs, name, step):
    root, results = runs
    resumed = f"resumed_{step}"
    assert_bitwise_equal(checkpoint(root, name, run=resumed), checkpoint(root, name), f"{name} from {step}: last.pt")
    timing = "train/samples_per_sec"
    assert_same_values({k: v for k, v in results[name][resumed].items() if k != timing},
                       {k: v for k, v in results[name]["uninterrupted"].items() if k != timing}, name)


def test_checkpoints_hold_what_differs_between_the_ranks(runs):
    root, _ = runs
    saved = checkpoint(root, "local_sgd_h2", "step_00000003.pt")
    own = [rank["params"] for rank in saved["comm"]]
    # Mid-period the ranks differ, and "model" is their average (the model validation saw).
    assert not torch.equal(own[0][0], own[1][0])
    torch.testing.assert_close(list(saved["model"].values()), [(a + b) / 2 for a, b in zip(*own)])
    momenta = [rank["optimizer"]["state"][0]["momentum_buffer"] for rank in saved["comm"]]
    assert not torch.equal(*momenta)
    powersgd = [rank["powersgd"] for rank in checkpoint(root, "powersgd_r1", "step_00000004.pt")["comm"]]
    # One error per parameter of the model (10); the step statistics travel apart.
    assert powersgd[0]["error"].keys() == powersgd[1]["error"].keys() and len(powersgd[0]["error"]) == 10
    assert not torch.equal(powersgd[0]["error"][0], powersgd[1]["error"][0])  # each rank's own error
    assert "comm" not in checkpoint(root, "none") and "comm" not in checkpoint(root, "fp16")


def test_local_sgd_trains_the_same_whenever_it_validates_and_saves(runs):
    root, results = runs
    assert_bitwise_equal(checkpoint(root, "local_sgd_h2_quiet")["model"], checkpoint(root, "local_sgd_h2")["model"])
    val_loss = [results[name]["uninterrupted"]["val/loss"] for name in ("local_sgd_h2_quiet", "local_sgd_h2")]
    assert val_loss[0] == val_loss[1]


@pytest.mark.parametrize("overrides, message", [
    (["trainer.allreduce=manual", "trainer.comm_hook=fp16"],
     "trainer.comm_hook must be none with trainer.allreduce=manual (communication hooks are DDP's), got 'fp16'"),
    (["trainer.comm_hook=powersgd", "trainer.powersgd_warmup_steps=1"], "trainer.powersgd_warmup_steps must be >= 2"),
    (["trainer.local_sgd_period=8"], "trainer.local_sgd_period must be left at 4 with trainer.comm_hook=none, which "
                                     "ignores it (it is for trainer.comm_hook=local_sgd)"),
])
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        to_config(make_config(*overrides))


def test_noise_scale_refuses_a_comm_hook(tmp_path):
    with pytest.raises(ConfigError) as refused:
        run(make_config("diagnostics.noise_scale=true", "trainer.accumulate=2", "trainer.comm_hook=powersgd",
                        "trainer.max_steps=1"), tmp_path)
    assert str(refused.value) == ("diagnostics.noise_scale=true measures the gradient noise scale with DDP's plain "
                                  "all-reduce; it cannot be combined with trainer.comm_hook=powersgd "
                                  "(set one of them off)")


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None,
                    reason="DDP accepts bf16_compress_hook in CUDA builds, on gloo too")
def test_bf16_is_refused_where_ddp_refuses_it(tmp_path):
    with pytest.raises(ConfigError) as refused:
        run(make_config("trainer.comm_hook=bf16", "trainer.max_steps=1", "trainer.device=cpu"), tmp_path)
    assert str(refused.value).startswith("trainer.comm_hook=bf16 is refused by DDP with backend gloo in this torch "
                                         "build (BF16 all reduce communication hook required CUDA 11+")
    assert str(refused.value).endswith("use trainer.comm_hook=fp16")


def test_the_fields_of_torchs_hook_states_that_distsgd_reads_are_there():
    # Undocumented: when torch renames one, this names it (and so does the hook's construction).
    states = {comm.powerSGD_hook.PowerSGDState: comm.powerSGD_hook.PowerSGDState(process_group=None),
              comm.post_localSGD_hook.PostLocalSGDState: comm.post_localSGD_hook.PostLocalSGDState(
                  process_group=None, subgroup=None, start_localSGD_iter=1)}
    for cls, names in comm.TORCH_STATE_FIELDS.items():
        state = states[cls]
        comm.check_torch_fields(state)
        assert isinstance(state.iter, int)
    powersgd = states[comm.powerSGD_hook.PowerSGDState]
    assert all(isinstance(getattr(powersgd, name), dict) for name in ("error_dict", "p_memory_dict", "q_memory_dict"))
    kind, keys, *rest = powersgd.rng.get_state()  # what rank_state saves of the generator of random Qs
    assert kind == "MT19937" and keys.shape == (624,) and len(rest) == 3
    del powersgd.error_dict  # as a torch without the field would be
    with pytest.raises(RuntimeError, match="torch .*'s PowerSGDState has no error_dict, which distsgd reads"):
        comm.check_torch_fields(powersgd)
