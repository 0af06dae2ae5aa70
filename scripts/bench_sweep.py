"""Wall time of whole processes: a learning-rate sweep (distsgd against a Lightning script) and
a 1-step run (distsgd against ``python -c "import torch"``).

    python scripts/bench_sweep.py                                 # both, 5 rounds
    python scripts/bench_sweep.py --only sweep --rounds 9
    python scripts/bench_sweep.py --also /tmp/distsgd-284e325     # and another checkout of distsgd
    python scripts/bench_sweep.py --threads 1                     # OMP_NUM_THREADS=1 for every contender

``--also DIR`` times the distsgd in DIR the same way (make one with
``mkdir DIR && git archive COMMIT | tar -x -C DIR``) and checks that its sweep's checkpoints hold
bitwise the same models as this checkout's.

The sweep is issue 15's: 8 learning rates on digits, an MLP 64-256-256-10, batch 64, momentum 0.9,
10 epochs (220 steps), validation every 50 steps, TensorBoard and a final checkpoint per run.
distsgd runs it as one ``python -m distsgd.train -m ...``; the Lightning contender is
``lightning_sweep`` below, a script looping ``Trainer.fit`` over the same 8 configs in one process
(the digits read with scikit-learn's ``load_digits``, as a Lightning user would, the same 20%
held out for validation, TensorBoardLogger and Lightning's default checkpointing).
The start-up contenders are ``import torch``; ``import torch, torch._dynamo``, the floor of any
run that uses a torch.optim optimizer (its first call imports torch._dynamo); and a 1-step
``data=digits`` run.

Method. Every contender is a fresh process, timed from its start to its exit, its output
discarded. A round runs each contender once, in an order that rotates every round, so that
neighbours in time share the machine's load; one untimed round comes first (file caches, .pyc).
The figures are medians over rounds, with quartiles, and the median over rounds of each round's
ratio to the reference (Lightning for the sweep, ``import torch`` for start-up). A contender that
fails, or whose sweep leaves fewer checkpoints than configs, stops the benchmark: a quick failure
would look like a speed-up.

Lightning is not a dependency of distsgd. Install it beside torch without replacing torch:
    .venv/bin/pip install -c .venv/torch-pin.txt lightning
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LRS = ("0.001", "0.002", "0.005", "0.01", "0.02", "0.03", "0.05", "0.1")
EPOCHS, BATCH, WIDTH, MOMENTUM, VAL_EVERY, VAL_FRACTION = 10, 64, 256, 0.9, 50, 0.2
INSTALL_LIGHTNING = ".venv/bin/pip install -c .venv/torch-pin.txt lightning"


def distsgd_sweep(out: Path) -> list[str]:
    return ["-m", "distsgd.train", "-m", "data=digits", f"data.global_batch_size={BATCH}", "model=mlp",
            "model.depth=2", f"model.width={WIDTH}", "optim=momentum", f"optim.momentum={MOMENTUM}",
            f"optim.lr={','.join(LRS)}", f"trainer.max_epochs={EPOCHS}", f"trainer.val_every={VAL_EVERY}",
            f"hydra.sweep.dir={out}"]


def distsgd_one_step(out: Path) -> list[str]:
    return ["-m", "distsgd.train", "data=digits", "trainer.max_steps=1", f"hydra.run.dir={out}"]


def lightning_sweep(out: Path) -> None:
    """The Lightning script: the 8 configs, one Trainer.fit each, in this process."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = round(len(x) * VAL_FRACTION)
    train = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
    val = TensorDataset(x[perm[:n_val]], y[perm[:n_val]])

    class MLP(L.LightningModule):
        def __init__(self, lr: float):
            super().__init__()
            self.lr = lr
            self.net = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                                     nn.Linear(WIDTH, 10))

        def training_step(self, batch, _):
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, _):
            logits = self.net(batch[0])
            self.log_dict({"val/loss": F.cross_entropy(logits, batch[1]),
                           "val/accuracy": (logits.argmax(1) == batch[1]).float().mean()})

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=MOMENTUM)

    for lr in LRS:
        torch.manual_seed(0)
        trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, default_root_dir=out,
                            logger=TensorBoardLogger(out, name=f"lr={lr}"), log_every_n_steps=10,
                            val_check_interval=VAL_EVERY, check_val_every_n_epoch=None)
        trainer.fit(MLP(float(lr)), DataLoader(train, batch_size=BATCH, shuffle=True, drop_last=True),
                    DataLoader(val, batch_size=len(val)))


class Contender:
    """A command run as a fresh process; ``outputs`` is how many files of ``pattern`` it must leave."""

    def __init__(self, name: str, args, cwd: Path = REPO, pattern: str = "", outputs: int = 0):
        self.name, self.args, self.cwd, self.pattern, self.outputs = name, args, cwd, pattern, outputs
        self.times: list[float] = []

    def run(self, out: Path, env: dict) -> float:
        args = self.args(out) if callable(self.args) else self.args
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *args], cwd=self.cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"bench_sweep: {self.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        found = len(list(out.rglob(self.pattern))) if self.pattern else 0
        if found != self.outputs:
            sys.exit(f"bench_sweep: {self.name} left {found} files {self.pattern} in {out}, expected {self.outputs}")
        return elapsed


