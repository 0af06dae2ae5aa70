"""Every config under conf/ composes, every group option builds its object, bad values are named."""

from __future__ import annotations

import re

import pytest
from conftest import CONF, make_config

from distsgd import data, models, optim
from distsgd.config import ConfigError, to_config
from distsgd.train import Plan

OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
           for group in ("data", "model", "optim", "schedule", "trainer", "experiment")}
NEEDS_FILES = {"npz", "mnist", "cifar10"}  # read in tests/test_data.py from files made there
DATA_FOR_MODEL = {"linear": "synthetic_regression", "cnn": "digits", "resnet": "digits"}


def test_the_groups_hold_the_documented_options():
    assert {"synthetic", "synthetic_regression", "npz"} <= set(OPTIONS["data"])
    assert {"linear", "logistic", "mlp"} <= set(OPTIONS["model"])
    assert {"sgd", "adam", "adamw", "adagrad", "rmsprop"} <= set(OPTIONS["optim"])
    assert {"constant", "step", "multistep", "exponential", "inverse_time", "polynomial", "cosine"} <= set(
        OPTIONS["schedule"])
    assert OPTIONS["experiment"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in OPTIONS.items() for o in opts])
def test_every_option_composes_and_builds(group, option):
    if group == "data" and option in NEEDS_FILES:
        assert to_config(make_config(f"data={option}", "data.path=x.npz", "data.root=.")).data.name == option
        return
    extra = [f"data={DATA_FOR_MODEL[option]}"] if group == "model" and option in DATA_FOR_MODEL else []
    config = to_config(make_config(f"{group}={option}", *extra))
    dataset = data.load(config.data)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    lr = optim.scaled_lr(config.optim, config.data.global_batch_size)
    optimizer = optim.build_optimizer(config.optim, model.parameters(), lr)
    schedule = optim.build_schedule(config.schedule, lr, total_steps=100, steps_per_epoch=10)
    assert optimizer.param_groups[0]["lr"] == lr
    warmup = config.schedule.warmup_steps * (10 if config.schedule.unit == "epochs" else 1)
    assert schedule(0) == pytest.approx(lr / max(warmup, 1))  # every decay starts at the base rate


# optim=momentum and optim=nesterov are SGD presets: what they set is what sets them apart from sgd.
SGD_PRESETS = {"sgd": dict(name="sgd", momentum=0.0, nesterov=False),
               "momentum": dict(name="sgd", momentum=0.9, nesterov=False),
               "nesterov": dict(name="sgd", momentum=0.9, nesterov=True)}


def test_option_name_matches_file():
    for group in ("data", "model", "optim", "schedule"):
        for option in OPTIONS[group]:
            chosen = getattr(to_config(make_config(f"{group}={option}", "data.path=x.npz", "data.root=.")), group)
            expected = SGD_PRESETS.get(option, {"name": option}) if group == "optim" else {"name": option}
            assert {key: getattr(chosen, key) for key in expected} == expected, (group, option)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("data.global_batch_size=0", "data.global_batch_size must be > 0"),
    ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1)"),
    ("optim.momentum=1.0", "optim.momentum must be in [0, 1)"),
    ("optim.nesterov=true", "optim.nesterov must be false unless optim.momentum > 0"),
    ("optim.scaling=cubic", "optim.scaling must be one of none|linear|sqrt"),
    ("schedule.unit=hours", "schedule.unit must be one of steps|epochs"),
    ("schedule.milestones=[50,10]", "schedule.milestones must be increasing"),
    ("trainer.device=tpu", "trainer.device must be one of auto|cpu|cuda"),
    ("trainer.allreduce=ring", "trainer.allreduce must be one of ddp|manual"),
    ("model.activation=swish", "model.activation must be one of relu|tanh|gelu|sigmoid"),
    ("data.augment=true", "data.augment must be false unless data=cifar10"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_config(make_config(override))


@pytest.mark.parametrize("overrides,steps", [
    ((), 200),  # neither set: the default length
    (("trainer.max_epochs=15",), 15 * 51),  # max_epochs alone is not cut short by a default max_steps
    (("trainer.max_steps=30",), 30),
    (("trainer.max_epochs=15", "trainer.max_steps=30"), 30),  # whichever ends first
    (("trainer.max_epochs=1", "trainer.max_steps=300"), 51),
])
def test_run_length_is_what_was_set(overrides, steps):
    # 4096 samples, 20% for validation, global batch 64: 51 steps per epoch.
    assert Plan.of(to_config(make_config(*overrides)), 3277, world_size=1).total_steps == steps


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "Key 'lrr' not in 'OptimConfig'"),
    ("optim.lr=fast", "could not be converted to Float"),
    ("optim=sgdd", "Could not find 'optim/sgdd'"),
])
def test_misspelled_keys_wrong_types_and_unknown_options_fail_at_compose(override, message):
    with pytest.raises(Exception) as failure:
        make_config(override)
    assert message in f"{failure.value} {failure.value.__cause__}"


def test_experiment_overrides_groups():
    config = to_config(make_config("experiment=regression_sgd"))
    assert (config.data.name, config.model.name, config.schedule.name) == ("synthetic_regression", "linear", "cosine")


def test_npz_without_path_is_named():
    with pytest.raises(ConfigError, match="data.path must be a .npz file"):
        to_config(make_config("data=npz"))


def test_scaled_lr_rules():
    base = to_config(make_config("optim.lr=0.1", "optim.reference_batch_size=256")).optim
    assert optim.scaled_lr(base, 1024) == 0.1
    base.scaling = "linear"
    assert optim.scaled_lr(base, 1024) == pytest.approx(0.4)
    base.scaling = "sqrt"
    assert optim.scaled_lr(base, 1024) == pytest.approx(0.2)
    base.reference_batch_size = None
    assert optim.scaled_lr(base, 1024) == pytest.approx(0.1)
    assert optim.scaled_lr(base, 1) == pytest.approx(0.1)  # the global batch is its own reference
