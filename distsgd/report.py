"""A study at a glance: every run's curves as one CSV, figures and a Markdown table.

    distsgd-report multirun/2026-11-25_13-17-11              # a sweep (or: python -m distsgd.report)
    distsgd-report outputs/adam multirun/lr_sweep --out study  # runs and sweeps mixed

A run is a folder holding ``tensorboard/`` (training) or ``lr_find.csv`` (distsgd.lr_find); each
PATH is searched for them. A run's config is its ``.hydra/config.yaml``, or else the one its newest
checkpoint holds (a run started from Python has no ``.hydra/``); its overrides are
``.hydra/overrides.yaml``. Swept keys are the config keys whose values differ between the runs,
less those that cannot change a result (distsgd.config.RESULT_NEUTRAL_KEYS) and, for training
runs, those that training never reads (LR_FIND_KEYS). Written into DIR (default
``<first PATH>/report``):

- ``scalars.csv``: one row per run, tag, step: value, wall time, then the run's overrides;
- ``figures/curves/<tag>.png``: every run's curve against step, and against samples seen and
  epochs where the runs differ in batch size or a run's batch grows (a point logged at step t at
  the samples of the t updates before it, epochs as the trainer counts them; both exact from the
  run's config, or read off its train/samples curve where it kept no config);
- ``figures/sweep/<key>.png``: final and best metrics against each swept key, averaged over seeds,
  a point with diverged seeds marked at the worse edge with their count;
- ``figures/seeds/<metric>.png``: mean and range over runs that differ only in ``trainer.seed``,
  the diverged seeds apart;
- ``figures/lr_find.png``: the LR range tests' curves;
- ``report.md``: one row per run, the swept keys first, whether it diverged, links to the figures
  and the points with diverged seeds.

A run counts as diverged when its folder holds ``diverged.json`` or the final value of one of its
metrics is non-finite (``divergence``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from omegaconf import OmegaConf

from distsgd import figures
from distsgd.config import LR_FIND_KEYS, RESULT_NEUTRAL_KEYS, ConfigError, key_in, to_config
from distsgd.metrics import BEST, DIVERGED_MARKER, flatten, read_scalars

if TYPE_CHECKING:
    from distsgd.data import BatchSchedule

SEED = "trainer.seed"
BATCH = "data.global_batch_size"
LR_FIND_COLUMNS = ("lr", "loss", "smoothed_loss")
# Beyond this many lines a figure names none: a legend that long crowds out the plot.
LEGEND_RUNS = 16
# A legend entry longer than this squeezes the axes to nothing (matplotlib's constrained layout).
LABEL_CHARS = 60


@dataclass
class Run:
    name: str
    path: Path
    overrides: dict[str, str]  # as .hydra/overrides.yaml writes them, by key (or config group)
    tree: dict  # the nested config; empty when the run kept none
    curves: dict = field(default_factory=dict)  # tag -> [ScalarEvent(wall_time, step, value)]
    lr_find: dict[str, list[float]] | None = None  # lr_find.csv by column
    diverged: dict | None = None  # its diverged.json: training stopped on non-finite values
    config: dict = field(init=False)  # the tree as flat group.key entries

    def __post_init__(self) -> None:
        self.config = flatten(self.tree)


def read_run(path: Path, name: str) -> Run:
    """One run folder: its curves through TensorBoard's loader (metrics.read_scalars), its
    config, overrides, LR range test and diverged.json."""
    overrides_file = path / ".hydra" / "overrides.yaml"
    parsed = OverridesParser.create().parse_overrides(list(OmegaConf.load(overrides_file))) \
        if overrides_file.is_file() else []
    lr_find = None
    if (path / "lr_find.csv").is_file():
        with (path / "lr_find.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        lr_find = {column: [float(row[column]) for row in rows] for column in LR_FIND_COLUMNS}
    return Run(name, path, {o.key_or_group: o.get_value_element_as_str() for o in parsed if not o.is_delete()},
               _config_tree(path), read_scalars(path / "tensorboard") if (path / "tensorboard").is_dir() else {},
               lr_find, _diverged(path / DIVERGED_MARKER))


def _diverged(marker: Path) -> dict | None:
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text())
    except json.JSONDecodeError:
        content = None
    if not isinstance(content, dict) or not isinstance(content.get("step"), int):
        raise ConfigError(f"{marker}: not what distsgd writes when a run diverges ({{\"step\": <int>, ...}})")
    return content


def _config_tree(path: Path) -> dict:
    if (path / ".hydra" / "config.yaml").is_file():
        return OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"))
    checkpoints = sorted((path / "checkpoints").glob("*.pt"), key=lambda p: (p.name == "last.pt", p.name))
    if not checkpoints:
        return {}
    import torch  # only for runs without .hydra/; mmap reads the config, not the tensors

    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True, mmap=True)
    return OmegaConf.to_container(OmegaConf.create(state["config"]))


def find_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run folder under ``paths`` (a run folder itself, or any folder above run folders)."""
    found: list[tuple[Path, Path]] = []
    for root in paths:
        if not root.is_dir():
            raise ConfigError(f"{root}: no such folder")
        marks = [p for p in root.rglob("tensorboard") if p.is_dir()] + list(root.rglob("lr_find.csv"))
        folders = sorted({mark.parent for mark in marks if "tensorboard" not in mark.parent.relative_to(root).parts})
        found += [(root, folder) for folder in folders]
    if not found:
        raise ConfigError(f"no runs under {', '.join(map(str, paths))}: a run folder holds tensorboard/ or lr_find.csv")
    names = [str(folder.relative_to(root)) if len(paths) == 1 else str(root.name / folder.relative_to(root))
             for root, folder in found]
    names = [root.name if name == "." else name for name, (root, _) in zip(names, found)]
    if len(set(names)) < len(names):
        names = [str(folder) for _, folder in found]
    return [read_run(folder, name) for name, (_, folder) in zip(names, found)]


