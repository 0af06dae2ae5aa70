"""Batch-size schedules (data.batch_milestones, data.batch_growth): the step -> epoch -> batch map,
the batch and the rate of a growing run, its resume inside a phase, and 1 vs 2 processes."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from conftest import assert_params_close, final_params, launch, make_config, read_scalars
from test_resume import EVERY_STEP, assert_bitwise_equal, interrupted_after, last_state

from distsgd import data, optim, train
from distsgd.config import ConfigError, to_config
from distsgd.step import TrainStep
from distsgd.train import Plan, run

# 512 samples, 20% for validation: 410 training samples. The global batch is 32 in epoch 0
# (12 steps), 64 in epoch 1 (6 steps), 128 from epoch 2 on (3 steps): 24 steps in 4 epochs, and
# every epoch trains on 384 samples. The rate warms up over 2 epochs, across the first growth,
# is scaled linearly to each phase's batch, and decays 10x at epochs 1 and 3.
CONSTANT = ["data.num_samples=512", "data.global_batch_size=32", "model.width=16", "optim=momentum",
            "optim.lr=0.05", "optim.scaling=linear", "optim.reference_batch_size=32", "schedule=multistep",
            "schedule.milestones=[1,3]", "schedule.unit=epochs", "schedule.warmup_steps=2", "trainer.max_epochs=4",
            "trainer.log_every=1", "trainer.val_every=10"]
GROWING = CONSTANT + ["data.batch_milestones=[1,2]", "data.batch_growth=2"]
BATCHES = [32] * 12 + [64] * 6 + [128] * 6
SAMPLES_PER_EPOCH = 384


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, trained): root/growing (a checkpoint every step) and root/constant (the same config,
    batch 32 throughout); trained: the number of samples each step of root/growing trained on."""
    root, trained = tmp_path_factory.mktemp("batch_schedule"), []

    class Recording(TrainStep):
        def __call__(self, x, y, lr, stop, **observe):
            trained.append(len(x))
            return super().__call__(x, y, lr, stop, **observe)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "TrainStep", Recording)
        run(make_config(*GROWING, *EVERY_STEP), root / "growing")
    run(make_config(*CONSTANT), root / "constant")
    return root, trained


def test_steps_map_to_epochs_and_batches_as_enumerated():
    batches = data.BatchSchedule(num_train=100, global_batch=10, growth=2, milestones=(2, 3))
    # Epochs 0-1: batch 10, 10 steps each; epoch 2: batch 20, 5 steps; from epoch 3: batch 40, 2 steps.
    steps = [(epoch, index, batches.batch(epoch)) for epoch in range(6) for index in range(batches.steps_in(epoch))]
    assert [b for _, _, b in steps] == [10] * 20 + [20] * 5 + [40] * 6
    for t, (epoch, index, _) in enumerate(steps):
        assert batches.locate(t) == (epoch, index) and batches.step_phase(t) == batches.phase(epoch)
        assert batches.epochs_at(t) == epoch + Fraction(index, batches.steps_in(epoch))
        assert batches.samples_before(t) == sum(b for _, _, b in steps[:t])
    assert [batches.first_step(e) for e in range(7)] == [0, 10, 20, 25, 27, 29, 31]
    assert batches.epochs_at(31) == 6


def test_the_batch_grows_at_the_milestone_epochs_and_samples_count_every_update(runs):
    root, trained = runs
    assert trained == BATCHES
    curves = read_scalars(root / "growing")
    assert curves["train/global_batch_size"] == [(t, b) for t, b in enumerate(BATCHES)]
    # train/samples at step t: the samples of updates 0..t.
    assert curves["train/samples"] == [(t, sum(BATCHES[:t + 1])) for t in range(len(BATCHES))]
    assert last_state(root / "growing")["step"] == 24  # trainer.max_epochs=4 sums the epochs' steps
    assert [v for _, v in read_scalars(root / "constant")["train/global_batch_size"]] == [32] * 48


def test_epoch_schedules_are_the_same_function_of_samples_with_and_without_growth(runs):
    growing, constant = (read_scalars(runs[0] / name) for name in ("growing", "constant"))
    constant_lr = {samples: lr for (_, samples), (_, lr) in zip(constant["train/samples"], constant["train/lr"])}
    for (t, samples), (_, lr), (_, batch) in zip(growing["train/samples"], growing["train/lr"],
                                                  growing["train/global_batch_size"]):
        # Updates that end at the same point of the data use the same rate, up to the linear
        # scaling of each phase's base rate to its batch.
        assert lr == pytest.approx(constant_lr[samples] * batch / 32, rel=1e-12), f"step {t}"
    lr = dict(growing["train/lr"])
    # Epoch 1, step 0 of 6: 7/12 of the 2 warmup epochs done after it, the first decay, batch 64.
    assert lr[12] == pytest.approx(0.05 * 2 * 0.1 * 7 / 12)
    # The second decay at epoch 3: its first step is 21 with growth (12 + 6 + 3), 36 without.
    assert (lr[20], lr[21]) == pytest.approx((0.05 * 4 * 0.1, 0.05 * 4 * 0.01))
    assert (dict(constant["train/lr"])[35], dict(constant["train/lr"])[36]) == pytest.approx((0.005, 0.0005))


