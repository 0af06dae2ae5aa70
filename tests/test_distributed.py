"""Real torchrun runs on 2 processes: one run directory, world-size invariance, both engines (the
GPT's on 2 spawned gloo ranks, on a dataset that no data config describes yet)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (assert_params_close, final_params, launch, make_config, on_two_gloo_ranks, read_scalars,
                      token_windows, train_alone)

from distsgd.config import to_config
from distsgd.train import run, train

BASE = ["data.num_samples=1024", "data.global_batch_size=64", "trainer.max_steps=40", "trainer.log_every=5",
        "trainer.val_every=20"]
MOMENTUM = BASE + ["optim=momentum", "optim.lr=0.05"]
ADAM_WARMUP_COSINE = BASE + ["optim=adam", "schedule=cosine", "schedule.warmup_steps=8"]


@pytest.fixture(scope="module")
def momentum_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("momentum")
    run(make_config(*MOMENTUM), root / "one")
    done = launch(root / "two", *MOMENTUM, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "two.console").write_text(done.stdout + done.stderr)
    return root


def test_torchrun_writes_one_run_directory(momentum_runs):
    run_dir = momentum_runs / "two"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "rank0.log", "rank1.log", "tensorboard"]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    losses = [v for _, v in read_scalars(run_dir)["train/loss"]]
    assert losses[-1] < 0.7 * losses[0]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 40 and not any(k.startswith("module.") for k in state["model"])


def test_train_loss_is_the_global_batch_mean(momentum_runs):
    one, two = (read_scalars(momentum_runs / n)["train/loss"] for n in ("one", "two"))
    assert [s for s, _ in one] == [s for s, _ in two]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
    val_one, val_two = (read_scalars(momentum_runs / n)["val/accuracy"] for n in ("one", "two"))
    assert val_one == val_two  # the same samples counted once each, whatever the sharding


def test_world_size_invariance_sgd_momentum(momentum_runs):
    assert_params_close(final_params(momentum_runs / "two"), final_params(momentum_runs / "one"), rtol=1e-5)


def test_world_size_invariance_adam_warmup_cosine(tmp_path):
    run(make_config(*ADAM_WARMUP_COSINE), tmp_path / "one")
    done = launch(tmp_path / "two", *ADAM_WARMUP_COSINE, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_params_close(final_params(tmp_path / "two"), final_params(tmp_path / "one"), rtol=1e-5)


# AdamW with decay on the matrices only (two parameter groups), warmup and cosine, clipping and two
# micro-batches: 12 steps over 4 epochs of the 48 training windows of conftest.token_windows.
GPT = ["model=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "optim=adamw", "optim.lr=0.01",
       "optim.weight_decay=0.1", "schedule=cosine", "schedule.warmup_steps=3", "data.global_batch_size=16",
       "trainer.accumulate=2", "trainer.clip_grad_norm=1.0", "trainer.max_steps=12", "trainer.log_every=1",
       "trainer.val_every=6", "trainer.device=cpu"]


def train_gpt(dist, root, overrides):
    train(to_config(make_config(*overrides)), token_windows(), dist, root / "two")


def test_world_size_invariance_gpt(tmp_path):
    train_alone(to_config(make_config(*GPT)), token_windows(), tmp_path / "one")
    on_two_gloo_ranks(train_gpt, tmp_path, GPT)
    assert_params_close(final_params(tmp_path / "two"), final_params(tmp_path / "one"), rtol=1e-5)
    one, two = (read_scalars(tmp_path / n) for n in ("one", "two"))
    assert [v for _, v in two["train/loss"]] == pytest.approx([v for _, v in one["train/loss"]], rel=1e-5)
    assert one["val/accuracy"] == two["val/accuracy"]  # every validation token counted once, whatever the sharding
    assert one["train/loss"][-1][1] < 0.8 * one["train/loss"][0][1]


def test_manual_allreduce_matches_ddp(momentum_runs, tmp_path):
    done = launch(tmp_path, *MOMENTUM, "trainer.allreduce=manual", "trainer.bucket_mb=0.01", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_params_close(final_params(tmp_path), final_params(momentum_runs / "two"), rtol=1e-6)


def test_indivisible_global_batch_under_torchrun(tmp_path):
    done = launch(tmp_path, "data.global_batch_size=33", nproc=2)
    assert done.returncode != 0
    assert "data.global_batch_size=33 is not divisible by the world size 2" in done.stderr
    assert not list(tmp_path.glob("checkpoints/*.pt"))


def test_a_run_says_what_it_will_do_and_what_it_did(momentum_runs):
    run_dir = momentum_runs / "two"
    console = (momentum_runs / "two.console").read_text()
    # 1024 samples, 20% for validation: 819 training samples, 12 global batches of 64 per epoch.
    plan = (f"world size 2; 32 samples per rank and step, in 1 micro-batch(es) of 32; global batch 64; "
            f"12 steps per epoch; 40 steps = 3.333 epochs; lr 0.05; constant schedule; run directory {run_dir}")
    assert console.count(plan) == 1, console[-3000:]  # rank 0 alone talks on the console
    assert plan in (run_dir / "rank1.log").read_text()
    done = re.search(r"done: 40 steps in [\d.]+ s; (.*); saved (\S+)", console)
    assert done and done[2] == str(run_dir / "checkpoints" / "last.pt"), console[-3000:]
    final = dict(item.rsplit(" ", 1) for item in done[1].split(", "))
    curves = read_scalars(run_dir)
    for tag in ("train/loss", "val/loss", "val/accuracy"):
        assert float(final[tag]) == pytest.approx(curves[tag][-1][1], rel=1e-3), tag