def differing_keys(runs: Sequence[Run], left_out: tuple[str, ...]) -> list[str]:
    """The config keys whose known values differ between ``runs``, in config order."""
    configs = [run.config for run in runs]
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if not key_in(key, left_out)
            and len({repr(config[key]) for config in configs if key in config}) > 1]


def _order(value: object) -> tuple:
    # Numbers by value, then everything else as text; a run that lacks the key last.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value)) if value is not None else (2, 0.0, "")


def label(run: Run, keys: Sequence[str]) -> str:
    """A legend's name for the run: its values of ``keys``, or its folder's name where those would
    run longer than LABEL_CHARS (runs that differ in many keys; report.md's table gives them all)."""
    shown = ", ".join(f"{key}={run.config[key]}" for key in keys if key in run.config)
    return shown if shown and len(shown) <= LABEL_CHARS else run.name


def metric_tags(runs: Sequence[Run]) -> list[str]:
    """The validation curves (their best-so-far companions aside) and the training loss."""
    tags = {tag for run in runs for tag in run.curves}
    best = {best_tag for best_tag, _ in BEST.values()}
    val = sorted((tag for tag in tags if tag.startswith("val/") and tag not in best),
                 key=lambda tag: (tag != "val/loss", tag))
    return val + (["train/loss"] if "train/loss" in tags else [])


def better(tag: str) -> Callable[[Sequence[float]], float]:
    return max if "accuracy" in tag else min


def metric(run: Run, tag: str, kind: str) -> float | None:
    """The ``final`` or ``best`` (finite) value of a run's curve."""
    values = [point.value for point in run.curves.get(tag, [])]
    if kind == "final":
        return values[-1] if values else None
    finite = [value for value in values if math.isfinite(value)]
    return better(tag)(finite) if finite else None


class Divergence(NamedTuple):
    step: int  # where it diverged: the step diverged.json names, or the first non-finite value's
    why: str


def divergence(run: Run, tags: Sequence[str]) -> Divergence | None:
    """Why ``run`` counts as diverged, None when it did not: it holds diverged.json, or the final
    value of one of the metrics ``tags`` is non-finite. The whole run counts, on every metric: an
    accuracy computed from a model whose loss went non-finite says nothing about its rate."""
    if run.diverged is not None:
        return Divergence(run.diverged["step"], f"stopped at step {run.diverged['step']}")
    bad = [tag for tag in tags if run.curves.get(tag) and not math.isfinite(run.curves[tag][-1].value)]
    if not bad:
        return None
    step = min(p.step for tag in bad for p in run.curves[tag] if not math.isfinite(p.value))
    return Divergence(step, f"non-finite final {', '.join(bad)}")


