"""What distsgd does around Hydra's runs and sweeps, as a Hydra callback (conf/config.yaml,
``hydra.callbacks``): the run or sweep directory checked before Hydra creates it (its own failure
there is a traceback), a sampling sweeper seeded alike on every rank, and a closing line that
names the jobs that diverged.

Every rank of a torchrun job runs its own sweeper. A sampling sweeper (Optuna's) draws the same
trials on every rank only from the same seed and the same results: every rank returns the same
global objective, so one seed shared by the ranks keeps them in step. Without one, each rank would
draw its own points and train them in one process group (the ranks' configs are also compared at
every job's start: distributed.check_same_config).
"""

from __future__ import annotations

import logging
import shlex
import zlib
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from distsgd.checkpoint import check_writable
from distsgd.config import ConfigError, run_id
from distsgd.distributed import launch_rank
from distsgd.metrics import DIVERGED_MARKER, quiet_console
from distsgd.stopping import report

log = logging.getLogger("distsgd")


class Callbacks(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_directory(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """The sweep's folder checked; an unseeded sampler gets a seed from the run id, which every
        rank of a torchrun job (and every task of a SLURM job) shares, and which differs from sweep
        to sweep as Optuna's own random seed would."""
        _check_directory(config.hydra.sweep.dir, "hydra.sweep.dir")
        sampler = OmegaConf.select(config, "hydra.sweeper.sampler")
        if sampler is None or "seed" not in sampler or sampler.seed is not None:
            return
        seed = zlib.crc32(run_id().encode())
        with read_write(config), open_dict(config):
            config.hydra.sweeper.sampler.seed = seed
        if launch_rank() == 0:
            log.info("hydra.sweeper.sampler.seed=%d, from the run id (set it to draw these trials again)", seed)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if launch_rank() != 0:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = [path.parent.parent for path in sweep_dir.rglob(".hydra/config.yaml")]
        diverged = sorted(str(path.parent.relative_to(sweep_dir)) for path in sweep_dir.rglob(DIVERGED_MARKER))
        what = (f"{len(diverged)} diverged (stopped on non-finite values, objective inf): {', '.join(diverged)}"
                if diverged else "none diverged")
        print(f"distsgd: sweep done, {len(jobs)} job(s) in {sweep_dir}; {what}. "
              f"Report: distsgd-report {shlex.quote(str(sweep_dir))}", flush=True)


def _check_directory(directory: str, key: str) -> None:
    """Exit with one line (a callback's SystemExit passes through Hydra) when ``directory`` cannot
    be created and written."""
    try:
        check_writable(Path(directory), f"{key}: the folder")
    except ConfigError as err:
        quiet_console(launch_rank() == 0)  # as the task would: the line on rank 0's console, once
        report(f"error: {err}", launch_rank() == 0)
        raise SystemExit(2) from None
