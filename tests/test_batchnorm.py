"""BatchNorm on 2 processes: synchronized BatchNorm under bf16/fp16 autocast, the one rule for plain
BatchNorm's running statistics (the val curves describe the saved model, whichever engine), and a
skipped non-finite step that leaves the buffers as they were. Also validation with an empty shard
(fewer validation samples than ranks), for it shares the processes.

All 2-process runs share two processes started once (``spawn_runs``): a torchrun launch per run
would cost about 7 s, a start of the two processes about 3 s.
"""

from __future__ import annotations

import gc
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from conftest import final_params, free_port, make_config, read_scalars

from distsgd import checkpoint, data, distributed, models
from distsgd.config import to_config
from distsgd.train import run
from distsgd.validate import validate

WORLD_SIZE = 2


def spawn_runs(root: Path, runs: dict[str, list[str]], timeout: float = 300) -> None:
    """Train each of ``runs`` ({name: overrides}) on 2 processes, one run after the other, in
    root/name, as under torchrun. Besides what the trainer writes, each rank leaves its own final
    model state and returned metrics in rank{r}.pt. The first run that fails ends both processes
    and raises here with its traceback: a rank that went on could wait for the other in vain."""
    ports = [free_port() for _ in runs]
    context = mp.start_processes(rank_main, args=(root, runs, ports), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"the 2-process runs {list(runs)} did not end within {timeout} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def rank_main(rank: int, root: Path, runs: dict[str, list[str]], ports: list[int]) -> None:
    """One rank of ``spawn_runs``: what torchrun would set, then each run in turn."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1")
    built = []  # the model of each run, to save this rank's own final state
    build = models.build
    models.build = lambda *args, **kwargs: built.append(build(*args, **kwargs)) or built[-1]
    for (name, overrides), port in zip(runs.items(), ports):
        os.environ["MASTER_PORT"] = str(port)  # a fresh store for each run's process group
        gc.disable()  # so that what outlives the run is seen (distributed.shutdown collects)
        try:
            metrics = run(make_config(*overrides, "trainer.device=cpu", "trainer.collective_timeout_s=60"), root / name)
        except Exception as err:
            raise RuntimeError(f"run {name!r} failed on rank {rank}") from err
        ddp_alive = sum(type(o) is DistributedDataParallel for o in gc.get_objects())
        gc.enable()
        torch.save({"state": built[-1].state_dict(), "metrics": metrics, "ddp_alive": ddp_alive},
                   root / name / f"rank{rank}.pt")


def rank_results(run_dir: Path) -> list[dict]:
    """[{"state", "metrics"}] of each rank of a ``spawn_runs`` run."""
    return [torch.load(run_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def assert_states_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


def buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# ---------------------------------------------------------------- the runs

# A NaN pixel in one sample of a rank's batch at these steps (step: rank): rank 1 alone at step 2,
# so that only its statistics would be poisoned (the averaging rule would then carry the NaN into
# the checkpoint), then rank 0 alone at step 3.
NAN_AT = {2: 1, 3: 0}
PLAIN = ["data=npz", "model=resnet", "model.depth=20", "data.global_batch_size=32", "optim=momentum",
         "optim.lr=0.05", "trainer.max_steps=6", "trainer.val_every=2", "trainer.log_every=1",
         "trainer.checkpoint_every=1", "trainer.keep_checkpoints=100"]
SYNC = ["data=digits", "model=resnet", "model.depth=20", "model.sync_bn=true", "data.global_batch_size=32",
        "optim=momentum", "optim.lr=0.05", "trainer.max_steps=4", "trainer.val_every=1000"]
# 200 samples, val_fraction 0.005: one validation sample, so rank 1's shard of 2 is empty.
ONE_VAL_SAMPLE = ["data.num_samples=200", "data.val_fraction=0.005", "model=logistic", "data.global_batch_size=32",
                  "optim.lr=0.5", "trainer.max_steps=6", "trainer.val_every=2"]


def images_with_nans(path: Path) -> list[str]:
    """Overrides of a PLAIN run on 8x8 images in an npz file whose NaN pixels reach the batches NAN_AT names."""
    gen = np.random.default_rng(0)
    # Each image with a brightness of its own: the ranks' batch statistics then differ clearly, so
    # that validating without first averaging them would move val/loss by about 5e-3 (relative).
    # Random pixels: every row is distinct, and found by its value.
    x = (gen.standard_normal((640, 1, 8, 8)) + 3 * gen.standard_normal((640, 1, 1, 1))).astype(np.float32)
    y = (x.reshape(len(x), -1) @ gen.standard_normal((64, 4))).argmax(1)
    np.savez(path, x=x, y=y)
    overrides = PLAIN + [f"data.path={path}"]
    train = data.load(to_config(make_config(*overrides)).data).x_train  # shuffled by the split
    batch = 32 // WORLD_SIZE
    order = {rank: data.train_order(len(train), rank, WORLD_SIZE, 0, 0, torch.device("cpu")) for rank in (0, 1)}
    for step, rank in NAN_AT.items():
        row = np.flatnonzero((x == train[order[rank][step * batch]].numpy()).all((1, 2, 3)))
        x[int(row[0]), 0, 3, 3] = np.nan
    np.savez(path, x=x, y=y)
    train = data.load(to_config(make_config(*overrides)).data).x_train
    assert data.steps_per_epoch(len(train), 32) > 6  # the run stays in epoch 0
    for rank in (0, 1):
        seen = [k for k in range(6) if train[order[rank][k * batch:(k + 1) * batch]].isnan().any()]
        assert seen == [step for step, r in NAN_AT.items() if r == rank], (rank, seen)
    return overrides


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> list[str]:
    return images_with_nans(tmp_path_factory.mktemp("images") / "images.npz")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, plain) -> Path:
    root = tmp_path_factory.mktemp("batchnorm")
    spawn_runs(root, {"ddp": plain, "manual": plain + ["trainer.allreduce=manual", "trainer.bucket_mb=0.01"],
                      "fp32": SYNC, "bf16": SYNC + ["trainer.precision=bf16"],
                      "fp16": SYNC + ["trainer.precision=fp16"], "one_val_sample": ONE_VAL_SAMPLE})
    return root


# ---------------------------------------------------------------- synchronized BatchNorm under autocast

def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all floating-point entries of two model states, as one vector (per
    tensor, BatchNorm's biases, which start at 0, would make any difference look large)."""
    keys = [k for k in b if b[k].is_floating_point()]
    flat_a, flat_b = (torch.cat([s[k].double().flatten() for k in keys]) for s in (a, b))
    return float((flat_a - flat_b).norm() / flat_b.norm())


# The first loss (same model, same batch) differs from fp32 only by the rounding of the forward
# pass: measured 3e-4 for bf16 (8 bits of mantissa), 1.5e-5 for fp16 (11 bits).
@pytest.mark.parametrize("precision,first_loss_rtol", [("bf16", 2e-3), ("fp16", 2e-4)])
def test_sync_bn_under_autocast_keeps_float32_statistics_equal_on_every_rank(runs, precision, first_loss_rtol):
    results = rank_results(runs / precision)
    for rank, result in enumerate(results):
        stats = {k: v for k, v in result["state"].items() if k.endswith(("running_mean", "running_var"))}
        assert len(stats) == 2 * 19  # the stem's and two per block
        for name, value in stats.items():
            assert value.dtype == torch.float32 and value.isfinite().all(), (rank, name, value.dtype)
    # Global statistics: every rank holds the same running statistics, counts and parameters.
    assert_states_equal(results[1]["state"], results[0]["state"], f"{precision} rank 1 against rank 0")
    assert_states_equal(final_params(runs / precision), results[0]["state"], f"{precision} last.pt against rank 0")
    assert results[0]["metrics"]["train/skipped_steps"] == 0  # no non-finite loss or gradient
    first, reference = (read_scalars(runs / name)["train/loss"][0][1] for name in (precision, "fp32"))
    assert first != reference and first == pytest.approx(reference, rel=first_loss_rtol)


def test_sync_bn_in_bf16_trains_close_to_fp32(runs):
    # After 4 updates (lr 0.05, momentum, from initialization: the steepest part of training) the
    # bf16 model is 2.5e-2 away from the fp32 one, relatively; torch's own BatchNorm under bf16 on one
    # process, 2.1e-2. (fp16 is not compared: its GradScaler skips updates while it calibrates its scale.)
    distance = relative_distance(final_params(runs / "bf16"), final_params(runs / "fp32"))
    assert 1e-4 < distance < 5e-2


# ---------------------------------------------------------------- plain BatchNorm: one rule for the statistics

def validate_alone(run_dir: Path, overrides: list[str]) -> dict[str, float]:
    """The val metrics of run_dir's last.pt, loaded into a fresh model in this one process."""
    config = to_config(make_config(*overrides))
    dataset = data.load(config.data)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    model.load_state_dict(final_params(run_dir))
    distributed.init("cpu")
    try:
        return validate(model, dataset, torch.arange(len(dataset.x_val)), models.loss_fn(dataset.task), nullcontext())
    finally:
        distributed.shutdown()


def test_plain_batchnorm_val_curves_describe_the_saved_model_for_both_engines(runs, plain):
    alone = validate_alone(runs / "ddp", plain)
    for engine in ("ddp", "manual"):
        saved = final_params(runs / engine)
        for rank, result in enumerate(rank_results(runs / engine)):
            # Every rank holds the saved model, and its final val numbers are that model's.
            assert_states_equal(result["state"], saved, f"{engine} rank {rank} against last.pt")
            # 1e-6: the float32 loss sums of a 64-sample shard and of the 128-sample set round apart.
            assert result["metrics"]["val/loss"] == pytest.approx(alone["val/loss"], rel=1e-6), (engine, rank)
            assert result["metrics"]["val/accuracy"] == alone["val/accuracy"], (engine, rank)
            # DDP sits in reference cycles: left to the garbage collector, it (and its reducer,
            # holding the gloo group) could be freed at interpreter exit, where gloo aborted.
            assert result["ddp_alive"] == 0, (engine, rank)
    # Both engines: the same curves and the same final parameters and buffers.
    ddp, manual = read_scalars(runs / "ddp"), read_scalars(runs / "manual")
    for tag in ("val/loss", "val/accuracy", "train/loss"):
        assert [s for s, _ in ddp[tag]] == [s for s, _ in manual[tag]], tag
        assert [v for _, v in manual[tag]] == pytest.approx([v for _, v in ddp[tag]], rel=1e-6, nan_ok=True), tag
    assert [s for s, _ in ddp["val/loss"]] == [0, 2, 4, 6]
    assert_states_equal(final_params(runs / "manual"), final_params(runs / "ddp"), "manual against ddp")


# ---------------------------------------------------------------- a skipped step and the buffers

def test_a_skipped_step_leaves_the_batchnorm_buffers_as_they_were(runs):
    for engine in ("ddp", "manual"):
        run_dir = runs / engine
        skipped = [v for _, v in read_scalars(run_dir)["train/skipped_steps"]]
        assert skipped == [0, 0, 1, 2, 2, 2], engine  # the NaN batches of steps 2 and 3, and no other
        saved = {step: checkpoint.load(checkpoint.step_path(run_dir / "checkpoints", step))["model"]
                 for step in (2, 3, 4, 5)}
        # Checkpoint s holds the state after s steps: 3 and 4 after the skipped steps 2 and 3.
        for step in (3, 4):
            assert_states_equal(saved[step], saved[2], f"{engine} step {step} against step 2")
        # Step 4 trained again: every statistic moved (so the equalities above could fail).
        assert not any(torch.equal(saved[5][k], saved[4][k]) for k in buffers(saved[4]))
        states = [final_params(run_dir)] + [result["state"] for result in rank_results(run_dir)]
        for state in states:
            assert all(value.isfinite().all() for value in buffers(state).values()), engine
        assert math.isfinite(rank_results(run_dir)[0]["metrics"]["val/loss"])


# ---------------------------------------------------------------- validation with an empty shard

def test_fewer_validation_samples_than_ranks_gives_the_one_process_numbers(runs, tmp_path):
    dataset = data.load(to_config(make_config(*ONE_VAL_SAMPLE)).data)
    assert len(dataset.x_val) == 1 and not len(data.val_indices(1, 1, 2, torch.device("cpu")))
    alone = run(make_config(*ONE_VAL_SAMPLE, "trainer.device=cpu"), tmp_path)
    one, two = read_scalars(tmp_path), read_scalars(runs / "one_val_sample")
    for tag in ("val/loss", "val/accuracy"):
        assert [s for s, _ in two[tag]] == [s for s, _ in one[tag]] == [0, 2, 4, 6], tag
        assert [v for _, v in two[tag]] == pytest.approx([v for _, v in one[tag]], rel=1e-6, abs=0), tag
    # The loss moved between validations, so equal curves are not equal by construction.
    assert len({v for _, v in one["val/loss"]}) == 4
    for rank, result in enumerate(rank_results(runs / "one_val_sample")):  # rank 1, with no sample, too
        assert result["metrics"]["val/loss"] == pytest.approx(alone["val/loss"], rel=1e-6), rank
        assert result["metrics"]["val/accuracy"] == alone["val/accuracy"], rank