def summary(run: Run, tags: Sequence[str]) -> dict[str, float | str | None]:
    """Final and best value of each metric, steps trained, wall time, skipped steps, divergence."""
    row = {f"{kind} {tag}": metric(run, tag, kind) for tag in tags for kind in ("final", "best")}
    points = [(tag, point) for tag, curve in run.curves.items() for point in curve]
    # A train/* point at step t describes update t; a val/* point comes after t updates.
    row["steps"] = max((point.step + (not tag.startswith("val/")) for tag, point in points), default=None)
    times = [point.wall_time for _, point in points]
    row["wall time (s)"] = max(times) - min(times) if times else None
    skipped = run.curves.get("train/skipped_steps")
    row["skipped steps"] = skipped[-1].value if skipped else None
    diverged = divergence(run, tags)
    row["diverged"] = diverged.why if diverged else "no"
    return row


def write_csv(runs: Sequence[Run], path: Path) -> None:
    override_keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "tag", "step", "value", "wall_time", *override_keys])
        for run in runs:
            overrides = [run.overrides.get(key, "") for key in override_keys]
            for tag, curve in run.curves.items():
                writer.writerows([run.name, tag, p.step, p.value, p.wall_time, *overrides] for p in curve)
            for column, values in (run.lr_find or {}).items():
                writer.writerows([run.name, f"lr_find/{column}", i, v, "", *overrides] for i, v in enumerate(values))


def _figure(panels: int) -> tuple[Figure, list]:
    figure, axes = figures.figure(ncols=panels, width=5.5, height=4)
    return figure, list(axes[0])


def _legend(figure: Figure, ax, what: str) -> None:
    """The legend of ``ax``, unless it has more than LEGEND_RUNS entries: then a line saying so."""
    count = len(ax.get_legend_handles_labels()[0])
    if count <= LEGEND_RUNS:
        ax.legend(fontsize="small")
    else:
        figure.suptitle(f"{count} {what}, too many to name here: report.md lists the runs", fontsize="small")


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


class SampleAxes:
    """Samples seen and epochs at a run's steps, where the runs differ in batch size or a run's
    batch grows. A point logged at step t sits at the samples of updates 0..t-1 on every axis: a
    val/* point was measured after t updates, a train/* point (which describes update t) before it."""

    def __init__(self, runs: Sequence[Run]):
        batches = {run.config.get(BATCH) for run in runs}
        self.wanted = len(batches) > 1 or any(
            len({p.value for p in run.curves.get("train/global_batch_size", [])}) > 1 for run in runs)
        self.schedules: dict[str, BatchSchedule | None] = {}

    def samples(self, run: Run, steps: np.ndarray) -> np.ndarray | None:
        schedule = self._schedule(run)
        if schedule is not None:
            return np.array([schedule.samples_before(int(step)) for step in steps], dtype=float)
        return self._logged_samples(run, steps)

    def epochs(self, run: Run, steps: np.ndarray) -> np.ndarray | None:
        """Epochs as the trainer counts them (each epoch drops its last partial batch), exact."""
        schedule = self._schedule(run)
        if schedule is None:
            return None
        return np.array([float(schedule.epochs_at(int(step))) for step in steps])

    def _schedule(self, run: Run) -> BatchSchedule | None:
        """The run's batch schedule, from its config and its dataset's size (None without a config,
        or when its data is not on this machine)."""
        if not run.tree:
            return None
        key = repr(run.tree.get("data"))
        if key not in self.schedules:
            from distsgd import data  # torch: only for the reports that draw these axes

            try:
                cfg = to_config(OmegaConf.create(run.tree)).data
                self.schedules[key] = data.BatchSchedule.of(cfg, data.train_size(cfg))
            except ConfigError:
                self.schedules[key] = None
        return self.schedules[key]

    @staticmethod
    def _logged_samples(run: Run, steps: np.ndarray) -> np.ndarray | None:
        """Samples before each step, from train/samples (which counts update t's own batch, so it
        is also the samples before step t + 1), linear between the logged steps and beyond them
        at the nearest logged batch."""
        samples, batches = run.curves.get("train/samples"), run.curves.get("train/global_batch_size")
        if not samples or not batches:
            return None
        before = {}
        for point, batch in zip(samples, batches):
            before[point.step], before[point.step + 1] = point.value - batch.value, point.value
        known = np.array(sorted(before), dtype=float)
        seen = np.array([before[step] for step in sorted(before)])
        inside = np.interp(steps, known, seen)
        after = seen[-1] + (steps - known[-1]) * batches[-1].value
        ahead = seen[0] - (known[0] - steps) * batches[0].value
        return np.where(steps > known[-1], after, np.where(steps < known[0], ahead, inside))


