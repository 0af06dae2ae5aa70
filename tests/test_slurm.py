"""SLURM without a cluster: ranks and rendezvous from srun's variables, the run directory from the
job id, stop signals and requeueing, the sbatch scripts, and sweeps through Hydra's submitit launcher."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_params_close, final_params, make_config, subprocess_env
from omegaconf import OmegaConf
from test_faults import LONG, TOTAL

from distsgd import checkpoint, config, stopping
from distsgd.config import ConfigError, to_config
from distsgd.distributed import Launch, expand_nodelist, launch_environment
from distsgd.train import run

# ---------------------------------------------------------------- the environment


@pytest.mark.parametrize("nodelist,hosts", [
    ("localhost", ["localhost"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("gpu-[001-002],cpu7", ["gpu-001", "gpu-002", "cpu7"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("rack[1-2]-gpu[1,3]", ["rack1-gpu1", "rack1-gpu3", "rack2-gpu1", "rack2-gpu3"]),
])
def test_nodelists_expand_as_scontrol_show_hostnames_does(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[01-04", "node01]", "node[]", "node[3-1]", "node[a-b]", "a,,b",
                                      "node[1-[2]]"])
def test_a_nodelist_that_cannot_be_read_is_an_error(nodelist):
    with pytest.raises(ValueError, match="host list|range"):
        expand_nodelist(nodelist)


SRUN_TASK = dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1",
                 SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-10]")
TORCHRUN_WORKER = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500",
                       TORCHELASTIC_RUN_ID="4242")


@pytest.mark.parametrize("env,launch", [
    (SRUN_TASK, Launch(5, 8, 1, "gpu07", 15000 + 4242, srun=True)),
    # srun starts task 0 on the first node of its step, a part of the job's nodes.
    ({**SRUN_TASK, "SLURM_STEP_NODELIST": "gpu[09-10]"}, Launch(5, 8, 1, "gpu09", 19242, srun=True)),
    ({**SRUN_TASK, "SLURM_JOB_ID": "123456"}, Launch(5, 8, 1, "gpu07", 15000 + 123456 % 20000, srun=True)),
    # Two steps of one job at once (srun ... & srun ...) meet at ports of their own.
    ({**SRUN_TASK, "SLURM_STEP_ID": "1"}, Launch(5, 8, 1, "gpu07", 15000 + 4242 + 1009, srun=True)),
    ({**SRUN_TASK, "SLURM_STEP_ID": "25"}, Launch(5, 8, 1, "gpu07", 15000 + (4242 + 25 * 1009) % 20000, srun=True)),
    ({**SRUN_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}, Launch(5, 8, 1, "head", 1234, srun=True)),
    ({**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"},
     Launch(0, 1, 0, None, None, srun=True)),
    # The batch script itself: SLURM_PROCID and the job's SLURM_NTASKS, but no step, one process.
    ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}, Launch(0, 1, 0, None, None)),
    # torchrun inside a SLURM job: torchrun's variables win.
    ({**SRUN_TASK, **TORCHRUN_WORKER}, Launch(3, 4, 3, "10.0.0.1", 29500)),
    ({}, Launch(0, 1, 0, None, None)),
])
def test_the_launch_comes_from_torchrun_else_srun_else_one_process(env, launch):
    assert launch_environment(env) == launch


def test_a_nodelist_that_cannot_be_read_asks_for_master_addr():
    with pytest.raises(ConfigError, match=re.escape("cannot find the first node of this SLURM job "
                                                    "(SLURM_JOB_NODELIST: cannot read the host list 'gpu[07-')")
                       + ".*set MASTER_ADDR"):
        launch_environment({**SRUN_TASK, "SLURM_JOB_NODELIST": "gpu[07-"})


@pytest.fixture
def clean_slurm_env(monkeypatch):
    for var in os.environ:
        if var.startswith("SLURM_"):
            monkeypatch.delenv(var)
    config.run_id.cache_clear()  # one id per process: each case here is a new process
    yield monkeypatch
    config.run_id.cache_clear()


@pytest.mark.parametrize("env,run_id", [
    (dict(SLURM_JOB_ID="4242"), "4242"),
    (dict(SLURM_JOB_ID="4250", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID="8"), "4242_8"),
    (dict(SLURM_JOB_ID="4242", TORCHELASTIC_RUN_ID="rdzv-1"), "rdzv-1"),
    (dict(SLURM_JOB_ID="4242", TORCHELASTIC_RUN_ID="none"), "4242"),  # torchrun's "none": no id given
])
def test_the_run_directory_is_named_by_torchrun_else_by_the_slurm_job(env, run_id, clean_slurm_env):
    for var, value in env.items():
        clean_slurm_env.setenv(var, value)
    assert OmegaConf.create({"dir": "outputs/${distsgd_run_id:}"}).dir == f"outputs/{run_id}"


@pytest.mark.parametrize("env,rank", [
    ({}, 0),
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1"), 1),
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", RANK="0"), 0),  # torchrun's
    (dict(RANK="2", WORLD_SIZE="4"), 2),
])
def test_the_log_file_and_who_writes_hydra_files_follow_the_launchers_rank(env, rank, clean_slurm_env):
    for var, value in env.items():
        clean_slurm_env.setenv(var, value)
    # As conf/config.yaml names them.
    paths = OmegaConf.create({"log": "rank${distsgd_rank:}.log", "hydra": "${distsgd_output_subdir:}"})
    assert (paths.log, paths.hydra) == (f"rank{rank}.log", ".hydra" if rank == 0 else None)


def test_stop_signals_are_names_of_signals_that_can_be_caught():
    assert to_config(make_config()).trainer.stop_signals == ["SIGTERM", "SIGUSR2"]
    assert to_config(make_config("trainer.stop_signals=[SIGINT]")).trainer.stop_signals == ["SIGINT"]
    message = ("trainer.stop_signals must be a list of signal names such as SIGTERM or SIGUSR2 (SIGKILL and SIGSTOP "
               "cannot be caught)")
    for names in ("[SIGFOO]", "[SIGTERM,SIGKILL]", "[USR2]"):
        with pytest.raises(ConfigError, match=re.escape(message)):
            to_config(make_config(f"trainer.stop_signals={names}"))


def fake_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An scontrol that appends its arguments to scontrol.log (and fails with ``exit_code``)."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/scontrol.log"\n'
                      f'[ {exit_code} = 0 ] || echo "scontrol: error: Requested operation is presently disabled" >&2\n'
                      f"exit {exit_code}\n")
    script.chmod(0o755)
    return folder


def test_a_requeue_that_cannot_be_done_is_a_warning(tmp_path, clean_slurm_env, caplog):
    caplog.set_level(logging.WARNING, logger="distsgd")
    assert stopping.requeue_job() is None  # not in a SLURM job
    clean_slurm_env.setenv("SLURM_JOB_ID", "4242")
    clean_slurm_env.setenv("PATH", str(tmp_path / "empty"))
    assert stopping.requeue_job() is None  # no scontrol
    clean_slurm_env.setenv("PATH", str(fake_scontrol(tmp_path / "failing", exit_code=1)))
    assert stopping.requeue_job() is None
    clean_slurm_env.setenv("PATH", str(fake_scontrol(tmp_path / "working")))
    assert stopping.requeue_job() == "4242"
    assert (tmp_path / "working/scontrol.log").read_text() == "requeue 4242\n"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3 and all(w.startswith("trainer.requeue=true but ") for w in warnings), warnings
    assert "SLURM_JOB_ID is not set (not a SLURM job)" in warnings[0]
    assert "scontrol could not run" in warnings[1] and "job 4242 was not requeued" in warnings[1]
    assert ("`scontrol requeue 4242` failed (exit 1: scontrol: error: Requested operation is presently disabled)"
            in warnings[2])


# ---------------------------------------------------------------- two tasks of one job step


def free_port_from_job_id() -> int:
    """A job id whose derived port (15000 + id % 20000) is free now."""
    for port in range(15000 + os.getpid() % 19000, 35000):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("", port))
            return 100000 + port - 15000
    raise AssertionError("no free port in 15000..35000")


class SrunStep:
    """Two distsgd processes started as srun starts its tasks: SLURM's variables only, no torchrun's."""

    def __init__(self, cwd: Path, job_id: int, path: Path, *overrides: str):
        base = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
        base |= dict(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PATH=f"{path}:{base['PATH']}",
                     SLURM_JOB_ID=str(job_id), SLURM_ARRAY_JOB_ID="9000", SLURM_ARRAY_TASK_ID="3", SLURM_STEP_ID="0",
                     SLURM_NTASKS="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost")
        self.procs, self.logs = [], []
        for rank in (0, 1):
            self.logs.append(cwd / f"task{rank}.{time.monotonic_ns()}.out")
            with open(self.logs[-1], "w") as out:
                env = base | dict(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
                self.procs.append(subprocess.Popen([sys.executable, "-m", "distsgd.train", *overrides], cwd=cwd,
                                                   env=env, stdout=out, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 120) -> list[int]:
        return [proc.wait(timeout) for proc in self.procs]

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def __enter__(self) -> "SrunStep":
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_srun_tasks_train_as_two_ranks_stop_on_sigusr2_requeue_and_resume_exactly(tmp_path, caplog):
    job_id, fake = free_port_from_job_id(), fake_scontrol(tmp_path / "bin")
    run_dir = tmp_path / "outputs" / "9000_3"  # <array job id>_<task id>, under the folder it was started in
    with SrunStep(tmp_path, job_id, fake, *LONG, "trainer.requeue=true") as step:
        sidecar = run_dir / "checkpoints" / "step_00000020.pt.sha256"
        deadline = time.monotonic() + 90
        while not sidecar.exists():
            assert all(p.poll() is None for p in step.procs), step.output(0)[-3000:] + step.output(1)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 20 within 90 s"
            time.sleep(0.005)
        # To one task only: the other learns of it through the gradient all-reduce, and rank 0,
        # which got no signal, still names it, saves, and asks for the requeue.
        step.procs[1].send_signal(signal.SIGUSR2)
        assert step.wait() == [128 + signal.SIGUSR2] * 2, step.output(0)[-3000:]
    stops = re.findall(r"distsgd: stopped by SIGUSR2 after step (\d+); saved (\S+); requeued SLURM job (\d+), "
                       r"which resumes from it", step.output(0))
    assert len(stops) == 1 and "distsgd: stopped" not in step.output(1), step.output(0)[-3000:]
    stopped_at, saved = int(stops[0][0]), Path(stops[0][1])
    assert (saved, int(stops[0][2])) == (run_dir / "checkpoints" / f"step_{stopped_at:08d}.pt", job_id)
    assert (fake / "scontrol.log").read_text() == f"requeue {job_id}\n"  # rank 0 alone
    # Both tasks in one directory, each under its own rank, trained as one group of two.
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "rank0.log", "rank1.log",
                                                         "tensorboard"]
    state = checkpoint.load(saved)
    assert 20 < stopped_at < TOTAL and (state["step"], state["world_size"]) == (stopped_at, 2)

    # The requeued job finds the checkpoint in its directory (here on one process, to save a launch:
    # a resume is exact on any number of processes) and ends as an uninterrupted run does.
    caplog.set_level(logging.INFO, logger="distsgd")
    run(make_config(*LONG), run_dir)
    assert f"resumed from {saved} at step {stopped_at}" in caplog.text
    run(make_config(*LONG), tmp_path / "one")
    assert_params_close(final_params(run_dir), final_params(tmp_path / "one"), rtol=1e-5)


# ---------------------------------------------------------------- the sbatch scripts


SLURM_SCRIPTS = REPO / "scripts" / "slurm"


def _run_sbatch(script: str, tmp_path: Path) -> tuple[list[str], str]:
    """Run a batch script as SLURM would, with srun and scontrol faked: (srun's arguments, and
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE as srun saw it)."""
    fakes = tmp_path / "fakes"
    fakes.mkdir(exist_ok=True)
    (fakes / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKES/srun.args"\n'
                                'echo "${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}" > "$FAKES/srun.env"\n')
    (fakes / "scontrol").write_text('#!/bin/sh\n'
                                    '[ "$1 $2 $3" = "show hostnames gpu[3-4]" ] && printf "gpu3\\ngpu4\\n"\n')
    for fake in ("srun", "scontrol"):
        (fakes / fake).chmod(0o755)
    env = {**subprocess_env(), "PATH": f"{fakes}:{os.environ['PATH']}", "FAKES": str(fakes), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "gpu[3-4]", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "8"}
    done = subprocess.run(["bash", str(SLURM_SCRIPTS / script), "optim.lr=0.3"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return (fakes / "srun.args").read_text().splitlines(), (fakes / "srun.env").read_text().strip()


@pytest.mark.parametrize("script", ["train.sbatch", "train-per-task.sbatch"])
def test_the_batch_scripts_parse_and_ask_for_the_signal_requeue_and_appended_log(script):
    subprocess.run(["bash", "-n", str(SLURM_SCRIPTS / script)], check=True)
    directives = re.findall(r"^#SBATCH (\S+)", (SLURM_SCRIPTS / script).read_text(), re.M)
    assert {"--signal=USR2@120", "--requeue", "--open-mode=append"} <= set(directives)


def test_train_sbatch_runs_one_torchrun_per_node_that_this_torch_accepts(tmp_path):
    from torch.distributed.run import get_args_parser

    srun, share_store = _run_sbatch("train.sbatch", tmp_path)
    assert srun[:2] == ["--kill-on-bad-exit=1", "torchrun"] and share_store == "1"
    args = get_args_parser().parse_args(srun[2:])  # argparse exits on a flag this torchrun lacks
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == (
        "2", "gpu", "c10d", "gpu3:15077", "77")
    assert (args.max_restarts, args.signals_to_handle, args.shutdown_timeout) == (3, "SIGTERM,SIGINT,SIGUSR2", 100)
    assert args.module and args.training_script == "distsgd.train"
    assert args.training_script_args == ["trainer.requeue=true", "trainer.checkpoint_every=500", "optim.lr=0.3"]
    assert to_config(make_config(*args.training_script_args)).trainer.requeue


def test_train_per_task_sbatch_runs_distsgd_as_srun_tasks(tmp_path):
    srun, _ = _run_sbatch("train-per-task.sbatch", tmp_path)
    assert srun == ["--kill-on-bad-exit=1", "python", "-m", "distsgd.train", "trainer.requeue=true",
                    "trainer.checkpoint_every=500", "optim.lr=0.3"]
    assert to_config(make_config(*srun[4:])).trainer.requeue


# ---------------------------------------------------------------- sweeps through submitit


def test_a_sweep_through_submitit_runs_each_point_as_a_job_in_one_sweep_directory(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cmd = [sys.executable, "-m", "distsgd.train", "-m", "hydra/launcher=submitit_local", "optim.lr=0.05,0.2",
           "data.num_samples=256", "data.global_batch_size=32", "model.width=8", "trainer.max_steps=4",
           "trainer.val_every=1000"]
    env = {**subprocess_env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    # Each job resolves the sweep directory in its own process, seconds later: still the parent's.
    (sweep,) = (tmp_path / "multirun").iterdir()
    states = [torch.load(path, weights_only=True) for path in sorted(sweep.glob("*/checkpoints/last.pt"))]
    assert [state["step"] for state in states] == [4, 4]
    assert sorted(re.search(r"\n  lr: (\S+)", state["config"])[1] for state in states) == ["0.05", "0.2"]
    assert (sweep / ".submitit").is_dir()


def test_the_slurm_launcher_config_gives_each_gpu_a_task():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.signal_delay_s, launcher.additional_parameters.requeue) == (4, 120, True)
