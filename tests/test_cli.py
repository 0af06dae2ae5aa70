"""The command line a user types: the console script and Hydra multirun sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, REPO, read_scalars, subprocess_env
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distsgd.config import ConfigError, job_folder


def test_console_script_runs_a_multirun_sweep(tmp_path):
    script = Path(sys.executable).with_name("distsgd-train")
    done = subprocess.run(
        [str(script), "-m", "optim.lr=0.05,0.5", f"hydra.sweep.dir={tmp_path}", "trainer.max_steps=6",
         "trainer.log_every=5", "data.num_samples=256"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    # Each job's folder is named by its overrides; trainer.log_every cannot change a result.
    for job, lr in (("data.num_samples=256,optim.lr=0.05,trainer.max_steps=6", 0.05),
                    ("data.num_samples=256,optim.lr=0.5,trainer.max_steps=6", 0.5)):
        run_dir = tmp_path / job
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        assert read_scalars(run_dir)["train/lr"][0][1] == pytest.approx(lr, rel=1e-7)  # stored as float32
        events = next((run_dir / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
        assert b"_hparams_/session_start_info" in events and b"optim.lr" in events


@pytest.mark.parametrize("baseline,overrides", [("minimal", []), ("off", ["diagnostics.layers=true"])])
def test_bench_runs_both_loops_in_turns_and_checks_they_compute_the_same(baseline, overrides, tmp_path):
    # Not a timing test: the benchmark's figures are only read by people; this keeps it working.
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", "--steps", "30", "--rounds", "2", "--baseline", baseline,
         "data.num_samples=2048", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    # Instruments observe: the run with them ends where the one without does.
    assert f"final parameters after 30 steps, {baseline} vs distsgd: identical" in done.stdout
    # Turns of 30 steps start at steps 0, 10 and 20; a turn is timed up to the start of the next
    # one, so 2 per run are, and the first is dropped: 1 pair in each of 2 rounds.
    assert "median of 2 paired turns' ratios (95% interval" in done.stdout, done.stdout


def test_a_sweep_under_torchrun_runs_every_job_on_every_rank_in_its_own_directory(tmp_path):
    # Every job joins a process group of its own in the same two processes; when each group did not
    # have keys of its own in torchrun's store, a later job met an earlier one's and hung. The first
    # job diverges: a result, after which the sweep goes on.
    lrs = (3000, 0.01, 0.05)
    common = ["data=synthetic_regression", "data.num_samples=256", "model=linear", "trainer.max_steps=8"]
    # timeout(1) ends a hung sweep with SIGTERM, on which torchrun stops its workers; the kill of
    # subprocess.run's own timeout would leave them behind, hung.
    done = subprocess.run(
        ["timeout", "120", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "distsgd.train", "-m", "optim.lr=" + ",".join(map(str, lrs)), f"hydra.sweep.dir={tmp_path}", *common,
         "trainer.nonfinite=stop", "trainer.device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    folders = [tmp_path / f"data.num_samples=256,data=synthetic_regression,model=linear,optim.lr={lr},"
                          "trainer.max_steps=8,trainer.nonfinite=stop" for lr in lrs]
    assert f"1 diverged (stopped on non-finite values, objective inf): {folders[0].name}. " in done.stdout
    marker = json.loads((folders[0] / "diverged.json").read_text())
    assert torch.load(marker["checkpoint"], weights_only=True)["world_size"] == 2
    for job, (lr, run_dir) in enumerate(zip(lrs, folders)):
        if job:
            state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
            assert (state["step"], state["world_size"]) == (8, 2)
        assert read_scalars(run_dir)["train/lr"][0][1] == pytest.approx(lr, rel=1e-7)  # stored as float32
        for rank in (0, 1):
            assert str(run_dir) in (run_dir / f"rank{rank}.log").read_text(), f"rank {rank} did not log job {job}"


def job_folder_of(sweep_dir: Path, job_num: int, *overrides: str) -> str:
    """The folder Hydra gives job ``job_num`` of a sweep into ``sweep_dir`` with these overrides."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"hydra.sweep.dir={sweep_dir}", f"hydra.job.num={job_num}"],
                      return_hydra_config=True)
    return OmegaConf.select(cfg, "hydra.sweep.subdir")


def test_a_job_folder_is_named_by_the_overrides_that_can_change_its_result(tmp_path):
    # Where the run executes, how it logs and what it watches are left out; a path's "/" would
    # nest the folder, so it is escaped.
    assert job_folder_of(tmp_path, 0, "data=npz", "data.path=/x/y.npz", "optim.lr=0.5", "trainer.device=cpu",
                         "trainer.log_every=5", "trainer.checkpoint_every=10", "diagnostics.layers=true",
                         "data.num_workers=0") == "data.path=%2Fx%2Fy.npz,data=npz,optim.lr=0.5"
    # With nothing else to tell the jobs apart, their numbers do.
    assert job_folder_of(tmp_path / "neutral", 3, "trainer.device=cpu") == "3"
    # A sweep over such a key keeps it in the name: its jobs would share a folder otherwise (as
    # Hydra records the command line in multirun.yaml before the first job).
    sweep = tmp_path / "swept"
    sweep.mkdir()
    OmegaConf.save({"hydra": {"overrides": {"task": ["trainer.device=cpu,cuda", "optim.lr=0.5"]}}},
                   sweep / "multirun.yaml")
    assert job_folder_of(sweep, 1, "trainer.device=cuda", "optim.lr=0.5", "trainer.log_every=5") == \
        "optim.lr=0.5,trainer.device=cuda"


def test_two_jobs_never_share_a_folder(tmp_path):
    # What a sweeper that varies a left-out key off the command line would do.
    assert job_folder(str(tmp_path), "optim.lr=0.5", 0) == "optim.lr=0.5"
    assert job_folder(str(tmp_path), "optim.lr=0.5", 0) == "optim.lr=0.5"  # Hydra asks more than once
    with pytest.raises(ConfigError, match=r"jobs 0 and 1 would share the folder optim.lr=0.5: .*hydra.job.num"):
        job_folder(str(tmp_path), "optim.lr=0.5", 1)
