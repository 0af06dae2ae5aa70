"""Faults under torchrun (killed and terminated workers, elastic restarts), resuming on another
number of processes, the non-finite guard across ranks, and a corpus of bad invocations."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (REPO, assert_params_close, final_params, launch, make_config, read_scalars, run_command,
                      subprocess_env, torchrun_report)
from test_checkpoint import truncate

from distsgd import checkpoint, data, models
from distsgd.config import to_config
from distsgd.stopping import Stopped
from distsgd.train import main, run

# 1024 samples, 20% for validation: 819 training samples, 25 global batches of 32 per epoch.
# Long enough (a few seconds of steps) that a signal sent once step 20 is saved lands mid-run.
LONG = ["data.num_samples=1024", "data.global_batch_size=32", "model.width=16", "optim=momentum", "optim.lr=0.05",
        "trainer.max_steps=300", "trainer.checkpoint_every=20", "trainer.val_every=100", "trainer.log_every=50"]
TOTAL = 300


# ---------------------------------------------------------------- processes


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


class Torchrun:
    """A torchrun job in the background, its output in a file (a pipe nobody reads could fill up
    and stall the workers), and the worker processes it started."""

    def __init__(self, run_dir: Path, *overrides: str, max_restarts: int = 0, nproc: int = 2):
        self.run_dir, self.nproc = run_dir, nproc
        self.log = run_dir.parent / f"{run_dir.name}.torchrun.out"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "-m", "distsgd.train", f"hydra.run.dir={run_dir}", *overrides]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
        self.run_id: str | None = None
        self.seen: set[int] = set()  # every worker pid of every attempt

    def workers(self, exclude: frozenset[int] = frozenset(), timeout: float = 60) -> dict[int, int]:
        """{rank: pid} of the agent's current workers (other than ``exclude``), once all exist."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {}
            for pid in _pids():
                if pid in exclude:
                    continue
                try:
                    if _parent(pid) != self.proc.pid or not alive(pid):
                        continue
                    env = _environ(pid)
                except (OSError, ValueError, IndexError):
                    continue
                if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
                    found[int(env["RANK"])] = pid
                    self.run_id = env["TORCHELASTIC_RUN_ID"]
                    self.seen.add(pid)
            if len(found) == self.nproc:
                return found
            assert self.proc.poll() is None, f"torchrun ended early:\n{self.output()[-3000:]}"
            time.sleep(0.01)
        raise AssertionError(f"no {self.nproc} workers within {timeout} s:\n{self.output()[-3000:]}")

    def wait_for_checkpoint(self, step: int, timeout: float = 90) -> None:
        # The sidecar is renamed into place last: once it exists, the checkpoint is complete.
        sidecar = self.run_dir / "checkpoints" / f"step_{step:08d}.pt.sha256"
        deadline = time.monotonic() + timeout
        while not sidecar.exists():
            assert self.proc.poll() is None, f"torchrun ended before step {step}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint of step {step} within {timeout} s"
            time.sleep(0.005)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def job_processes(self) -> list[int]:
        """The workers seen so far that still live (checked by run id: a pid can be reused)."""
        found = []
        for pid in sorted(self.seen):
            with contextlib.suppress(OSError):
                if alive(pid) and _environ(pid).get("TORCHELASTIC_RUN_ID") == self.run_id:
                    found.append(pid)
        return found

    def __enter__(self) -> "Torchrun":
        return self

    def __exit__(self, *exc) -> None:
        # Whatever happened in the test, leave no process of this job behind.
        if self.proc.poll() is None:
            self.proc.terminate()  # the agent forwards it to its workers
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def resumed_at(run_dir: Path, rank: int) -> list[tuple[str, int]]:
    """(checkpoint file name, step) of every resume that rank logged in the run directory."""
    text = (run_dir / f"rank{rank}.log").read_text()
    return [(Path(m[1]).name, int(m[2])) for m in re.finditer(r"resumed from (\S+) at step (\d+)", text)]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def root_cause(output: str) -> str:
    section = output.split("Root Cause (first observed failure):", 1)
    assert len(section) == 2, output[-3000:]
    return section[1].split("=====", 1)[0]