def plot_curves(runs: Sequence[Run], keys: Sequence[str], axes_of: SampleAxes, out: Path) -> dict[str, Path]:
    """Per tag, every run's curve against step (and samples seen and epochs)."""
    figures = {}
    tags = list(dict.fromkeys(tag for run in runs for tag in run.curves))
    xs = [("step", None)] + ([("samples seen", axes_of.samples), ("epochs", axes_of.epochs)] if axes_of.wanted else [])
    for tag in tags:
        figure, axes = _figure(len(xs))
        for run in runs:
            curve = run.curves.get(tag, [])
            steps = np.array([p.step for p in curve], dtype=float)
            for ax, (_, to_x) in zip(axes, xs):
                x = steps if to_x is None else to_x(run, steps)
                if len(curve) and x is not None:
                    ax.plot(x, [p.value for p in curve], label=label(run, keys), linewidth=1.2)
        for ax, (name, _) in zip(axes, xs):
            ax.set(xlabel=name, ylabel=tag, title=tag)
            ax.grid(alpha=0.3)
        _legend(figure, axes[0], "runs")
        figures[tag] = _save(figure, out / "curves" / f"{tag}.png")
    return figures


def log_scale(key: str, values: Sequence[float]) -> bool:
    """Learning rates, and any positive values spanning two decades or more, read on a log axis."""
    positive = all(v > 0 for v in values)
    return positive and (key.endswith("lr") or (len(values) > 1 and max(values) / min(values) >= 100))


def _groups(runs: Sequence[Run], keys: Sequence[str]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(repr(run.config.get(key)) for key in keys), []).append(run)
    return groups


def plot_sweep(runs: Sequence[Run], keys: Sequence[str], tags: Sequence[str], out: Path) -> dict[str, Path]:
    """Per swept key, the final and best value of each metric against it; runs that differ in
    other swept keys are separate lines, seeds are averaged (bars: their range). A point with a
    diverged seed (``divergence``) is no average: it is an X at the worse edge of each panel (the
    top, the bottom for accuracy), with its count of diverged seeds."""
    figures = {}
    for key in [key for key in keys if key != SEED]:
        values = sorted({repr(run.config[key]): run.config[key] for run in runs if key in run.config}.values(),
                        key=_order)
        numeric = all(_order(value)[0] == 0 for value in values)
        position = {repr(v): (float(v) if numeric else i) for i, v in enumerate(values)}
        others = [other for other in keys if other not in (key, SEED)]
        figure, axes = _figure(len(tags))
        for color, (_, group) in enumerate(_groups([r for r in runs if key in r.config], others).items()):
            for kind, style in (("final", "-o"), ("best", "--s")):
                _sweep_line(axes, group, key, position, tags, kind, style, f"C{color % 10}",
                            f"{kind} {label(group[0], others) if others else ''}".strip())
            _diverged_points(axes, group, key, position, tags, f"C{color % 10}")
        for ax, tag in zip(axes, tags):
            ax.set(xlabel=key, ylabel=tag, title=f"{tag} against {key}")
            if numeric and log_scale(key, [float(v) for v in values]):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
            if not numeric:
                ax.set_xticks(range(len(values)), [str(v) for v in values])
            ax.grid(alpha=0.3)
        _legend(figure, axes[0], "lines")
        figures[key] = _save(figure, out / "sweep" / f"{key}.png")
    return figures


def _sweep_line(axes, group: list[Run], key: str, position: dict, tags: Sequence[str], kind: str, style: str,
                color: str, name: str) -> None:
    finished = {value: seeds for (value,), seeds in _groups(group, [key]).items()
                if not any(divergence(run, tags) for run in seeds)}
    for ax, tag in zip(axes, tags):
        stats = {value: [v for v in (metric(run, tag, kind) for run in seeds) if v is not None]
                 for value, seeds in finished.items()}
        points = sorted((position[value], np.mean(v), np.min(v), np.max(v)) for value, v in stats.items() if v)
        if points:
            px, mean, low, high = map(np.array, zip(*points))
            ax.errorbar(px, mean, yerr=[mean - low, high - mean], fmt=style, color=color, label=name, capsize=3)


def _diverged_points(axes, group: list[Run], key: str, position: dict, tags: Sequence[str], color: str) -> None:
    for (value,), seeds in _groups(group, [key]).items():
        count = sum(divergence(run, tags) is not None for run in seeds)
        if count:
            for ax, tag in zip(axes, tags):
                _mark_diverged(ax, position[value], tag, color, f"{count}/{len(seeds)} diverged")


