"""Reproductions of what the SGD literature claims, each a small study that distsgd runs.

    python scripts/reproduce.py lr                  # or: python -m distsgd.studies lr
    python scripts/reproduce.py all --out studies   # every study, one folder each

A study trains its runs in this process (``runs.train``: the same config and code path as
``distsgd-train`` with the overrides it records in ``commands.sh``), then writes its figures and
``verdict.md`` into its folder (default ``reproductions/<name>``), with a ``report/`` of all its
runs from distsgd.report. Each study module has ``TITLE`` and ``run(out, quick=False) -> Outcome``;
``quick`` is the seconds-long version of the claim that the test suite asserts.
docs/reproductions.md holds the claims, the commands, the figures and the verdicts.
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

    runs.quiet()
    for name in STUDIES if args.name == "all" else [args.name]:
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
        print(f"{name}: the claim {'holds' if outcome.holds else 'does not hold'} at this scale "
              f"({time.perf_counter() - started:.0f} s); {args.out / name / 'verdict.md'}")
        print(outcome.verdict)