# ---------------------------------------------------------------- the uninterrupted 2-process run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = launch(run_dir, *LONG, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_periodic_checkpoints_keep_the_newest_three_and_the_last(reference):
    names = sorted(p.name for p in (reference / "checkpoints").glob("*.pt"))
    assert names == ["last.pt", "step_00000240.pt", "step_00000260.pt", "step_00000280.pt"]
    assert all(checkpoint.verify(reference / "checkpoints" / name) is None for name in names)
    assert torch.load(reference / "checkpoints/last.pt", weights_only=True)["world_size"] == 2


def test_a_two_process_checkpoint_resumes_on_one_process(reference, tmp_path):
    dataset = data.load(to_config(make_config(*LONG)).data)
    assert data.steps_per_epoch(len(dataset.x_train), 32) == 25  # so step 240 is mid-epoch (15 of 25)
    saved = reference / "checkpoints" / "step_00000240.pt"
    run(make_config(*LONG, f"trainer.resume={saved}"), tmp_path)
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["world_size"] == 1
    # The same global batches in the same order; only the reduction's rounding differs.
    assert_params_close(final_params(tmp_path), final_params(reference), rtol=1e-5)


def test_a_one_process_checkpoint_resumes_on_two_processes(reference, tmp_path):
    alone = tmp_path / "alone"
    run(make_config(*LONG), alone)
    done = launch(tmp_path / "two", *LONG, f"trainer.resume={alone / 'checkpoints/step_00000240.pt'}", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)["world_size"] == 2
    assert_params_close(final_params(tmp_path / "two"), final_params(reference), rtol=1e-5)