DIVERGED_LABEL = "diverged seeds (at the worse edge)"


def _mark_diverged(ax, x: float, tag: str, color: str, text: str = "") -> None:
    """An X at ``x`` on the edge of ``ax`` where ``tag`` is worst, out of the way of every finite
    value: a diverged run never looks better than one that finished."""
    top = better(tag) is min
    edge = ax.get_xaxis_transform()  # x in data, y in axes coordinates: 1 is the top edge
    legend = DIVERGED_LABEL not in ax.get_legend_handles_labels()[1]
    ax.plot([x], [1.0 if top else 0.0], "X", color=color, markersize=10, markeredgecolor="black", transform=edge,
            clip_on=False, zorder=5, label=DIVERGED_LABEL if legend else "_nolegend_")
    if text:
        ax.annotate(text, (x, 1.0 if top else 0.0), xycoords=edge, xytext=(0, -9 if top else 9),
                    textcoords="offset points", ha="center", va="top" if top else "bottom", fontsize="small",
                    color=color)


def plot_seeds(runs: Sequence[Run], keys: Sequence[str], tags: Sequence[str], out: Path) -> dict[str, Path]:
    """Per metric, the mean and range of the curves of runs that differ only in trainer.seed; a
    diverged seed is left out of them, drawn dotted up to its last finite value and marked by an X
    at the worse edge where it diverged, and the legend counts it."""
    others = [key for key in keys if key != SEED]
    groups = [group for group in _groups(runs, others).values() if len(group) > 1]
    diverged = [[divergence(run, tags) for run in group] for group in groups]
    saved = {}
    for tag in tags:
        figure, (ax,) = _figure(1)
        finished_values = []
        for color, (group, whys) in enumerate(zip(groups, diverged)):
            count = sum(why is not None for why in whys)
            name = f"{label(group[0], others) if others else 'all runs'} ({len(group)} seeds" + (
                f", {count}/{len(group)} diverged)" if count else ")")
            finished = [run for run, why in zip(group, whys) if why is None]
            if _seed_band(ax, finished, tag, f"C{color % 10}", name):
                name = "_nolegend_"
                finished_values += [p.value for run in finished for p in run.curves.get(tag, [])]
            for run, why in zip(group, whys):
                if why is not None:
                    finite = [p for p in run.curves.get(tag, []) if math.isfinite(p.value)]
                    ax.plot([p.step for p in finite], [p.value for p in finite], ":", color=f"C{color % 10}",
                            label=name)
                    name = "_nolegend_"
                    _mark_diverged(ax, why.step, tag, f"C{color % 10}")
        if better(tag) is min and any(why for whys in diverged for why in whys):
            figures.clamp_top(ax, finished_values)  # a diverging seed's loss can reach 1e30 first
        ax.set(xlabel="step", ylabel=tag, title=f"{tag}: mean and range over seeds")
        ax.grid(alpha=0.3)
        _legend(figure, ax, "groups of seeds")
        saved[tag] = _save(figure, out / "seeds" / f"{tag}.png")
    return saved


def _seed_band(ax, runs: Sequence[Run], tag: str, color: str, name: str) -> bool:
    """The mean and range of ``runs``' curves of ``tag`` over the steps they all logged, if any."""
    curves = [{p.step: p.value for p in run.curves.get(tag, [])} for run in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    if not steps:
        return False
    values = np.array([[curve[step] for step in steps] for curve in curves])
    ax.plot(steps, values.mean(axis=0), color=color, label=name)
    ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2)
    return True


def plot_lr_find(runs: Sequence[Run], keys: Sequence[str], out: Path) -> Path:
    figure, (ax,) = _figure(1)
    for color, run in enumerate(runs):
        curve = run.lr_find
        ax.plot(curve["lr"], curve["loss"], color=f"C{color % 10}", alpha=0.3, linewidth=0.8)
        ax.plot(curve["lr"], curve["smoothed_loss"], color=f"C{color % 10}", label=label(run, keys))
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="global batch loss (faint: unsmoothed)",
           title="LR range tests")
    figures.clamp_top(ax, [v for run in runs for v in run.lr_find["smoothed_loss"]])
    _legend(figure, ax, "range tests")
    return _save(figure, out / "lr_find.png")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def _links(figures: dict[str, Path], out: Path) -> list[str]:
    return [f"- [{name}]({os.path.relpath(path, out)})" for name, path in figures.items()]