def contenders(what: str, also: list[Path]) -> tuple[list[Contender], str]:
    """The contenders of one measurement, and the name of its reference."""
    checkouts = [("distsgd", REPO)] + [(f"distsgd@{path.name}", path) for path in also]
    if what == "sweep":
        return ([Contender("lightning", lambda out: [__file__, "--lightning-sweep", str(out)], pattern="*.ckpt",
                           outputs=len(LRS))] +
                [Contender(name, distsgd_sweep, path, "last.pt", len(LRS)) for name, path in checkouts],
                "lightning")
    return ([Contender("import torch", ["-c", "import torch"]),
             Contender("import torch, torch._dynamo", ["-c", "import torch, torch._dynamo"])] +
            [Contender(f"{name} 1 step", distsgd_one_step, path, "last.pt", 1) for name, path in checkouts],
            "import torch")


def measure(what: str, args: argparse.Namespace, env: dict) -> None:
    runners, reference = contenders(what, args.also)
    print(f"\n## {what}: {args.rounds} rounds after 1 untimed round, each contender a fresh process")
    for runner in runners:
        if runner.name.startswith("distsgd"):
            print(f"{runner.name} imports {imported_distsgd(runner.cwd, env)}")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for r in range(args.rounds + 1):
            shift = r % len(runners)
            outs = [Path(tmp) / f"{r}-{i}" for i in range(len(runners))]
            for i in [*range(shift, len(runners)), *range(shift)]:
                elapsed = runners[i].run(outs[i], env)
                if r:
                    runners[i].times.append(elapsed)
            if r == 0 and what == "sweep":  # runners: lightning, this distsgd, the others
                for i in range(2, len(runners)):
                    print(f"final checkpoints, {runners[i].name} vs distsgd: {compare_checkpoints(outs[1], outs[i])}")
            for out in outs:
                shutil.rmtree(out, ignore_errors=True)
    report(runners, reference)


def imported_distsgd(cwd: Path, env: dict) -> str:
    """Where ``python -m distsgd.train`` run in ``cwd`` finds distsgd (the checkout's, not an installed one)."""
    return subprocess.run([sys.executable, "-c", "import distsgd; print(distsgd.__file__)"], cwd=cwd, env=env,
                          capture_output=True, text=True).stdout.strip()


def compare_checkpoints(ours: Path, theirs: Path) -> str:
    """Whether every job's last.pt holds the same tensors and values in both sweep folders, but
    for the RNG states of Python and numpy, which each process seeds from the OS (random, numpy)."""
    import torch

    differ = set()
    mine = sorted(p.relative_to(ours) for p in ours.rglob("last.pt"))
    for rel in mine:
        a, b = (torch.load(root / rel, weights_only=True) for root in (ours, theirs))
        for state in a, b:
            for rng in state["rng"]:
                del rng["python"], rng["numpy"]
        differ |= set(differences(a, b))
    return f"identical in all {len(mine)} jobs" if not differ else f"DIFFERENT: {', '.join(sorted(differ))}"


def differences(a, b, key: str = ""):
    """The keys (dotted) whose values differ; tensors must match in dtype, shape and every bit."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            yield f"{key} (keys)"
        for k in a.keys() & b.keys():
            yield from differences(a[k], b[k], f"{key}.{k}" if key else str(k))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{key}.{i}")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            yield key
    elif type(a) is not type(b) or a != b:
        yield key


def report(runners: list[Contender], reference: str) -> None:
    ref = next(r for r in runners if r.name == reference)
    print("\n round  " + "  ".join(f"{r.name:>28}" for r in runners))
    for i in range(len(ref.times)):
        print(f"{i:6d}  " + "  ".join(f"{r.times[i]:27.2f}s" for r in runners))
    print(f"\n| contender | median s | quartiles s | min-max s | median ratio to {reference} | ratio of medians |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in runners:
        q1, _, q3 = statistics.quantiles(r.times, n=4) if len(r.times) > 1 else (r.times[0],) * 3
        ratio = statistics.median(t / t_ref for t, t_ref in zip(r.times, ref.times))
        print(f"| {r.name} | {statistics.median(r.times):.2f} | {q1:.2f}-{q3:.2f} | {min(r.times):.2f}-"
              f"{max(r.times):.2f} | {ratio:.3f} | {statistics.median(r.times) / statistics.median(ref.times):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["sweep", "startup"], help="one of the two measurements (default: both)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--also", type=Path, action="append", default=[], metavar="DIR",
                        help="another distsgd checkout to time the same way")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every contender (default: torch's own)")
    parser.add_argument("--lightning-sweep", type=Path, help=argparse.SUPPRESS)  # the Lightning contender itself
    args = parser.parse_args()
    if args.lightning_sweep:
        return lightning_sweep(args.lightning_sweep)
    if args.only != "startup" and importlib.util.find_spec("lightning") is None:
        sys.exit(f"bench_sweep: the sweep needs Lightning, which is not installed: {INSTALL_LIGHTNING} "
                 "(or --only startup)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{env.get('OMP_NUM_THREADS', '(unset)')}, load average {os.getloadavg()[0]:.2f} at the start")
    for what in ("sweep", "startup") if args.only is None else (args.only,):
        measure(what, args, env)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
