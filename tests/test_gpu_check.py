"""scripts/gpu_check.sh on a machine like the lent GPU ones: a python that holds torch but not
hydra-core, omegaconf or antlr4-python3-runtime, and no package index. Here ``--prepare``
downloads the wheels (PyPI is reachable), then the check's install step, offline, must make
``python -m distsgd.train`` import and compose its config with that python as it is."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MISSING_THERE = ("hydra", "omegaconf", "antlr4", "distsgd", "__editable__")  # by the start of a site-packages name


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def python_without_hydra(root: Path) -> Path:
    """A venv whose site-packages links to everything of this one's but hydra, omegaconf, antlr4
    and distsgd: torch is there, as on a GPU image, without being installed again."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(MISSING_THERE):
            (site / entry.name).symlink_to(entry)
    return python


@pytest.mark.slow
def test_prepared_wheels_install_offline_and_distsgd_composes_its_config(tmp_path):
    wheels = tmp_path / "whl"
    python = python_without_hydra(tmp_path / "venv")
    assert subprocess.run([python, "-c", "import torch, hydra"], capture_output=True).returncode != 0

    # Before --prepare: one line saying what to do.
    done = gpu_check("--install-only", PYTHON=str(python), GPU_CHECK_WHEELS=str(wheels))
    assert done.returncode == 3 and "--prepare" in done.stderr and len(done.stderr.splitlines()) == 1

    done = gpu_check("--prepare", GPU_CHECK_WHEELS=str(wheels), PREPARE_PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in wheels.iterdir()) == [
        "antlr4_python3_runtime-4.9.3-py3-none-any.whl", "hydra_core-1.3.8-py3-none-any.whl",
        "omegaconf-2.3.1-py3-none-any.whl"]

    # No pip configuration (this machine's names an index and a wheel folder), as on the GPU machine.
    done = gpu_check("--install-only", PYTHON=str(python), GPU_CHECK_WHEELS=str(wheels), TMPDIR=str(tmp_path),
                     PIP_CONFIG_FILE=os.devnull)
    assert done.returncode == 0, done.stderr
    assert f"distsgd from {REPO / 'distsgd'}" in done.stdout
    assert f"hydra-core 1.3.8 from {tmp_path}" in done.stdout
