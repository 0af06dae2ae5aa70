"""Every config under conf/ composes, every group option builds its object, bad values are named."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CONF, make_config, token_windows

from distsgd import batchnorm, data, distributed, models, optim
from distsgd.config import (MODEL_KEYS, MODELS, OPTIM_KEYS, OPTIMIZERS, ConfigError, ModelConfig, OptimConfig, swept_keys,
                            to_config)
from distsgd.train import Plan

OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
           for group in ("data", "model", "optim", "schedule", "trainer", "experiment")}
NEEDS_FILES = {"npz", "arrays", "mnist", "cifar10"}  # read from files made in test_data.py, test_arrays.py
FILES = ["data.path=x.npz", "data.root=.", "data.x=x.npy", "data.y=y.npy"]
DATA_FOR_MODEL = {"linear": "synthetic_regression", "cnn": "digits", "resnet": "digits"}
MODEL_FOR_DATA = {"text": "gpt", "markov": "gpt"}  # language data: the default model (mlp) refuses it


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
        assert to_config(make_config(f"data={option}", *FILES)).data.name == option
        return
    extra = [f"data={DATA_FOR_MODEL[option]}"] if group == "model" and option in DATA_FOR_MODEL else []
    extra += [f"model={MODEL_FOR_DATA[option]}"] if group == "data" and option in MODEL_FOR_DATA else []
    config = to_config(make_config(f"{group}={option}", *extra))
    # model=gpt needs a language-model dataset; the default data is synthetic classification.
    dataset = token_windows() if (group, option) == ("model", "gpt") else data.load(config.data)
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    lr = optim.scaled_lr(config.optim, config.data.global_batch_size)
    optimizer = optim.build_optimizer(config.optim, model.parameters(), lr)
    ten_steps_per_epoch = data.BatchSchedule(10 * config.data.global_batch_size, config.data.global_batch_size)
    # At least 100 steps, and as many as the option's run (experiment=gpt_small warms up for 2000).
    total_steps = max(100, config.trainer.max_steps or 0)
    schedule = optim.build_schedule(config.schedule, [lr], total_steps=total_steps, batches=ten_steps_per_epoch)
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
            chosen = getattr(to_config(make_config(f"{group}={option}", *FILES)), group)
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


# Settings that the chosen option ignores, paths under ~, keep_checkpoints=0, the launch environment

@pytest.mark.parametrize("overrides,message", [
    (["optim=adam", "optim.momentum=0.9"],
     "optim.momentum must be left at 0.0 with optim=adam, which ignores it (it is for optim=sgd|rmsprop), got 0.9"),
    (["optim=momentum", "optim.name=adagrad"], "optim.momentum must be left at 0.0 with optim=adagrad"),
    (["optim=adamw", "optim.nesterov=true"], "optim.nesterov must be left at False with optim=adamw"),
    (["optim=rmsprop", "optim.nesterov=true"], "optim.nesterov must be left at False with optim=rmsprop"),
    (["optim=rmsprop", "optim.dampening=0.1"], "optim.dampening must be left at 0.0 with optim=rmsprop"),
    (["optim=sgd", "optim.betas=[0.8,0.9]"],
     "optim.betas must be left at [0.9, 0.999] with optim=sgd, which ignores it (it is for optim=adam|adamw)"),
    (["optim=adagrad", "optim.betas=[0.8,0.9]"], "optim.betas must be left at [0.9, 0.999] with optim=adagrad"),
    (["optim=momentum", "optim.eps=1e-6"], "optim.eps must be left at None with optim=sgd"),
    (["optim=adam", "optim.alpha=0.9"], "optim.alpha must be left at 0.99 with optim=adam"),
    (["optim=sgd", "optim.dampening=0.5"], "optim.dampening must be 0 unless optim.momentum > 0, got 0.5"),
    (["model=resnet", "model.width=32"],
     "model.width must be left at 64 with model=resnet, which ignores it (it is for model=mlp|cnn), got 32"),
    (["model=resnet", "model.activation=tanh"], "model.activation must be left at 'relu' with model=resnet"),
    (["model=linear", "data=synthetic_regression", "model.depth=3"],
     "model.depth must be left at 2 with model=linear"),
    (["model=logistic", "model.width=8"], "model.width must be left at 64 with model=logistic"),
    (["model=logistic", "model.activation=gelu"], "model.activation must be left at 'relu' with model=logistic"),
    (["model=cnn", "model.depth=3"], "model.depth must be left at 2 with model=cnn, which ignores it "
                                     "(it is for model=mlp|resnet)"),
    (["model=mlp", "model.sync_bn=true"],
     "model.sync_bn must be left at False with model=mlp, which ignores it (it is for model=resnet)"),
    (["model=cnn", "model.sync_bn=true"], "model.sync_bn must be left at False with model=cnn"),
])
def test_a_setting_the_option_ignores_is_an_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_config(make_config(*overrides))


@pytest.mark.parametrize("overrides,expected", [
    (["optim=rmsprop", "optim.momentum=0.5", "optim.alpha=0.9", "optim.eps=1e-6"],
     dict(momentum=0.5, alpha=0.9, eps=1e-6)),
    (["optim=adam", "optim.betas=[0.8,0.99]", "optim.eps=1e-6"], dict(betas=[0.8, 0.99], eps=1e-6)),
    (["optim=momentum", "optim.dampening=0.1"], dict(momentum=0.9, dampening=0.1)),
    (["optim=nesterov"], dict(momentum=0.9, nesterov=True)),
    (["optim=adagrad", "optim.eps=1e-6", "optim.weight_decay=0.1"], dict(eps=1e-6, weight_decay=0.1)),
])
def test_settings_the_option_reads_are_kept(overrides, expected):
    config = to_config(make_config(*overrides)).optim
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize("overrides,expected", [
    (["model=resnet", "model.depth=32", "model.sync_bn=true"], dict(depth=32, sync_bn=True)),
    (["model=cnn", "model.width=16", "model.activation=tanh"], dict(width=16, activation="tanh")),
    (["model=mlp", "model.depth=3", "model.width=8", "model.activation=gelu"], dict(depth=3, width=8, activation="gelu")),
    (["experiment=digits_mlp"], dict(width=256)),
])
def test_model_settings_the_option_reads_are_kept(overrides, expected):
    config = to_config(make_config(*overrides)).model
    assert {key: getattr(config, key) for key in expected} == expected


NON_DEFAULT_OPTIM = dict(momentum=0.5, dampening=0.25, nesterov=True, betas=[0.8, 0.99], eps=1e-6, alpha=0.9)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_keys_table_matches_what_the_optimizer_is_given(name):
    # The check is only as good as OPTIM_KEYS: each key it says an optimizer reads must reach the
    # torch optimizer, and a key it says is ignored must have no place there.
    params = [torch.nn.Parameter(torch.zeros(2))]
    for key, value in NON_DEFAULT_OPTIM.items():
        if key in OPTIM_KEYS[name]:
            needs_momentum = {"momentum": 0.5} if key in ("dampening", "nesterov") else {}
            group = optim.build_optimizer(OptimConfig(name=name, **needs_momentum, **{key: value}), params, 0.1).param_groups[0]
            assert group[key] == (tuple(value) if key == "betas" else value), (name, key)
        else:
            assert key not in optim.build_optimizer(OptimConfig(name=name), params, 0.1).param_groups[0], (name, key)


NON_DEFAULT_MODEL = dict(depth=32, width=8, activation="tanh", bias=False, init="zeros", n_layer=1, n_head=2,
                         n_embd=32, dropout=0.1)


def _build(cfg: ModelConfig) -> torch.nn.Module:
    if cfg.name == "gpt":
        return models.build(cfg, (8,), 3, "language_model")
    return models.build(cfg, (1, 8, 8), 3, "regression" if cfg.name == "linear" else "classification")


def _architecture(cfg: ModelConfig) -> list:
    torch.manual_seed(0)  # so that the initial values tell model.init apart
    net = _build(cfg)
    # extra_repr: a layer's settings too, such as a Dropout's p.
    return [(n, tuple(p.shape), p.abs().sum().item()) for n, p in net.named_parameters()] + \
        [f"{type(m).__name__}({m.extra_repr()})" for m in net.modules()]


@pytest.mark.parametrize("name", MODELS)
def test_model_keys_table_matches_what_the_builder_reads(name):
    # Likewise MODEL_KEYS: a key it lists changes the network, one it leaves out does not.
    option = to_config(make_config(f"model={name}")).model
    for key, value in NON_DEFAULT_MODEL.items():
        changed = replace(option)
        # after __post_init__, which would refuse an ignored key; a flag is flipped from the option's own value
        setattr(changed, key, not getattr(option, key) if isinstance(value, bool) else value)
        assert (_architecture(changed) != _architecture(option)) == (key in MODEL_KEYS[name]), (name, key)
    has_batchnorm = batchnorm.has_batchnorm(_build(option))
    assert has_batchnorm == ("sync_bn" in MODEL_KEYS[name])


def test_paths_starting_with_tilde_mean_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(40, 3)).astype(np.float32), y=rng.integers(0, 2, size=40))
    config = to_config(make_config("data=npz", "data.path='~/x.npz'", "trainer.resume='~/runs/a/last.pt'"))
    assert (config.data.path, config.trainer.resume) == (str(tmp_path / "x.npz"), str(tmp_path / "runs/a/last.pt"))
    assert len(data.load(config.data).x_train) == 32  # 40 samples, 20% held out
    assert to_config(make_config("data=mnist", "data.root='~/mnist'")).data.root == str(tmp_path / "mnist")
    # Unchanged: the words auto and never, and paths without a leading ~.
    assert to_config(make_config("trainer.resume=auto")).trainer.resume == "auto"
    assert to_config(make_config("data=npz", "data.path='a/~b.npz'")).data.path == "a/~b.npz"


def test_keep_checkpoints_0_keeps_every_step_checkpoint(tmp_path):
    from distsgd.train import run

    # Five step checkpoints, more than the default keeps (the last step writes last.pt only).
    run(make_config("data.num_samples=256", "data.global_batch_size=32", "model.width=8", "trainer.max_steps=6",
                    "trainer.val_every=1000", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == [
        "last.pt", *(f"step_{step:08d}.pt" for step in range(1, 6))]
    with pytest.raises(ConfigError, match=re.escape("trainer.keep_checkpoints must be >= 0, got -1")):
        to_config(make_config("trainer.keep_checkpoints=-1"))


@pytest.mark.parametrize("env,message", [
    (dict(RANK="0", WORLD_SIZE="2"), "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set"),
    (dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1"), "WORLD_SIZE=2 but MASTER_PORT not set"),
    (dict(RANK="0", WORLD_SIZE="4", MASTER_PORT="29500"), "WORLD_SIZE=4 but MASTER_ADDR not set"),
    (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"), "RANK=2 must be in [0, WORLD_SIZE=2)"),
    (dict(RANK="1"), "RANK=1 must be in [0, WORLD_SIZE=1)"),
    # A SLURM batch script that exported the README's MASTER_ADDR and MASTER_PORT, then ran one process.
    (dict(MASTER_ADDR="node01", MASTER_PORT="29500"), "MASTER_ADDR is set but RANK and WORLD_SIZE are not: a launcher "
     "sets them for each process (torchrun; srun in a SLURM job step); to train as one process here, unset MASTER_ADDR"),
    (dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"), "MASTER_ADDR is set but RANK is not"),
])
def test_a_partial_torchrun_environment_is_an_error(env, message, monkeypatch):
    # Without a rendezvous each process would train alone on its share of every batch.
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        distributed.init("cpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("value", ["multirun/2026-12-04_10-00-00/optim.lr=0.01,trainer.max_steps=40", "/plain/path-1.2",
                                   "it's", "ends\\", "c:\\dir\\'q", "a b", "~/x", "[1,2]", "${x}", "é", ""])
def test_hydra_override_reads_back_as_the_value(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from distsgd.config import hydra_override

    argument = hydra_override("hydra.run.dir", value)
    assert OverridesParser.create().parse_override(argument).value() == value
    assert ("'" in argument) == (value != "/plain/path-1.2")


def test_swept_keys_follow_the_sweep_file_when_it_changes(tmp_path):
    # Parsing the file is cached by its text: a new sweep into the same folder is read anew, even
    # one whose file has the same size and time stamp.
    assert swept_keys(tmp_path) == []
    task = "hydra:\n  overrides:\n    task:\n    - {}\n    - {}\n"
    (tmp_path / "multirun.yaml").write_text(task.format("optim.lr=0.1,0.2", "data.seed=3"))
    assert swept_keys(tmp_path) == ["optim.lr"]
    (tmp_path / "multirun.yaml").write_text(task.format("optim.lr=0.3", "data.seed=1,2"))
    assert swept_keys(tmp_path) == ["data.seed"]
