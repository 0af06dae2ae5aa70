"""distsgd-report on a real study, and the HParams entry of a sweep's runs.

The study: a Hydra multirun over batch size and seed, a run resumed (with another learning rate)
from a checkpoint before its end, and an LR range test; one report over all three folders.
"""

from __future__ import annotations

import csv
import itertools
import warnings
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
import pytest
from conftest import CONF, REPO, make_config, read_scalars, subprocess_env
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, ScalarEvent
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from distsgd import lr_find
from distsgd import report as report_module
from distsgd.config import varied_keys
from distsgd.metrics import hparams_entry
from distsgd.report import Run, SampleAxes, find_runs, label, log_scale, main, plot_curves, plot_seeds, plot_sweep
from distsgd.train import run

COMMON = ["data.num_samples=256", "model.width=8", "trainer.max_steps=8", "trainer.log_every=2",
          "trainer.val_every=4", "trainer.device=cpu"]
# Jobs as named by their overrides, trainer.log_every, trainer.val_every and trainer.device left out.
JOBS = {(batch, seed): f"data.global_batch_size={batch},data.num_samples=256,model.width=8,trainer.max_steps=8,"
        f"trainer.seed={seed}" for batch in (32, 64) for seed in (0, 1)}
RESUMED_AT = 5  # between the validations at 4 and 8: the best value so far lies before the resume
SWEPT = ["data.global_batch_size", "optim.lr", "trainer.seed"]  # in the config's order


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    done = subprocess.run(
        [sys.executable, "-m", "distsgd.train", "-m", "data.global_batch_size=32,64", "trainer.seed=0,1",
         f"hydra.sweep.dir={root / 'sweep'}", *COMMON],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = root / "resumed"
    run(make_config(*COMMON, "optim.lr=0.05", f"trainer.checkpoint_every={RESUMED_AT}"), resumed)
    # Resumed after its end from an earlier checkpoint, at a rate that makes the later values worse.
    run(make_config(*COMMON, "optim.lr=5", "trainer.resume_override=true",
                    f"trainer.resume={resumed / 'checkpoints' / f'step_{RESUMED_AT:08d}.pt'}"), resumed)
    lr_find.run(make_config(*COMMON, "lr_find.steps=20"), root / "lr_find")
    main([str(root / "sweep"), str(resumed), str(root / "lr_find"), "--out", str(root / "report")])
    return root


def csv_rows(study: Path) -> list[dict]:
    with (study / "report" / "scalars.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_sweep_jobs_are_named_by_what_they_vary(study):
    assert sorted(p.name for p in (study / "sweep").iterdir()) == sorted(JOBS.values()) + ["multirun.yaml"]


def test_the_csv_holds_exactly_the_logged_points_with_each_runs_overrides(study):
    rows = csv_rows(study)
    runs = {f"sweep/{name}": study / "sweep" / name for name in JOBS.values()} | {"resumed": study / "resumed"}
    for name, run_dir in runs.items():
        written: dict[str, list] = {}
        for row in rows:
            if row["run"] == name:
                written.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
        assert written == read_scalars(run_dir), name
    job = next(row for row in rows if row["run"] == f"sweep/{JOBS[32, 1]}")
    assert (job["data.global_batch_size"], job["trainer.seed"], job["trainer.device"]) == ("32", "1", "cpu")
    # A run started from Python has no .hydra/overrides.yaml: its override columns are empty.
    resumed = next(row for row in rows if row["run"] == "resumed")
    assert {resumed[key] for key in ("data.global_batch_size", "trainer.seed", "trainer.device")} == {""}
    lr_rows = [row for row in rows if row["run"] == "lr_find" and row["tag"] == "lr_find/lr"]
    assert [int(row["step"]) for row in lr_rows] == list(range(20))


def test_a_resumed_run_counts_each_step_once_with_the_resumed_values(study):
    lr = [(int(row["step"]), float(row["value"])) for row in csv_rows(study)
          if row["run"] == "resumed" and row["tag"] == "train/lr"]
    # Logged every 2 steps and at the last; the first run's points from step 5 on were purged.
    assert lr == [(0, pytest.approx(0.05)), (2, pytest.approx(0.05)), (4, pytest.approx(0.05)), (6, 5.0), (7, 5.0)]


def test_the_best_validation_values_span_the_resume(study):
    curves = read_scalars(study / "resumed")
    losses = {step: value for step, value in curves["val/loss"]}
    best_step = min(losses, key=losses.get)
    assert best_step < RESUMED_AT, "the setup no longer puts the best value before the resume"
    assert curves["val/best_loss"][-1] == (8, losses[best_step])
    accuracies = [value for _, value in curves["val/accuracy"]]
    assert curves["val/best_accuracy"][-1][1] == max(accuracies)


def test_the_table_leads_with_the_swept_keys(study):
    lines = (study / "report" / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| "))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[:4] == SWEPT + ["final val/loss"]
    assert columns[-5:] == ["steps", "wall time (s)", "skipped steps", "diverged", "run"]
    rows = list(itertools.takewhile(lambda line: line.startswith("| "), lines[lines.index(header) + 2:]))
    assert len(rows) == 5  # the four jobs and the resumed run; the LR range test has a table of its own
    resumed = next(row for row in rows if "(../resumed)" in row)
    assert [cell.strip() for cell in resumed.strip("|").split("|")][:3] == ["64", "5", "0"]


def test_the_figures_are_pngs_and_the_report_links_each_one(study):
    out = study / "report"
    figures = sorted(out.rglob("*.png"))
    names = {str(path.relative_to(out / "figures")) for path in figures}
    # Batch sizes differ: each curve figure has step, samples and epoch panels.
    assert {"curves/train/loss.png", "curves/val/best_loss.png", "sweep/data.global_batch_size.png",
            "sweep/optim.lr.png", "seeds/val/loss.png", "lr_find.png"} <= names
    # The runs differ in batch size: a curve is drawn against step, samples seen and epochs.
    assert png_width(out / "figures/curves/train/loss.png") == 3 * png_width(out / "figures/seeds/val/loss.png")
    report = (out / "report.md").read_text()
    for path in figures:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
        assert f"({path.relative_to(out)})" in report, path


def png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR, the first chunk


def test_samples_seen_and_epochs_follow_each_runs_batch_size(study):
    runs = {run.config["data.global_batch_size"]: run for run in find_runs([study / "sweep"])}
    axes = SampleAxes(list(runs.values()))
    steps = np.array([0.0, 4.0])
    assert axes.wanted
    # 256 samples, 51 of them for validation: 205 training samples, an epoch of 3 steps at batch 64
    # (the trainer drops the last partial batch): step 4 is step 1 of epoch 1.
    assert axes.samples(runs[32], steps).tolist() == [0, 128]
    assert axes.epochs(runs[64], steps).tolist() == [0, 1 + 1 / 3]


# 512 samples, 410 for training: epoch 0 in 12 steps of 32, epochs 1 and 2 in 6 steps of 64 each.
GROWING = ["data.num_samples=512", "data.global_batch_size=32", "data.batch_milestones=[1]", "data.batch_growth=2",
           "model.width=8", "trainer.max_epochs=3", "trainer.log_every=5", "trainer.val_every=10", "trainer.device=cpu"]


def test_a_growing_runs_points_sit_at_the_samples_and_epochs_of_the_updates_before_them(tmp_path):
    run(make_config(*GROWING), tmp_path)
    [logged] = find_runs([tmp_path])
    steps = np.array([p.step for p in logged.curves["val/loss"]], dtype=float)
    assert steps.tolist() == [0, 10, 20, 24]
    # After its 24 updates, the trainer has trained on 1152 samples in its 3 epochs (trainer.max_epochs).
    trained = logged.curves["train/samples"][-1]
    assert (trained.step, trained.value) == (23, 1152)
    axes = SampleAxes([logged])
    assert axes.wanted
    assert axes.samples(logged, steps).tolist() == [0, 320, 896, 1152]
    assert axes.epochs(logged, steps).tolist() == pytest.approx([0, 10 / 12, 2 + 2 / 6, 3], rel=1e-15)
    # train/loss at step t was measured before update t: at the samples of the t updates before it.
    train_steps = np.array([p.step for p in logged.curves["train/loss"]], dtype=float)
    assert axes.samples(logged, train_steps).tolist() == [0, 160, 320, 576, 896, 1088]
    # Without a config, from the logged curves alone: the same samples (none clamped to the last
    # logged step's), and no epochs, which need the dataset's size.
    bare = Run("bare", tmp_path, {}, {}, logged.curves)
    assert axes.samples(bare, steps).tolist() == [0, 320, 896, 1152]
    assert axes.samples(bare, train_steps).tolist() == [0, 160, 320, 576, 896, 1088]
    assert axes.epochs(bare, steps) is None


def hparams_content(run_dir: Path) -> dict[str, bytes]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events.PluginTagToContent("hparams")


SHOWN_METRICS = ["val/loss", "val/accuracy", "val/best_loss", "val/best_accuracy", "train/loss"]


def shown_by_default(experiment) -> tuple[list[str], list[str]]:
    """The hparams and metrics that TensorBoard's HParams dashboard (2.21) shows before a user
    picks columns: the first five hparams once ordered by `differs`, then by name (its backend
    sorts them so), and the first five metrics of the experiment."""
    hparams = sorted(experiment.hparam_infos, key=lambda info: (not info.differs, info.name))
    return [info.name for info in hparams[:5]], [info.name.tag for info in experiment.metric_infos[:5]]


def test_a_sweep_job_leads_its_hparams_with_the_swept_keys_and_reports_the_best_values(study):
    content = hparams_content(study / "sweep" / JOBS[32, 1])
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    # The swept keys alone, so that the dashboard shows them and then the metrics: with any other
    # key in the entry it would show unvaried keys (the first five keys) before val/loss.
    assert [info.name for info in experiment.hparam_infos] == ["data.global_batch_size", "trainer.seed"]
    assert all(info.differs for info in experiment.hparam_infos)
    assert shown_by_default(experiment) == (["data.global_batch_size", "trainer.seed"], SHOWN_METRICS)
    assert {"val/best_loss", "val/best_accuracy", "val/loss"} <= {info.name.tag for info in experiment.metric_infos}
    hparams = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert (hparams["data.global_batch_size"].number_value, hparams["trainer.seed"].number_value) == (32, 1)
    end = HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    assert end.status == Status.Value("STATUS_SUCCESS")
    # The whole config, unvaried keys too, in the Text dashboard.
    events = EventAccumulator(str(study / "sweep" / JOBS[32, 1] / "tensorboard"))
    events.Reload()
    [text] = events.Tensors("config/text_summary")
    config = yaml.safe_load(text.tensor_proto.string_val[0].decode().strip("`").removeprefix("yaml\n"))
    assert (config["data"]["global_batch_size"], config["trainer"]["seed"], config["optim"]["name"]) == (32, 1, "sgd")


def test_a_run_resumed_into_a_new_folder_leads_its_hparams_metrics_with_the_validation_values(study, tmp_path):
    # From step 5 with validations every 4 steps, it logs train/* before its first val/*.
    # (TensorBoard shows the first HParams entry of a folder: the resumed run's, in a folder of its own.)
    checkpoint = study / "resumed" / "checkpoints" / f"step_{RESUMED_AT:08d}.pt"
    run(make_config(*COMMON, "optim.lr=0.05", f"trainer.resume={checkpoint}"), tmp_path)
    experiment = HParamsPluginData.FromString(hparams_content(tmp_path)["_hparams_/experiment"]).experiment
    assert shown_by_default(experiment)[1] == SHOWN_METRICS


def test_the_hparams_entry_holds_the_varied_keys_even_those_that_cannot_change_a_result():
    config = {"data.in_memory": True, "optim.name": "sgd", "optim.lr": 0.1, "trainer.device": "cpu",
              "trainer.compile": False, "lr_find.steps": 100, "diagnostics.layers": False}
    # A swept config group stands for its name.
    assert list(hparams_entry(config, ["trainer.compile", "optim"])) == ["trainer.compile", "optim.name"]
    assert hparams_entry(config, []) == {}


def test_a_single_run_varies_what_its_command_line_sets_that_can_change_its_result(monkeypatch):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["optim=adam", "trainer.device=cpu", "optim.lr=0.01", "trainer.log_every=5"],
                      return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.masked_copy(cfg, "hydra"))
    assert varied_keys() == ["optim", "optim.lr"]


def test_log_axes_for_learning_rates_and_wide_ranges():
    assert log_scale("optim.lr", [0.05, 0.1]) and log_scale("lr_find.max_lr", [1.0, 10.0])
    assert log_scale("data.global_batch_size", [32, 4096]) and not log_scale("data.global_batch_size", [32, 256])
    assert not log_scale("optim.momentum", [0.0, 0.9])


def test_report_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"distsgd-report: error: no runs under {tmp_path}: a run folder holds "
                                       "tensorboard/ or lr_find.csv\n")


def test_figures_of_many_runs_keep_their_plot_and_name_no_run(tmp_path):
    # 80 runs: 20 rates x 2 batch sizes x 2 seeds: 40 lines against the batch size, 40 pairs of seeds.
    keys = ["optim.lr", "data.global_batch_size", "trainer.seed"]
    runs = [Run(f"run{i}", tmp_path, {}, {"optim": {"lr": 0.01 * (1 + i % 20)}, "data": {"global_batch_size": 32 << i // 40},
                                          "trainer": {"seed": i // 20 % 2}},
                {"val/loss": [ScalarEvent(0.0, s, 1.0 / (s + i + 1)) for s in range(3)]}) for i in range(80)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = [*plot_curves(runs, keys, SampleAxes(runs), tmp_path).values(),
                 *plot_sweep(runs, keys, ["val/loss"], tmp_path).values(),
                 *plot_seeds(runs, keys, ["val/loss"], tmp_path).values()]
    assert len(paths) == 4 and all(path.read_bytes().startswith(b"\x89PNG") for path in paths)
    assert not [w for w in caught if "constrained_layout" in str(w.message)]


def write_run(run_dir: Path, config: dict, curves: dict[str, list[tuple[int, float]]]) -> None:
    """A run folder as distsgd leaves one, without training: its config and its curves."""
    from torch.utils.tensorboard import SummaryWriter

    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for tag, points in curves.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)


@pytest.fixture
def diverging_sweep(tmp_path) -> Path:
    """optim.lr=0.1: 3 seeds that finish; optim.lr=1.0: seed 0 finishes best of all, seed 1 stopped
    at step 6 (diverged.json) after a finite validation at step 4, seed 2's final loss is nan."""
    nan = float("nan")
    ends = {(0.1, 0): (1.0, 0.7), (0.1, 1): (1.1, 0.6), (0.1, 2): (0.9, 0.8), (1.0, 0): (0.5, 0.9),
            (1.0, 1): (0.6, 0.85), (1.0, 2): (nan, 0.1)}
    for (lr, seed), (loss, accuracy) in ends.items():
        steps = [0, 4] if (lr, seed) == (1.0, 1) else [0, 4, 8]
        write_run(tmp_path / f"lr{lr}_seed{seed}", {"optim": {"lr": lr}, "trainer": {"seed": seed}},
                  {"val/loss": [(s, 2.0) for s in steps[:-1]] + [(steps[-1], loss)],
                   "val/accuracy": [(s, 0.3) for s in steps[:-1]] + [(steps[-1], accuracy)]})
    (tmp_path / "lr1.0_seed1" / "diverged.json").write_text(
        '{"step": 6, "message": "non-finite loss", "checkpoint": "checkpoints/step_00000004.pt"}')
    return tmp_path


def test_diverged_seeds_are_counted_and_drawn_at_the_worse_edge_never_averaged(diverging_sweep, monkeypatch):
    drawn, save = {}, report_module._save

    def keep(figure, path):
        drawn[path.relative_to(diverging_sweep / "report" / "figures").as_posix()] = figure
        return save(figure, path)

    monkeypatch.setattr(report_module, "_save", keep)
    main([str(diverging_sweep)])
    for panel, tag in zip(drawn["sweep/optim.lr.png"].axes, ["val/loss", "val/accuracy"]):
        assert panel.get_title() == f"{tag} against optim.lr"
        # The finished seeds of optim.lr=0.1 are averaged; optim.lr=1.0 has no average (it was 0.55 for the loss).
        [final] = [bars.lines[0] for bars in panel.containers if bars.get_label() == "final"]
        assert final.get_xdata().tolist() == [0.1]
        assert final.get_ydata().tolist() == pytest.approx([1.0 if tag == "val/loss" else 0.7])
        [mark] = [line for line in panel.lines if line.get_marker() == "X"]
        # At optim.lr=1.0, on the edge where the metric is worst: the top for a loss, the bottom for accuracy.
        assert mark.get_xdata().tolist() == [1.0]
        x, y = mark.get_transform().transform([[1.0, mark.get_ydata()[0]]])[0]
        box = panel.get_window_extent()
        assert y == pytest.approx(box.y1 if tag == "val/loss" else box.y0)
        assert [text.get_text() for text in panel.texts] == ["2/3 diverged"]
    seeds = drawn["seeds/val/loss.png"].axes[0]
    names = seeds.get_legend_handles_labels()[1]
    assert {"optim.lr=0.1 (3 seeds)", "optim.lr=1.0 (3 seeds, 2/3 diverged)"} <= set(names)
    # Each diverged seed marked where it diverged: step 6 (its diverged.json), step 8 (its nan).
    assert sorted(line.get_xdata()[0] for line in seeds.lines if line.get_marker() == "X") == [6, 8]

    lines = (diverging_sweep / "report" / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| "))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = list(itertools.takewhile(lambda line: line.startswith("| "), lines[lines.index(header) + 2:]))
    diverged = {tuple(cells[:2]): cells[columns.index("diverged")] for cells in
                ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)}
    assert diverged == {("0.1", "0"): "no", ("0.1", "1"): "no", ("0.1", "2"): "no", ("1", "0"): "no",
                        ("1", "1"): "stopped at step 6", ("1", "2"): "non-finite final val/loss"}
    sweep = lines[lines.index("## Against each swept key"):]
    assert "- optim.lr=1.0: 2/3 diverged" in sweep and not [line for line in sweep if "optim.lr=0.1:" in line]


def test_a_diverged_json_that_distsgd_did_not_write_is_one_line(tmp_path, capsys):
    write_run(tmp_path / "run", {"optim": {"lr": 0.1}}, {"val/loss": [(0, 1.0)]})
    (tmp_path / "run" / "diverged.json").write_text("step 6")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"distsgd-report: error: {tmp_path / 'run' / 'diverged.json'}: not what "
                                       'distsgd writes when a run diverges ({"step": <int>, ...})\n')


def test_a_legend_names_a_run_by_its_values_or_by_its_folder_when_they_run_long(tmp_path):
    run = Run("lr-0.1", tmp_path, {}, {"optim": {"lr": 0.1, "name": "sgd"}, "data": {"name": "text"}})
    assert label(run, ["optim.lr", "optim.name"]) == "optim.lr=0.1, optim.name=sgd"
    assert label(run, []) == "lr-0.1"
    # Two runs that differ in a dozen keys: such a label squeezed the curves' axes to nothing.
    many = Run("gpt_char", tmp_path, {}, {"optim": {f"key{i}": 1000 + i for i in range(12)}})
    assert label(many, [f"optim.key{i}" for i in range(12)]) == "gpt_char"