def test_resume_inside_a_phase_is_bitwise_exact(runs, tmp_path):
    growing = runs[0] / "growing"
    expected = last_state(growing)
    # Step 14 is step 2 of 6 of epoch 1 (inside the warmup), step 19 is step 1 of 3 of epoch 2.
    for step in (14, 19):
        run_dir = interrupted_after(growing, step, tmp_path / f"after_{step}")
        run(make_config(*GROWING), run_dir)
        resumed = last_state(run_dir)
        assert_bitwise_equal(resumed["model"], expected["model"], f"model after resuming at {step}")
        assert_bitwise_equal(resumed["optimizer"]["state"], expected["optimizer"]["state"],
                             f"optimizer state after resuming at {step}")
        # Each step after the resume trained on the very batch of the uninterrupted run.
        losses = read_scalars(growing)["train/loss"]
        assert read_scalars(run_dir)["train/loss"] == [(s, v) for s, v in losses if s >= step]


def test_two_processes_train_the_same_model_as_one(runs, tmp_path):
    # Micro-batches too: 2 ranks x 2 micro-batches each of 8, 16 and 32 samples.
    done = launch(tmp_path, *GROWING, "trainer.accumulate=2", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_params_close(final_params(tmp_path), final_params(runs[0] / "growing"), rtol=1e-5)
    one, two = read_scalars(runs[0] / "growing"), read_scalars(tmp_path)
    for tag in ("train/global_batch_size", "train/samples"):
        assert two[tag] == one[tag], tag
    assert [v for _, v in two["train/loss"]] == pytest.approx([v for _, v in one["train/loss"]], rel=1e-5)
    start = ("world size 2; from epoch 0: 16 samples per rank and step, in 2 micro-batch(es) of 8; global batch 32; "
             "12 steps per epoch; from epoch 1: 32 samples per rank and step, in 2 micro-batch(es) of 16; global batch "
             "64; 6 steps per epoch; from epoch 2: 64 samples per rank and step, in 2 micro-batch(es) of 32; global "
             "batch 128; 3 steps per epoch; 24 steps = 4 epochs; lr 0.05 at batch 32, linear scaling -> 0.05, 0.1, 0.2")
    assert start in done.stdout + done.stderr


@pytest.mark.parametrize("override,message", [
    ("data.batch_milestones=[2,1]", "data.batch_milestones must be strictly increasing positive integers (epochs), "
                                    "got [2, 1]"),
    ("data.batch_milestones=[0,3]", "data.batch_milestones must be strictly increasing"),
    ("data.batch_milestones=[3,3]", "data.batch_milestones must be strictly increasing"),
    ("data.batch_growth=0", "data.batch_growth must be an integer >= 1, got 0"),
])
def test_bad_milestones_and_growth_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_config(make_config(override))


def test_a_fractional_growth_fails_when_the_config_is_composed():
    with pytest.raises(Exception) as failure:
        make_config("data.batch_growth=1.5")
    assert "could not be converted to Integer" in f"{failure.value} {failure.value.__cause__}"


def test_a_phase_too_large_or_indivisible_is_named_before_training():
    too_large = to_config(make_config("data.global_batch_size=32", "data.batch_milestones=[1,2,3]",
                                      "data.batch_growth=4"))
    with pytest.raises(ConfigError, match=re.escape(
            "data.batch_milestones=[1, 2, 3] with data.batch_growth=4: the global batch 512 from epoch 2 exceeds "
            "the 410 training samples")):
        Plan.of(too_large, 410, world_size=1)
    # Only the phases a run enters: 3 epochs never reach the batch of 512 from epoch 5, nor do 12
    # steps (2 epochs of 6 batches of 64); 300 steps or 6 epochs would.
    never = ["data.global_batch_size=64", "data.batch_milestones=[5]", "data.batch_growth=8"]
    for limit, steps in (("trainer.max_epochs=3", 18), ("trainer.max_steps=12", 12)):
        assert Plan.of(to_config(make_config(*never, limit)), 410, world_size=1).total_steps == steps
    for limit in ("trainer.max_epochs=6", "trainer.max_steps=300", "trainer.max_epochs=6 trainer.max_steps=300"):
        with pytest.raises(ConfigError, match="the global batch 512 from epoch 5 exceeds the 410 training samples"):
            Plan.of(to_config(make_config(*never, *limit.split())), 410, world_size=1)
    # The first batch divides or none does: each later one is the first times an integer.
    indivisible = to_config(make_config("data.global_batch_size=30", "data.batch_milestones=[1]",
                                        "trainer.accumulate=4"))
    with pytest.raises(ConfigError, match=re.escape(
            "data.global_batch_size=30 is not divisible by the world size 2 x trainer.accumulate=4")):
        Plan.of(indivisible, 410, world_size=2)


def test_an_epoch_warmup_longer_than_a_growing_run_is_an_error():
    config = to_config(make_config(*GROWING, "schedule.warmup_steps=5"))
    plan = Plan.of(config, 410, world_size=1)
    with pytest.raises(ConfigError, match=re.escape(
            "schedule.warmup_steps=5 (epochs) is longer than the run's 24 steps (4 epochs)")):
        optim.build_schedule(config.schedule, [0.1] * 3, plan.total_steps, plan.batches)
