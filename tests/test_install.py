"""Installing: a wheel built from this checkout trains from any folder, with its configs inside and
the user's own beside them; scripts/setup.sh keeps a torch that is already there."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, REPO, subprocess_env

import distsgd

TINY = ["data.num_samples=256", "data.global_batch_size=32", "model.width=8", "trainer.max_steps=3",
        "trainer.val_every=1000", "trainer.device=cpu"]
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /optim: adam
optim:
  lr: 0.002
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The wheel of this checkout, installed into a folder of its own, and a folder outside both."""
    root = tmp_path_factory.mktemp("install")
    # Built from a copy: pip builds in the source tree and would leave build/ and *.egg-info here.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    for name in ("distsgd", "conf"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "wheels", root],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel, = (root / "wheels").glob("*.whl")
    install = subprocess.run([*pip, "install", "--no-deps", "--target", root / "site", wheel],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = root / "elsewhere"
    (elsewhere / "my-configs/experiment").mkdir(parents=True)
    (elsewhere / "my-configs/experiment/mine.yaml").write_text(USER_EXPERIMENT)
    return {"wheel": wheel, "site": root / "site", "elsewhere": elsewhere}


def run_installed(installed: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    """A process in a folder outside the checkout that finds distsgd only in the installed copy."""
    env = subprocess_env() | {"PYTHONPATH": str(installed["site"])}
    return subprocess.run([sys.executable, *args], cwd=installed["elsewhere"], env=env,
                          capture_output=True, text=True, timeout=180)


def test_the_wheel_holds_every_config_and_one_version(installed):
    site = installed["site"]
    shipped = {p.relative_to(CONF): p.read_text() for p in CONF.rglob("*.yaml")}
    packaged = {p.relative_to(site / "distsgd/conf"): p.read_text() for p in (site / "distsgd/conf").rglob("*.yaml")}
    assert packaged == shipped and len(shipped) > 30
    # Every module of the package, its subpackages' too (packages are listed in pyproject.toml).
    modules = {p.relative_to(REPO) for p in (REPO / "distsgd").rglob("*.py")}
    assert {p.relative_to(site) for p in (site / "distsgd").rglob("*.py") if "conf" not in p.parts} == modules
    assert installed["wheel"].name == f"distsgd-{distsgd.__version__}-py3-none-any.whl"
    metadata, = site.glob("distsgd-*.dist-info/METADATA")
    assert re.search(r"^Version: (.+)$", metadata.read_text(), re.M)[1] == distsgd.__version__

    done = run_installed(installed, "-c", "import distsgd, distsgd.config as c; print(distsgd.__file__, "
                                          "distsgd.__version__, c.CONF_DIR, sep='\\n')")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == [str(site / "distsgd/__init__.py"), distsgd.__version__,
                                           str(site / "distsgd/conf")]


def test_installed_distsgd_trains_from_another_folder_with_the_users_configs(installed, tmp_path):
    # The console script pip generated, run with this interpreter (its shebang names it too).
    script = installed["site"] / "bin/distsgd-train"
    done = run_installed(installed, str(script), f"hydra.run.dir={tmp_path / 'script'}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "script/checkpoints/last.pt", weights_only=True)["step"] == 3

    # python -m, with an experiment from the user's folder next to the packaged groups.
    done = run_installed(installed, "-m", "distsgd.train", "--config-dir", "my-configs", "experiment=mine",
                         f"hydra.run.dir={tmp_path / 'module'}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "module/checkpoints/last.pt", weights_only=True)
    config = yaml.safe_load(state["config"])
    assert (state["step"], config["optim"]["name"], config["optim"]["lr"]) == (3, "adam", 0.002)
    assert not (installed["elsewhere"] / "outputs").exists()  # the run went where hydra.run.dir said


# scripts/setup.sh, with a stand-in for .venv/bin/python that records what it is asked to do.
FAKE_PYTHON = """\
#!/usr/bin/env bash
printf '%s\\n' "$*" >>"$FAKE_LOG"
if [ "$1" = -c ]; then
    [ -f "$FAKE_TORCH" ] || exit 1
    [ "$2" = "import torch" ] || echo "torch==$(cat "$FAKE_TORCH")"
elif [[ " $* " == *" torch "* ]]; then
    echo 2.13.0 >"$FAKE_TORCH"
fi
"""


def setup_checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "scripts/setup.sh", "scripts/constraints.txt"):
        shutil.copy(REPO / name, repo / name)
    python = repo / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return repo


def pip_calls_of_setup(repo: Path, torch_file: Path) -> list[str]:
    log = repo.parent / "calls.log"
    log.unlink(missing_ok=True)
    env = os.environ | {"FAKE_LOG": str(log), "FAKE_TORCH": str(torch_file)}
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [call for call in log.read_text().splitlines() if call.startswith("-m pip")]


def test_setup_keeps_a_torch_that_is_already_installed(tmp_path):
    repo = setup_checkout(tmp_path)
    users_torch = tmp_path / "torch"
    users_torch.write_text("2.5.1+cu121\n")
    # Not scripts/constraints.txt, whose torch==2.13.0 would make pip replace this build.
    assert pip_calls_of_setup(repo, users_torch) == ["-m pip install -q -c .venv/torch-pin.txt -e .[dev]"]
    assert (repo / ".venv/torch-pin.txt").read_text() == "torch==2.5.1+cu121\n"
    assert pip_calls_of_setup(repo, users_torch) == []  # installed, and pyproject.toml unchanged
    with (repo / "pyproject.toml").open("a") as f:
        f.write("\n")
    assert pip_calls_of_setup(repo, users_torch) == ["-m pip install -q -c .venv/torch-pin.txt -e .[dev]"]


def test_setup_installs_the_pinned_torch_when_there_is_none(tmp_path):
    repo = setup_checkout(tmp_path)
    assert pip_calls_of_setup(repo, tmp_path / "torch") == ["-m pip install -q -c scripts/constraints.txt torch",
                                                            "-m pip install -q -c .venv/torch-pin.txt -e .[dev]"]
    assert (repo / ".venv/torch-pin.txt").read_text() == "torch==2.13.0\n"
