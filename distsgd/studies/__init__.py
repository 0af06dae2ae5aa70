"""Reproductions of what the SGD literature claims, each a small study that distsgd runs.

    python scripts/reproduce.py lr                  # or: python -m distsgd.studies lr
    python scripts/reproduce.py all --out studies   # every study, one folder each

A study trains its runs in this process (``runs.train``: the same config and code path as
``distsgd-train`` with the overrides it records in ``commands.sh``), then writes its figures and
``verdict.md`` into its folder (default ``reproductions/<name>``), with a ``report/`` of all its
runs from distsgd.report. Each study module has ``TITLE`` and ``run(out, quick=False) -> Outcome``;
``quick`` is the seconds-long version of the claim that the test suite asserts. Every study fixes
its constants on the tuning seed and computes its verdict on held-out seeds (runs.TUNING_SEED,
runs.HELD_OUT_SEEDS); its docstring says what was tuned on what, and what changed after a first
result. docs/reproductions.md holds the claims, the commands, the figures and the verdicts.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from distsgd.distributed import launch_environment

STUDIES = {
    "lr": "distsgd.studies.learning_rate",
    "decay": "distsgd.studies.decay",
    "batch_size": "distsgd.studies.batch_size",
    "momentum": "distsgd.studies.momentum",
    "adaptive": "distsgd.studies.adaptive",
    "linear_scaling": "distsgd.studies.linear_scaling",
    "batch_growth": "distsgd.studies.batch_growth",
}


def study(name: str):
    return importlib.import_module(STUDIES[name])


def written_by_a_study(folder: Path) -> bool:
    """Whether ``folder`` is one that a study wrote (and may replace): a real folder holding its
    verdict.md or its commands.sh (written as its first run starts)."""
    return folder.is_dir() and not folder.is_symlink() and any(
        (folder / name).is_file() for name in ("verdict.md", "commands.sh"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*STUDIES, "all"], help="the study to run")
    parser.add_argument("--out", type=Path, default=Path("reproductions"),
                        help="folder for the study's folder (default: reproductions)")
    parser.add_argument("--quick", action="store_true", help="the seconds-long version the tests run")
    args = parser.parse_args(argv)
    world_size = launch_environment().world_size
    if world_size > 1:
        # Each rank would run the whole study and write the same folder.
        parser.error(f"a study runs in one process, not as one of {world_size} (torchrun or srun); run it with "
                     "python, and any of its commands.sh lines under torchrun")
    # The studies train small models, for which OpenMP threads on a few shared cores mostly wait
    # on each other; torchrun gives its workers one thread likewise.
    torch.set_num_threads(1)
    from distsgd.report import report
    from distsgd.studies import runs

    names = list(STUDIES) if args.name == "all" else [args.name]
    # Checked for every study before any runs: "all" does not stop half-way on a folder of the user's.
    for name in names:
        if (args.out / name).exists() and not written_by_a_study(args.out / name):
            parser.exit(2, f"{parser.prog}: error: {args.out / name} exists and holds no verdict.md or commands.sh, "
                           "so no study wrote it; a study replaces only its own folder: move it, or choose another "
                           "--out\n")
    runs.quiet()
    for name in names:
        if (args.out / name).exists():
            # A study starts afresh: runs left in its folder would be resumed as finished.
            print(f"{name}: replacing {args.out / name}")
            shutil.rmtree(args.out / name)
        started = time.perf_counter()
        outcome = study(name).run(args.out / name, quick=args.quick)
        outcome.write(args.out / name)
        if (args.out / name / "runs").is_dir():
            report([args.out / name / "runs"], args.out / name / "report")
        # A claim that does not hold at this scale is a finding, not an error: the exit code stays 0.
        print(f"{name}: the claim {'holds' if outcome.holds else 'does not hold'} on the held-out seeds "
              f"({time.perf_counter() - started:.0f} s); {args.out / name / 'verdict.md'}")
        print(outcome.verdict)
