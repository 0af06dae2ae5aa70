"""The reproduction studies' harness (distsgd.studies.runs and scripts/reproduce.py); each study's
own claim is tested in tests/test_study_<name>.py."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from conftest import CONF, make_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import distsgd.studies
from distsgd import figures
from distsgd.studies import STUDIES, adaptive, main, momentum, runs, study

TINY = ["data.num_samples=256", "model.width=8", "trainer.max_steps=6", "trainer.log_every=2", "trainer.device=cpu"]


def test_runs_train_as_their_recorded_commands_and_a_divergence_is_a_result(tmp_path):
    # A folder named as Hydra names a sweep job's: '=' and ',' are grammar to Hydra, ' ' to the shell.
    out = tmp_path / "multirun" / "optim.lr=0.1,trainer.seed=1 x"
    results = runs.train_all(out, {"calm": [*TINY, "optim.lr=0.1"],
                                        "stopped": [*TINY, "optim.lr=1e6", "trainer.max_consecutive_skips=2"],
                                        "ended": [*TINY, "optim.lr=1e6"]})
    calm, stopped, ended = results.values()
    assert calm.diverged is None and set(calm.final) >= {"val/loss", "train/loss"}
    steps, values = calm.curve("train/loss")
    assert list(steps) == [0, 2, 4, 5] and np.isfinite(values).all()
    assert stopped.final == {} and "stopped after 3 consecutive non-finite steps" in stopped.diverged
    assert ended.final["train/skipped_steps"] > 0 and ended.diverged.startswith("ended with train/loss nan")
    # Each command line, read by the shell and then by Hydra, composes the very config the run
    # trained with, in the run's own folder.
    commands = (out / "commands.sh").read_text().splitlines()
    assert len(commands) == 3
    for command, result in zip(commands, results.values()):
        program, *overrides = shlex.split(command)
        assert program == "distsgd-train"
        with initialize_config_dir(str(CONF), version_base="1.3"):
            composed = compose("config", overrides=overrides, return_hydra_config=True)
        assert composed.hydra.run.dir == str(result.path)
        assert OmegaConf.load(result.path / ".hydra" / "config.yaml") == make_config(*overrides[1:])
        assert overrides[0].startswith("hydra.run.dir=")
    assert runs.first_step_at_or_below(steps, values, values[1]) == 2
    assert runs.first_step_at_or_below(steps, values, -1.0) == float("inf")


def test_an_outcome_writes_its_verdict_numbers_and_figure_links(tmp_path):
    fig, axes = figures.figure(ncols=2)
    axes[0, 0].plot([1, 2], [3, 4])
    png = runs.save(fig, tmp_path / "curves.png")
    runs.Outcome("A claim", "It held: 3 < 4.", True, {"steps": {"sgd": 4, "momentum": 3}}, [png]).write(tmp_path)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "numbers.json").read_text()) == {"steps": {"sgd": 4, "momentum": 3}}
    assert (tmp_path / "verdict.md").read_text() == (
        "# A claim\n\nIt held: 3 < 4.\n\nClaim holds on the held-out seeds at this scale.\n\n![curves](curves.png)\n")


def test_every_study_is_importable_and_an_unknown_one_is_refused(capsys):
    for name in STUDIES:
        module = study(name)
        assert module.TITLE and callable(module.run), name
    with pytest.raises(SystemExit) as exit_:
        main(["nonesuch"])
    assert exit_.value.code == 2 and "invalid choice: 'nonesuch'" in capsys.readouterr().err


def test_a_study_under_torchrun_is_refused_with_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        main(["momentum", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "reproduce.py: error: a study runs in one process, not as one of 2 (torchrun or srun); run it with python, "
        "and any of its commands.sh lines under torchrun")
    assert not any(tmp_path.iterdir())


def test_a_study_replaces_only_a_folder_that_a_study_wrote(capsys, monkeypatch, tmp_path):
    ran = []

    class Study:
        @staticmethod
        def run(out, quick=False):
            ran.append(out)
            return runs.Outcome("A claim", "It held.", True)

    monkeypatch.setattr(distsgd.studies, "study", lambda name: Study)
    mine = tmp_path / "momentum"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(SystemExit) as exit_:
        main(["all", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and ran == []
    assert capsys.readouterr().err == (
        f"reproduce.py: error: {mine} exists and holds no verdict.md or commands.sh, so no study wrote it; a study "
        "replaces only its own folder: move it, or choose another --out\n")
    assert (mine / "notes.txt").read_text() == "kept"
    # A study's folder, from an earlier run, is replaced.
    (mine / "commands.sh").write_text("distsgd-train\n")
    main(["momentum", "--out", str(tmp_path)])
    assert ran == [mine] and sorted(p.name for p in mine.iterdir()) == ["numbers.json", "verdict.md"]
    assert f"momentum: replacing {mine}" in capsys.readouterr().out


def test_the_files_a_study_writes_are_named_for_hydra_too(tmp_path):
    """Studies that train on a file they write name it in an override: in a folder such as a
    sweep job's, that override must still compose to the file."""
    folder = tmp_path / "optim.lr=0.1,trainer.seed=1"
    quadratic = momentum.make_quadratic(folder / "quadratic.npz", momentum.QUICK)
    wilson = adaptive.make_wilson(folder / "wilson.npz", adaptive.QUICK.wilson)
    for overrides in [*momentum.plan(quadratic, momentum.QUICK).values(),
                      *adaptive.wilson_plan(adaptive.QUICK.wilson, wilson).values()]:
        assert runs.compose_config(overrides).data.path in (str(quadratic.path), str(wilson.path))