def test_rank0_alone_chooses_the_checkpoint_and_its_choice_or_error_binds_every_rank(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    for name in ("last.pt", "step_00000280.pt"):
        truncate(run_dir / "checkpoints" / name)
    done = launch(run_dir, *LONG, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed_at(run_dir, 0) == resumed_at(run_dir, 1) == [("step_00000260.pt", 260)]
    # Only rank 0 read the candidates, so only its log tells of the two it skipped.
    assert (run_dir / "rank0.log").read_text().count("checksum mismatch") == 2
    assert "checksum mismatch" not in (run_dir / "rank1.log").read_text()
    assert_bitwise_equal(final_params(run_dir), final_params(reference))

    (run_dir / "checkpoints" / "last.pt").unlink()
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        truncate(path)
    failed = launch(run_dir, *LONG, nproc=2)
    message = f"distsgd: error: no valid checkpoint in {run_dir / 'checkpoints'}"
    workers, report = torchrun_report(failed.stderr)
    # Printed once by rank 0, and shown as the root cause instead of a traceback.
    assert failed.returncode != 0 and workers.count(message) == 1, failed.stderr[-3000:]
    assert message in report.partition("Root Cause")[2], report
    for rank in (0, 1):
        assert message.removeprefix("distsgd: ") in (run_dir / f"rank{rank}.log").read_text()


# ---------------------------------------------------------------- dead and terminated workers


def test_elastic_restart_after_a_killed_worker_is_bitwise_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    with Torchrun(run_dir, *LONG, max_restarts=1) as job:
        job.wait_for_checkpoint(20)
        first = job.workers()
        os.kill(first[1], signal.SIGKILL)
        # The agent stops the survivor, then starts a new group; once the old one is gone, the
        # newest checkpoint on disk is the one every new rank has to find by itself.
        deadline = time.monotonic() + 60
        while alive(first[0]):
            assert time.monotonic() < deadline, "the surviving worker was not stopped"
            time.sleep(0.01)
        newest = max(int(m[1]) for p in (run_dir / "checkpoints").iterdir()
                     if (m := re.fullmatch(r"step_(\d+)\.pt\.sha256", p.name)))
        second = job.workers(exclude=frozenset(first.values()))
        assert job.wait(180) == 0, job.output()[-3000:]
        assert not job.job_processes()
    assert set(second.values()).isdisjoint(first.values())
    for rank in (0, 1):
        # Killed mid-run: each rank of the new group resumed (once) from the newest checkpoint.
        assert resumed_at(run_dir, rank) == [(f"step_{newest:08d}.pt", newest)]
    assert 20 <= newest < TOTAL
    assert_bitwise_equal(final_params(run_dir), final_params(reference))


def test_a_dead_worker_without_restarts_ends_the_job_promptly(tmp_path):
    run_dir = tmp_path / "run"
    with Torchrun(run_dir, *LONG) as job:
        job.wait_for_checkpoint(20)
        workers = job.workers()
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        code = job.wait(60)
        elapsed = time.monotonic() - killed
        output = job.output()
        # Not a collective timeout (trainer.collective_timeout_s=600): the survivor learns at once.
        assert code != 0 and elapsed < 20, (code, elapsed)
        cause = root_cause(output)
        assert re.search(r"rank\s*: 1 \(local_rank: 1\)", cause) and re.search(r"exitcode\s*: -9", cause), cause
        assert "SIGKILL" in cause
        assert not alive(workers[0]) and not job.job_processes()
    assert not (run_dir / "checkpoints" / "last.pt").exists()


def test_sigterm_saves_at_the_next_step_and_the_next_launch_resumes_there(reference, tmp_path):
    run_dir = tmp_path / "run"
    with Torchrun(run_dir, *LONG) as job:
        job.wait_for_checkpoint(20)
        # One rank only: the stop is agreed on through the gradient all-reduce, so rank 0, which got
        # no signal, saves the checkpoint and both stop after the same step.
        os.kill(job.workers()[1], signal.SIGTERM)
        code = job.wait(60)
        output = job.output()
    assert code != 0
    workers, report = torchrun_report(output)
    stops = re.findall(r"distsgd: stopped by SIGTERM after step (\d+); saved (\S+); to resume, run: (.*)", workers)
    assert len(stops) == 1, output[-3000:]  # rank 0 alone prints it
    step, path, command = int(stops[0][0]), stops[0][1], stops[0][2]
    assert path == str(run_dir / "checkpoints" / f"step_{step:08d}.pt")
    assert f"stopped by SIGTERM after step {step}" in report.partition("Root Cause")[2]
    assert 20 < step < TOTAL
    assert re.search(r"exitcode\s*: 143", output), output[-3000:]
    saved = run_dir / "checkpoints" / f"step_{step:08d}.pt"
    assert checkpoint.verify(saved) is None and checkpoint.load(saved)["step"] == step
    assert not (run_dir / "checkpoints" / "last.pt").exists()

    # The printed command, as a user would paste it (from another folder): it resumes this run
    # (torchrun's new run id would otherwise make a new run directory).
    args = shlex.split(command)
    assert args[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"], command
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args[1:]], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert resumed_at(run_dir, rank) == [(saved.name, step)]
    assert_bitwise_equal(final_params(run_dir), final_params(reference))


# ---------------------------------------------------------------- non-finite values on one rank

NAN_STEPS = (3, 9, 10, 14, 15, 16)  # steps whose global batch holds a NaN row, on rank 1 only
NAN_RUN = ["data=npz", "data.val_fraction=0", "data.global_batch_size=32", "model.width=16", "optim=momentum",
           "optim.lr=0.05", "trainer.max_steps=20", "trainer.log_every=1", "trainer.max_consecutive_skips=2"]


@pytest.fixture(scope="module")
def nan_data(tmp_path_factory) -> list[str]:
    """Overrides of a run on an npz set with NaN features in one of rank 1's rows at NAN_STEPS."""
    path = tmp_path_factory.mktemp("nan_data") / "data.npz"
    gen = np.random.default_rng(0)
    x = gen.standard_normal((640, 8)).astype(np.float32)
    y = (x @ gen.standard_normal((8, 4))).argmax(1)
    np.savez(path, x=x, y=y)
    overrides = NAN_RUN + [f"data.path={path}"]
    train = data.load(to_config(make_config(*overrides)).data).x_train  # shuffled by the split
    assert data.steps_per_epoch(len(train), 32) == 20  # the run stays in epoch 0
    order = {rank: data.train_order(len(train), rank, 2, 0, 0, torch.device("cpu")) for rank in (0, 1)}
    for step in NAN_STEPS:
        row = int(np.flatnonzero((x == train[order[1][step * 16]].numpy()).all(1))[0])
        x[row, 0] = np.nan
    np.savez(path, x=x, y=y)

    # Check the placement from the sampler's order: NaN on rank 1 exactly at NAN_STEPS, never on rank 0.
    train = data.load(to_config(make_config(*overrides)).data).x_train
    for rank, expected in ((0, ()), (1, NAN_STEPS)):
        seen = [k for k in range(20) if train[order[rank][k * 16:(k + 1) * 16]].isnan().any()]
        assert seen == list(expected), (rank, seen)
    return overrides


def expected_skips(last_step: int) -> list[tuple[int, float]]:
    return [(s, float(sum(k <= s for k in NAN_STEPS))) for s in range(last_step + 1)]


def test_a_nan_on_one_rank_is_skipped_on_every_rank_then_stops_the_run(nan_data, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    with Torchrun(run_dir, *nan_data) as job:
        code = job.wait(90)
        output = job.output()
    assert code != 0 and time.monotonic() - started < 90
    # 3 and the pairs (9, 10), (14, 15) are skipped: 2 in a row is within max_consecutive_skips=2.
    # The third in a row, 16, stops the run on both ranks with the state before step 16.
    saved = run_dir / "checkpoints" / "step_00000016.pt"
    message = (f"distsgd: non-finite loss nan at step 16; stopped after 3 consecutive non-finite steps "
               f"(trainer.max_consecutive_skips=2); saved the last good state to {saved}; try a lower optim.lr")
    assert message in output, output[-3000:]
    assert re.search(r"exitcode\s*: 3\b", output), output[-3000:]
    state = checkpoint.load(saved)
    assert state["step"] == 16 and state["skipped_steps"] == 6
    assert all(t.isfinite().all() for t in state["model"].values())
    assert not (run_dir / "checkpoints" / "last.pt").exists()

    # Rank 0 logs the global loss: NaN exactly where rank 1 had a NaN row, so both ranks saw it.
    curves = read_scalars(run_dir)
    assert [s for s, v in curves["train/loss"] if math.isnan(v)] == [3, 9, 10, 14, 15]
    assert curves["train/skipped_steps"] == expected_skips(15)

    # One process skips the same updates (the guard acts on the global batch): same state at 16.
    alone = tmp_path / "alone"
    run(make_config(*nan_data, "trainer.max_consecutive_skips=10", "trainer.checkpoint_every=1",
                    "trainer.keep_checkpoints=100"), alone)
    assert read_scalars(alone)["train/skipped_steps"] == expected_skips(19)
    assert torch.load(alone / "checkpoints/last.pt", weights_only=True)["skipped_steps"] == 6
    assert_params_close(state["model"], checkpoint.load(alone / "checkpoints/step_00000016.pt")["model"], rtol=1e-5)

    # nonfinite=stop: the first non-finite step ends the run, saving the state before it.
    stopped = tmp_path / "stopped"
    with pytest.raises(Stopped) as stop:
        run(make_config(*nan_data, "trainer.nonfinite=stop"), stopped)
    assert stop.value.exit_code == 3
    assert str(stop.value) == (f"non-finite loss nan at step 3; stopped after trainer.nonfinite=stop; saved the last "
                               f"good state to {stopped / 'checkpoints/step_00000003.pt'}; try a lower optim.lr "
                               f"(or trainer.clip_grad_norm)")
    assert_bitwise_equal(checkpoint.load(stopped / "checkpoints/step_00000003.pt")["model"],
                         checkpoint.load(alone / "checkpoints/step_00000003.pt")["model"])


@pytest.fixture
def overflowing_gradient(monkeypatch):
    """Models whose first parameter gets an infinite gradient at the steps in the returned set,
    from a finite loss: the overflow fp32 can meet in a backward pass."""
    steps: set[int] = set()
    build = models.build

    def build_with_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        backward_passes = iter(range(10**9))
        first = next(model.parameters())
        first.register_hook(lambda grad: grad + math.inf if next(backward_passes) in steps else grad)
        return model

    monkeypatch.setattr(models, "build", build_with_hook)
    return steps


def test_a_non_finite_gradient_from_a_finite_loss_is_skipped(overflowing_gradient, tmp_path):
    overflowing_gradient.update({4, 7})
    overrides = ["data.num_samples=256", "data.global_batch_size=32", "model.width=8", "trainer.max_steps=10",
                 "optim=momentum", "trainer.log_every=1", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=100"]
    run(make_config(*overrides), tmp_path / "skip")
    curves = read_scalars(tmp_path / "skip")
    assert all(math.isfinite(v) for _, v in curves["train/loss"])
    assert [s for s, v in curves["train/grad_norm"] if not math.isfinite(v)] == [4, 7]
    assert [v for _, v in curves["train/skipped_steps"]] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    saved = {step: checkpoint.load(checkpoint.step_path(tmp_path / "skip/checkpoints", step)) for step in (4, 5, 6)}
    # Step 4 (the 5th update) left the model and the momentum buffers as they were; step 5 moved them.
    assert_bitwise_equal(saved[4]["model"], saved[5]["model"])
    momentum = {step: {i: s["momentum_buffer"] for i, s in saved[step]["optimizer"]["state"].items()} for step in saved}
    assert_bitwise_equal(momentum[4], momentum[5])
    assert not any(torch.equal(saved[5]["model"][k], saved[6]["model"][k]) for k in saved[5]["model"])

    with pytest.raises(Stopped) as stop:
        run(make_config(*overrides, "trainer.nonfinite=stop"), tmp_path / "stop")
    assert str(stop.value).startswith("non-finite gradient norm inf at step 4; stopped after trainer.nonfinite=stop")


# ---------------------------------------------------------------- bad invocations


class Payload:
    """A custom class: what a checkpoint must never make torch.load unpickle."""

    def __init__(self):
        self.weights = [1.0, 2.0]


BAD_BASE = ["data.num_samples=256", "data.global_batch_size=32", "model.width=8", "trainer.max_steps=6"]


def _with_sidecar(path: Path) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    run(make_config(*BAD_BASE, "trainer.checkpoint_every=3"), root / "good")
    files = root / "files"
    files.mkdir()
    good = (root / "good/checkpoints/step_00000003.pt").read_bytes()
    torch.save(Payload(), files / "custom.pt")
    (files / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, files / "foreign.pt")
    torch.save(torch.zeros(3), files / "tensor.pt")
    (files / "truncated.pt").write_bytes(good[:len(good) // 2])
    for name in ("custom", "random", "foreign", "tensor", "truncated"):
        _with_sidecar(files / f"{name}.pt")
    (files / "stale.pt").write_bytes(good[:len(good) // 2])  # truncated after its sidecar was written
    shutil.copy(root / "good/checkpoints/step_00000003.pt.sha256", files / "stale.pt.sha256")
    (files / "nosidecar.pt").write_bytes(good)
    (files / "notes.npz").write_text("not an npz archive\n")
    (files / "empty.npz").write_bytes(b"")
    np.savez(files / "strings.npz", x=np.array([["0.1", "a"]] * 40), y=np.zeros(40, dtype=np.int64))
    np.savez(files / "flat.npz", x=np.zeros(40, dtype=np.float32), y=np.zeros(40, dtype=np.int64))
    (files / "empty.txt").write_bytes(b"")
    (files / "nanogpt").mkdir()
    for split in ("train", "val"):
        np.zeros(300, dtype=np.uint16).tofile(files / f"nanogpt/{split}.bin")
    (files / "nanogpt/meta.pkl").write_bytes(pickle.dumps({"vocab_size": 8, "itos": Payload()}))
    return {"root": root, "good": root / "good/checkpoints", "files": files}


def _bad_cases(f: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(setup of the run directory, overrides, text the one error line must contain)."""
    files, good = f["files"], f["good"]
    return [
        # Keys and types, caught by Hydra against the schema.
        ("copy", ["trainer.max_stepz=5"], "Key 'max_stepz' not in 'TrainerConfig'"),
        ("copy", ["optim=nosuch"], "Could not find 'optim/nosuch'"),
        ("copy", ["trainer.max_steps=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
        ("copy", ["optim.lr=fast"], "Value 'fast' of type 'str' could not be converted to Float"),
        ("copy", ["trainer.compile=maybe"], "Value 'maybe' is not a valid bool"),
        ("copy", ["+trainer.max_stepz=5"], "unknown config key(s) trainer.max_stepz"),
        # Values and combinations.
        ("copy", ["data.global_batch_size=0"], "data.global_batch_size must be > 0, got 0"),
        ("copy", ["trainer.max_steps=-5"], "trainer.max_steps must be > 0, got -5"),
        ("copy", ["optim.lr=-0.1"], "optim.lr must be > 0, got -0.1"),
        ("copy", ["model.width=0"], "model.width must be > 0, got 0"),
        ("copy", ["trainer.accumulate=0"], "trainer.accumulate must be > 0, got 0"),
        ("copy", ["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints must be >= 0, got -1"),
        ("copy", ["trainer.max_consecutive_skips=-1"], "trainer.max_consecutive_skips must be >= 0, got -1"),
        ("copy", ["data.val_fraction=1.0"], "data.val_fraction must be in [0, 1), got 1.0"),
        ("copy", ["trainer.nonfinite=ignore"], "trainer.nonfinite must be one of skip|stop, got 'ignore'"),
        ("copy", ["trainer.max_epochs=0"], "trainer.max_epochs must be > 0, got 0"),
        ("copy", ["optim.nesterov=true"], "optim.nesterov must be false unless optim.momentum > 0"),
        ("copy", ["data.global_batch_size=4096"], "data.global_batch_size=4096 exceeds the 205 training samples"),
        ("copy", ["schedule=cosine", "schedule.warmup_steps=100"],
         "schedule.warmup_steps=100 (steps) is longer than the run's 6 steps"),
        ("copy", ["trainer.accumulate=3"], "is not divisible by the world size 1 x trainer.accumulate=3"),
        ("copy", ["trainer.device=cuda"], "trainer.device=cuda but no CUDA device is available"),
        # Data files.
        ("copy", ["data=npz"], "data.path must be a .npz file for data=npz, got None"),
        ("copy", ["data=npz", f"data.path={files}/missing.npz"], f"data.path: no such file: {files}/missing.npz"),
        ("copy", ["data=npz", f"data.path={files}/notes.npz"], f"data.path: {files}/notes.npz is not a readable .npz"),
        ("copy", ["data=npz", f"data.path={files}/empty.npz"], f"data.path: {files}/empty.npz is not a readable .npz"),
        ("copy", ["data=npz", f"data.path={files}/strings.npz"],
         f"data.path: {files}/strings.npz: x must hold numbers, it holds <U3 values"),
        ("copy", ["data=npz", f"data.path={files}/flat.npz"],
         f"data.path: {files}/flat.npz needs x of shape (N, features...) and y of length N, got x (40,)"),
        # Language-model data.
        ("copy", ["data=text", f"data.path={files}/missing.txt"],
         f"data.path: no such file or folder: {files}/missing.txt"),
        ("copy", ["data=text", f"data.path={files}/empty.txt"], f"data.path: {files}/empty.txt is empty"),
        ("copy", ["data=text", f"data.path={files}/random.pt"],
         f"data.path: {files}/random.pt is not UTF-8 text (byte"),
        ("copy", ["data=text", f"data.root={files}"], f"data.root: {files}/train.bin: no such file"),
        ("copy", ["data=text", f"data.root={files}/nanogpt"],
         f"data.root: {files}/nanogpt/meta.pkl holds objects other than plain values (test_faults.Payload); refusing"),
        ("copy", ["data=text", "data.order=3"], "data.order must be left at 2 with data=text, which ignores it"),
        ("copy", ["data=markov", "data.concentration=0"], "data.concentration must be > 0, got 0"),
        ("copy", ["data=markov", "data.num_tokens=100"],
         "data.num_tokens=100: its validation part (data.val_fraction=0.1): 10 tokens, fewer than one window"),
        # Devices and conflicting keys.
        ("copy", ["trainer.device=tpu"], "trainer.device must be one of auto|cpu|cuda, got 'tpu'"),
        ("copy", ["trainer.allreduce=manual", "trainer.comm_hook=fp16"],
         "trainer.comm_hook must be none with trainer.allreduce=manual"),
        # Checkpoint files.
        ("copy", [f"trainer.resume={files}/missing.pt"], f"trainer.resume={files}/missing.pt: missing"),
        ("copy", [f"trainer.resume={files}"], f"trainer.resume={files}: not a file"),
        ("copy", [f"trainer.resume={files}/nosidecar.pt"], "nosidecar.pt: no .sha256 sidecar"),
        ("copy", [f"trainer.resume={files}/stale.pt"], "stale.pt: checksum mismatch (truncated or corrupted)"),
        ("copy", [f"trainer.resume={files}/truncated.pt"],
         f"checkpoint {files}/truncated.pt is not a readable checkpoint"),
        ("copy", [f"trainer.resume={files}/random.pt"],
         f"checkpoint {files}/random.pt is not a readable checkpoint (UnpicklingError:"),
        ("copy", [f"trainer.resume={files}/custom.pt"],
         f"checkpoint {files}/custom.pt holds objects other than tensors and plain values; refusing to unpickle it"),
        ("copy", [f"trainer.resume={files}/foreign.pt"],
         f"checkpoint {files}/foreign.pt is not a distsgd training checkpoint (it lacks optimizer"),
        ("copy", [f"trainer.resume={files}/tensor.pt"], f"checkpoint {files}/tensor.pt is not a distsgd checkpoint"),
        ("copy", [f"trainer.resume={good}/step_00000003.pt", "model.width=16", "trainer.resume_override=true"],
         "does not fit this run's model or optimizer (size mismatch for 1.weight"),
        # Run directories.
        ("copy", ["optim.lr=0.5"], "the config differs from checkpoint"),
        ("corrupted", [], "no valid checkpoint in"),
        ("file", [], "checkpoints is not writable"),
        ("copy", ["hydra.run.dir=/proc/distsgd-x"], "hydra.run.dir: the folder /proc/distsgd-x is not writable"),
        ("copy", ["-m", "hydra.sweep.dir=/proc/distsgd-y"], "hydra.sweep.dir: the folder /proc/distsgd-y is not writable"),
    ]


def _prepare(run_dir: Path, setup: str, good: Path) -> Path:
    """The run directory of one bad invocation, with checkpoints (or a file) that must survive it."""
    run_dir.mkdir(parents=True)
    if setup == "file":  # root ignores permissions, so a file where the folder belongs stands in
        (run_dir / "checkpoints").write_text("a file where the checkpoint folder should be\n")
        return run_dir / "checkpoints"
    shutil.copytree(good, run_dir / "checkpoints")
    if setup == "corrupted":
        for path in (run_dir / "checkpoints").glob("*.pt"):
            path.write_bytes(path.read_bytes()[:-64])
    return run_dir / "checkpoints"


def _hashes(*places: Path) -> dict[str, str]:
    files = [p for place in places for p in ([place] if place.is_file() else sorted(place.rglob("*")))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def _check_failure(code, seconds: float, output: str, expected: str, what, limit: float = 10) -> None:
    assert code not in (0, None), (what, output)
    assert seconds < limit, (what, seconds)
    assert "Traceback" not in output, (what, output)
    assert any(expected in line for line in output.splitlines()), (what, expected, output)


def test_bad_invocations_fail_fast_with_one_clear_line_and_touch_no_checkpoint(bad_files, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cases = _bad_cases(bad_files)
    assert len(cases) >= 30
    watched = (bad_files["good"], bad_files["files"])
    before = _hashes(*watched)
    for i, (setup, overrides, expected) in enumerate(cases):
        run_dir = tmp_path / f"case{i}"
        place = _prepare(run_dir, setup, bad_files["good"])
        ours = _hashes(place)
        started = time.monotonic()
        flags, overrides = [o for o in overrides if o == "-m"], [o for o in overrides if o != "-m"]
        code = run_command(main, ["distsgd-train", *flags, f"hydra.run.dir={run_dir}", *BAD_BASE, *overrides],
                           monkeypatch)
        captured = capsys.readouterr()
        _check_failure(code, time.monotonic() - started, captured.out + captured.err, expected, overrides or setup)
        assert _hashes(place) == ours, overrides or setup
        assert not (run_dir / "tensorboard").exists(), overrides or setup
    assert _hashes(*watched) == before


def test_a_config_hydra_cannot_compose_is_reported_once_under_torchrun(tmp_path):
    # Hydra reports it on every rank before distsgd runs: rank 0 alone shows it, torchrun names it.
    failed = launch(tmp_path / "run", "trainer.max_stepz=5", nproc=2)
    workers, report = torchrun_report(failed.stderr)
    message = "Could not override 'trainer.max_stepz'."
    assert failed.returncode != 0 and workers.count(message) == 1, failed.stderr[-3000:]
    assert f"traceback : distsgd: error: {message}" in report.partition("Root Cause")[2], report
    assert workers.count("Traceback") == 1  # torchrun's own, of its ChildFailedError


def test_bad_invocations_as_real_processes(bad_files, tmp_path):
    files = bad_files["files"]
    cases = [("copy", ["+trainer.max_stepz=5"], "distsgd: error: unknown config key(s) trainer.max_stepz"),
             ("copy", [f"trainer.resume={files}/custom.pt"], "refusing to unpickle it"),
             ("file", [], "checkpoints is not writable")]
    env = {**subprocess_env("HYDRA_FULL_ERROR"), "OMP_NUM_THREADS": "1"}
    watched = (bad_files["good"], files)
    before = _hashes(*watched)
    started, places = [], []
    for i, (setup, overrides, _) in enumerate(cases):
        run_dir = tmp_path / f"case{i}"
        place = _prepare(run_dir, setup, bad_files["good"])
        places.append((place, _hashes(place)))
        cmd = [sys.executable, "-m", "distsgd.train", f"hydra.run.dir={run_dir}", *BAD_BASE, *overrides]
        # All at once: each costs a torch import (seconds), the failures themselves are instant.
        started.append((time.monotonic(), subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                           stderr=subprocess.STDOUT, text=True)))
    for (setup, overrides, expected), (start, proc), (place, ours) in zip(cases, started, places):
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, (overrides or setup, output)
        # Three processes importing torch on two cores: seconds each, not the failure's doing.
        _check_failure(proc.returncode, time.monotonic() - start, output, expected, overrides or setup, limit=45)
        assert _hashes(place) == ours
    assert _hashes(*watched) == before