def write_markdown(runs: Sequence[Run], keys: Sequence[str], figures: dict[str, dict[str, Path]],
                   lr_find: tuple[list[Run], list[str]], out: Path) -> Path:
    tags = metric_tags(runs)
    lines = ["# Report", "", f"{len(runs)} training run(s); swept: {', '.join(keys) or 'nothing'} "
             "(the keys whose values differ between the runs). Best: lowest loss, highest accuracy.", ""]
    if runs:
        rows = [[run.config.get(key) for key in keys] + list(summary(run, tags).values())
                + [f"[{run.name}]({os.path.relpath(run.path, out)})"] for run in runs]
        lines += table([*keys, *summary(runs[0], tags).keys(), "run"], rows) + [""]
    titles = {"curves": "Curves", "sweep": "Against each swept key", "seeds": "Mean and range over seeds"}
    for kind, title in titles.items():
        if figures.get(kind):
            lines += [f"## {title}", ""] + _links(figures[kind], out) + [""]
            lines += diverged_points(runs, keys, tags) if kind == "sweep" else []
    gns = {tag: path for tag, path in figures.get("curves", {}).items() if tag.startswith("gns/")}
    if gns:
        lines += ["## Gradient noise scale", ""] + _links(gns, out) + [""]
    lr_runs, lr_keys = lr_find
    if lr_runs:
        rows = [[run.config.get(key) for key in lr_keys] + _lr_find_summary(run)
                + [f"[{run.name}]({os.path.relpath(run.path, out)})"] for run in lr_runs]
        lines += ["## LR range tests", ""] + table(
            [*lr_keys, "updates", "lowest smoothed loss", "at lr", "last lr", "run"], rows)
        lines += ["", f"![LR range tests]({os.path.relpath(figures['lr_find']['lr_find'], out)})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def diverged_points(runs: Sequence[Run], keys: Sequence[str], tags: Sequence[str]) -> list[str]:
    """Markdown naming each point of the sweep (its swept keys but the seed) that has diverged
    seeds, with their count."""
    others = [key for key in keys if key != SEED]
    points = []
    for group in _groups(runs, others).values():
        count = sum(divergence(run, tags) is not None for run in group)
        if count:
            points.append(f"- {label(group[0], others)}: {count}/{len(group)} diverged")
    if not points:
        return []
    return ["Points with diverged seeds (in the figures: an X at the worse edge, the top or, for accuracy, the "
            "bottom, never an average of the seeds that finished):", "", *points, ""]


def _lr_find_summary(run: Run) -> list[object]:
    smoothed = [v if math.isfinite(v) else math.inf for v in run.lr_find["smoothed_loss"]]
    lowest = int(np.argmin(smoothed)) if smoothed else None
    if lowest is None:
        return [0, None, None, None]
    return [len(smoothed), smoothed[lowest], run.lr_find["lr"][lowest], run.lr_find["lr"][-1]]


def report(paths: Sequence[Path], out: Path) -> Path:
    """Read the runs under ``paths`` and write the CSV, figures and report.md into ``out``."""
    runs = find_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, out / "scalars.csv")
    training = [run for run in runs if run.curves]
    keys = differing_keys(training, RESULT_NEUTRAL_KEYS + LR_FIND_KEYS)
    training.sort(key=lambda run: ([_order(run.config.get(key)) for key in keys], run.name))
    lr_runs = [run for run in runs if run.lr_find is not None]
    lr_keys = differing_keys(lr_runs, RESULT_NEUTRAL_KEYS)
    figures_dir = out / "figures"
    figures: dict[str, dict[str, Path]] = {"curves": plot_curves(training, keys, SampleAxes(training), figures_dir)}
    if keys and metric_tags(training):
        figures["sweep"] = plot_sweep(training, keys, metric_tags(training), figures_dir)
    if SEED in keys:
        figures["seeds"] = plot_seeds(training, keys, metric_tags(training), figures_dir)
    if lr_runs:
        figures["lr_find"] = {"lr_find": plot_lr_find(lr_runs, lr_keys, figures_dir)}
    return write_markdown(training, keys, figures, (lr_runs, lr_keys), out)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script ``distsgd-report`` and ``python -m distsgd.report``."""
    parser = argparse.ArgumentParser(prog="distsgd-report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run folders and/or multirun folders")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: <first PATH>/report)")
    args = parser.parse_args(argv)
    try:
        written = report(args.paths, args.out or args.paths[0] / "report")
    except ConfigError as err:
        print(f"distsgd-report: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report: {written}")


if __name__ == "__main__":
    main()
