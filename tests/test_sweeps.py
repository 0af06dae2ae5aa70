"""Sweeps: a diverged job is a result and the sweep goes on; a sampling sweeper under torchrun
trains one config on every rank; ranks given different configs never train."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, JobReturns, read_scalars, run_command, subprocess_env, torchrun_report
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from distsgd.step import TrainStep
from distsgd.train import main


def hparams_status(run_dir) -> str:
    """How the run's HParams entry says it ended."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    return Status.Name(HParamsPluginData.FromString(content).session_end_info.status)


DIVERGING = ["data=synthetic_regression", "model=linear", "optim=sgd", "trainer.max_steps=40",
             "data.num_samples=512", "trainer.val_every=20"]


def test_a_diverged_job_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    JobReturns.values = []
    code = run_command(main, ["distsgd-train", "-m", *DIVERGING, "optim.lr=3000,0.05", f"hydra.sweep.dir={tmp_path}",
                              "hydra.sweep.subdir=${hydra.job.num}", "+hydra.callbacks.returns._target_=conftest.JobReturns"],
                       monkeypatch)
    output = capsys.readouterr()
    assert code is None, output.err[-3000:]
    marker = json.loads((tmp_path / "0" / "diverged.json").read_text())
    assert marker["message"].startswith("non-finite loss inf at step") and marker["step"] > 0
    assert torch.load(marker["checkpoint"], weights_only=True)["step"] == marker["step"]
    assert [hparams_status(tmp_path / job) for job in ("0", "1")] == ["STATUS_FAILURE", "STATUS_SUCCESS"]
    assert (tmp_path / "1" / "checkpoints" / "last.pt").is_file() and not (tmp_path / "1" / "diverged.json").exists()
    # The sweeper's objective: inf for the diverged job, ranked last by a sweeper that minimises.
    assert JobReturns.values[0] == math.inf and math.isfinite(JobReturns.values[1])
    assert JobReturns.values[1] == pytest.approx(read_scalars(tmp_path / "1")["val/loss"][-1][1], rel=1e-6)
    assert f"distsgd: sweep done, 2 job(s) in {tmp_path}; 1 diverged (stopped on non-finite values, objective " \
           f"inf): 0. Report: distsgd-report {tmp_path}" in output.out
    # A single run that diverges keeps its exit code.
    single = tmp_path / "single"
    assert run_command(main, ["distsgd-train", *DIVERGING, "optim.lr=3000", f"hydra.run.dir={single}"], monkeypatch) == 3
    assert (single / "diverged.json").is_file()
    # Started again (here at a rate that trains), the folder no longer holds a diverged result.
    assert run_command(main, ["distsgd-train", *DIVERGING, "optim.lr=0.05", f"hydra.run.dir={single}",
                              "trainer.resume=never"], monkeypatch) is None
    assert not (single / "diverged.json").exists()


def test_an_optuna_sweep_under_torchrun_trains_one_config_on_both_ranks(tmp_path):
    # The command: without a seed shared by the ranks, each rank's sampler drew its own rates.
    done = subprocess.run(
        ["timeout", "150", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "distsgd.train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
         "optim.lr=tag(log,interval(0.001,1.0))", "trainer.max_steps=8", "trainer.device=cpu", "data.num_samples=256",
         "model.width=8", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\t#1 : optim.lr=") == 1, done.stdout  # Hydra's own lines, from rank 0 alone
    folders = sorted(path.parent for path in tmp_path.glob("*/.hydra"))
    assert len(folders) == 2
    finals = {}
    for folder in folders:
        lr = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["optim"]["lr"]
        assert torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["world_size"] == 2
        for rank in (0, 1):  # both ranks trained this folder's config, at this folder's rate
            assert f"lr {lr:g}; constant schedule; run directory {folder}" in (folder / f"rank{rank}.log").read_text()
        finals[lr] = read_scalars(folder)["val/loss"][-1][1]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    best = min(finals, key=finals.get)
    assert results["best_params"]["optim.lr"] == best and results["best_value"] == pytest.approx(finals[best])


def test_ranks_given_different_configs_stop_with_one_line_naming_the_keys(tmp_path):
    # What an unseeded sampler or a per-process interpolation gives: here each rank its own seed.
    done = subprocess.run(
        ["timeout", "120", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "distsgd.train", "trainer.seed='${oc.decode:${oc.env:RANK}}'", "trainer.max_steps=2",
         "trainer.device=cpu", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=150, env=subprocess_env())
    workers, report = torchrun_report(done.stderr)
    message = "distsgd: error: the ranks were given different configs: trainer.seed (0 on rank 0, 1 on rank 1)."
    assert done.returncode != 0 and workers.count(message) == 1, done.stderr[-3000:]
    assert workers.count("Traceback") == 1  # torchrun's own, of its ChildFailedError
    assert not (tmp_path / "checkpoints" / "last.pt").exists() and not (tmp_path / "tensorboard").exists()


def test_the_commands_a_stopped_sweep_job_prints_run_as_printed_and_resume_it(tmp_path, monkeypatch, capsys):
    # A sweep job's folder is named by its overrides, optim.lr=0.05,trainer.max_steps=12: the
    # printed command must quote it for Hydra's grammar as well as for the shell.
    calls = itertools.count()
    step = TrainStep.__call__

    def stopped_at_step_3(self, *args, **kwargs):
        if next(calls) == 2:  # received during update 2: the step after it stops, as a scheduler's SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", stopped_at_step_3)
    code = run_command(main, ["distsgd-train", "-m", "optim.lr=0.05", "trainer.max_steps=12", "data.num_samples=256",
                              "model.width=8", f"hydra.sweep.dir={tmp_path}"], monkeypatch)
    assert code == 128 + signal.SIGTERM
    job = tmp_path / "data.num_samples=256,model.width=8,optim.lr=0.05,trainer.max_steps=12"
    output = capsys.readouterr()
    [board] = re.findall(r"curves: (tensorboard .*)", output.err + output.out) or [None]
    assert board is None  # a stopped run prints no curves line; a finished one does, below
    [resume] = re.findall(r"to resume, run: (python -m distsgd\.train .*)$", output.err, re.M)
    assert resume.startswith("python -m distsgd.train ")
    env = {**subprocess_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", resume], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {job}/checkpoints/step_00000004.pt at step 4" in done.stdout
    assert torch.load(job / "checkpoints" / "last.pt", weights_only=True)["step"] == 12
    [board] = re.findall(r"curves: (tensorboard .*)$", done.stdout, re.M)
    assert shlex.split(board) == ["tensorboard", "--logdir", str(job / "tensorboard"), "--host", "127.0.0.1"]
