"""Checkpointing during training and exact resume, in one process.

A run interrupted after step k is simulated honestly: the run directory is left as a run killed
right after saving step k would leave it (its checkpoints up to step k, no last.pt), and the same
command runs again there. On CPU the result must be bitwise the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import final_params, make_config, read_scalars

from distsgd import checkpoint, data
from distsgd.config import ConfigError, to_config
from distsgd.train import run

# 512 samples, 20% for validation: 410 training samples, 12 global batches of 32 per epoch.
SMALL = ["data.num_samples=512", "data.global_batch_size=32", "model.width=16", "trainer.max_steps=30",
         "trainer.log_every=1", "trainer.val_every=10"]
MOMENTUM = SMALL + ["optim=momentum", "optim.lr=0.05"]
ADAM_WARMUP = SMALL + ["optim=adam", "optim.lr=0.01", "schedule=cosine", "schedule.warmup_steps=8"]
EVERY_STEP = ["trainer.checkpoint_every=1", "trainer.keep_checkpoints=100"]
# Mid-epoch in epoch 0 (inside the warmup), an epoch boundary, mid-epoch 1, the last step but one.
INTERRUPTED_AT = (5, 12, 17, 29)


@pytest.fixture(scope="module", params=["sgd_momentum", "adam_warmup_cosine"])
def reference(request, tmp_path_factory):
    """(overrides, root): root/uninterrupted without checkpoints, root/saved with one every step."""
    overrides = {"sgd_momentum": MOMENTUM, "adam_warmup_cosine": ADAM_WARMUP}[request.param]
    root = tmp_path_factory.mktemp(request.param)
    run(make_config(*overrides), root / "uninterrupted")
    run(make_config(*overrides, *EVERY_STEP), root / "saved")
    return overrides, root


def interrupted_after(saved: Path, step: int, run_dir: Path) -> Path:
    """run_dir as a run killed right after saving step ``step`` leaves it."""
    (run_dir / "checkpoints").mkdir(parents=True)
    for path in (saved / "checkpoints").iterdir():
        match = re.fullmatch(r"step_(\d+)\.pt(\.sha256)?", path.name)
        if match and int(match[1]) <= step:
            shutil.copy2(path, run_dir / "checkpoints" / path.name)
    return run_dir


def last_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_bitwise_equal(a, b, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def resumed_steps(caplog) -> list[int]:
    return [int(m[1]) for r in caplog.records if (m := re.search(r"resumed from .* at step (\d+)", r.getMessage()))]


def test_the_interrupted_steps_are_where_they_claim():
    dataset = data.load(to_config(make_config(*SMALL)).data)
    per_epoch = data.steps_per_epoch(len(dataset.x_train), 32)
    assert per_epoch == 12
    assert [k % per_epoch for k in INTERRUPTED_AT] == [5, 0, 5, 5]


def test_resume_after_any_step_is_bitwise_exact(reference, tmp_path, caplog):
    overrides, root = reference
    expected = last_state(root / "uninterrupted")
    # Saving is a side effect only: the checkpointed run ends exactly where the plain one does.
    assert_bitwise_equal(last_state(root / "saved")["model"], expected["model"])
    caplog.set_level(logging.INFO, logger="distsgd")
    for step in INTERRUPTED_AT:
        run_dir = interrupted_after(root / "saved", step, tmp_path / f"after_{step}")
        caplog.clear()
        run(make_config(*overrides, *EVERY_STEP), run_dir)  # trainer.resume=auto is the default
        assert resumed_steps(caplog) == [step]
        # The steps this launch ran, not the plan's 30.
        assert any(record.getMessage().startswith(f"done: {30 - step} steps (steps {step} to 30, resumed) in ")
                   for record in caplog.records)
        resumed = last_state(run_dir)
        assert resumed["step"] == 30
        assert_bitwise_equal(resumed["model"], expected["model"], f"model after resuming at {step}")
        assert_bitwise_equal(resumed["optimizer"]["state"], expected["optimizer"]["state"],
                             f"optimizer state after resuming at {step}")


def test_a_mid_epoch_resume_trains_on_exactly_the_batches_not_yet_consumed(reference, tmp_path):
    overrides, root = reference
    run_dir = interrupted_after(root / "saved", 17, tmp_path)
    run(make_config(*overrides), run_dir)
    # train/loss at step t is the loss of the global batch of update t: after the resume, every
    # step sees the very batch (and parameters) the uninterrupted run saw, the first one included.
    expected = read_scalars(root / "uninterrupted")["train/loss"]
    assert read_scalars(run_dir)["train/loss"] == [(s, v) for s, v in expected if s >= 17]


def test_resume_from_a_path_and_resume_never(reference, tmp_path, caplog):
    overrides, root = reference
    expected = final_params(root / "uninterrupted")
    caplog.set_level(logging.INFO, logger="distsgd")
    source = root / "saved" / "checkpoints" / "step_00000017.pt"
    before = hashes(source.parent)

    run(make_config(*overrides, f"trainer.resume={source}"), tmp_path / "from_path")
    assert resumed_steps(caplog) == [17]
    assert_bitwise_equal(final_params(tmp_path / "from_path"), expected)
    assert hashes(source.parent) == before  # the other run's checkpoints are only read

    caplog.clear()
    run_dir = interrupted_after(root / "saved", 17, tmp_path / "never")
    run(make_config(*overrides, "trainer.resume=never"), run_dir)
    assert resumed_steps(caplog) == []
    # From scratch: all 30 steps again, the same run as the uninterrupted one.
    assert_bitwise_equal(final_params(run_dir), expected)


def test_checkpoint_every_and_keep_checkpoints(tmp_path):
    run(make_config(*SMALL, "trainer.checkpoint_every=4", "trainer.keep_checkpoints=2"), tmp_path / "kept")
    assert sorted(p.name for p in (tmp_path / "kept/checkpoints").iterdir()) == [
        "last.pt", "last.pt.sha256", "step_00000024.pt", "step_00000024.pt.sha256",
        "step_00000028.pt", "step_00000028.pt.sha256"]
    for name, step in (("step_00000024.pt", 24), ("step_00000028.pt", 28), ("last.pt", 30)):
        assert torch.load(tmp_path / "kept/checkpoints" / name, weights_only=True)["step"] == step
    # checkpoint_every=0 (the default): the final checkpoint only, always written.
    run(make_config(*SMALL, "trainer.max_steps=3"), tmp_path / "end_only")
    assert sorted(p.name for p in (tmp_path / "end_only/checkpoints").iterdir()) == ["last.pt", "last.pt.sha256"]


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, caplog):
    overrides, root = reference
    run_dir = interrupted_after(root / "saved", 17, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000017.pt"
    content = bytearray(newest.read_bytes())
    content[len(content) // 2] ^= 0xFF
    newest.write_bytes(bytes(content))
    caplog.set_level(logging.INFO, logger="distsgd")

    run(make_config(*overrides), run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in w and "checksum mismatch" in w for w in warnings), warnings
    assert resumed_steps(caplog) == [16]
    assert_bitwise_equal(final_params(run_dir), final_params(root / "uninterrupted"))


def test_no_valid_checkpoint_is_a_clear_error_and_touches_nothing(reference, tmp_path):
    overrides, root = reference
    run_dir = interrupted_after(root / "saved", 3, tmp_path)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:-100])  # truncated, as by a full disk
    before = hashes(run_dir / "checkpoints")
    with pytest.raises(ConfigError, match=f"no valid checkpoint in {re.escape(str(run_dir / 'checkpoints'))}"):
        run(make_config(*overrides), run_dir)
    assert hashes(run_dir / "checkpoints") == before
    assert not (run_dir / "tensorboard").exists()


def test_a_different_trajectory_is_an_error_naming_the_keys(tmp_path, caplog):
    saved = tmp_path / "saved"
    run(make_config(*MOMENTUM, "trainer.max_steps=10", "trainer.checkpoint_every=5"), saved)
    run_dir = interrupted_after(saved, 5, tmp_path / "changed")
    before = hashes(run_dir / "checkpoints")
    changed = ["optim.lr=0.02", "model.width=32", "data.global_batch_size=64", "trainer.seed=1",
               "schedule=cosine", "schedule.warmup_steps=2"]
    with pytest.raises(ConfigError) as error:
        run(make_config(*MOMENTUM, "trainer.max_steps=10", *changed), run_dir)
    message = str(error.value)
    for key in ("optim.lr (0.05 -> 0.02)", "model.width (16 -> 32)", "data.global_batch_size (32 -> 64)",
                "trainer.seed (0 -> 1)", "schedule.name (constant -> cosine)", "schedule.warmup_steps (0 -> 2)",
                "trainer.resume_override=true"):
        assert key in message
    assert "trainer.max_steps" not in message and "trainer.log_every" not in message
    # A different length changes the schedule, even where no schedule key changed.
    with pytest.raises(ConfigError, match=r"schedule total steps \(10 -> 20\)"):
        run(make_config(*MOMENTUM, "trainer.max_steps=20"), run_dir)
    assert hashes(run_dir / "checkpoints") == before

    # With the override, the run continues from the checkpoint under the new values.
    caplog.set_level(logging.INFO, logger="distsgd")
    run(make_config(*MOMENTUM, "trainer.max_steps=10", "optim.lr=0.02", "optim.momentum=0.5",
                    "trainer.resume_override=true"), run_dir)
    assert resumed_steps(caplog) == [5]
    state = last_state(run_dir)
    assert state["step"] == 10
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.5  # not the checkpoint's 0.9
    assert not torch.equal(state["model"]["1.weight"], final_params(saved)["1.weight"])


def test_a_checkpoint_from_before_a_key_existed_resumes_with_its_default(tmp_path, caplog):
    saved = tmp_path / "saved"
    run(make_config(*MOMENTUM, "trainer.max_steps=10", "trainer.checkpoint_every=5"), saved)
    run_dir = interrupted_after(saved, 5, tmp_path / "old")
    path = run_dir / "checkpoints" / "step_00000005.pt"
    state = checkpoint.load(path)
    old_config = yaml.safe_load(state["config"])
    del old_config["data"]["batch_milestones"], old_config["data"]["batch_growth"], old_config["diagnostics"]
    checkpoint.save({**state, "config": yaml.safe_dump(old_config)}, path)
    caplog.set_level(logging.INFO, logger="distsgd")
    run(make_config(*MOMENTUM, "trainer.max_steps=10"), run_dir)
    assert resumed_steps(caplog) == [5]
    assert_bitwise_equal(final_params(run_dir), final_params(saved))


def test_the_override_may_change_the_optimizer_but_not_the_model(tmp_path, caplog):
    saved = tmp_path / "saved"
    run(make_config(*MOMENTUM, "trainer.max_steps=10", "trainer.checkpoint_every=5"), saved)
    # An SGD momentum buffer is no Adam state: Adam starts afresh from the saved parameters.
    caplog.set_level(logging.INFO, logger="distsgd")
    run_dir = interrupted_after(saved, 5, tmp_path / "adam")
    run(make_config(*SMALL, "trainer.max_steps=10", "optim=adam", "trainer.resume_override=true"), run_dir)
    assert resumed_steps(caplog) == [5]
    assert any("optim.name changed from sgd to adam" in r.getMessage() for r in caplog.records)
    assert last_state(run_dir)["step"] == 10
    # One parameter group (decay on all) into two (decay on the matrices): their state starts afresh too.
    run_dir = interrupted_after(saved, 5, tmp_path / "groups")
    run(make_config(*MOMENTUM, "trainer.max_steps=10", "optim.weight_decay_on=matrices",
                    "trainer.resume_override=true"), run_dir)
    assert any("optim.weight_decay_on changed from all to matrices: the optimizer state starts afresh"
               in r.getMessage() for r in caplog.records)
    assert len(last_state(run_dir)["optimizer"]["param_groups"]) == 2
    # Parameters of another shape cannot be resumed at all: one clear error, nothing touched.
    run_dir = interrupted_after(saved, 5, tmp_path / "wider")
    before = hashes(run_dir / "checkpoints")
    with pytest.raises(ConfigError, match=r"does not fit this run's model or optimizer \(size mismatch for 1.weight"):
        run(make_config(*MOMENTUM, "trainer.max_steps=10", "model.width=32", "trainer.resume_override=true"), run_dir)
    assert hashes(run_dir / "checkpoints") == before
