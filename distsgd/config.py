"""Configuration schemas: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra checks keys and types against these schemas when it composes the config, so a misspelled
key or a wrong type fails before anything runs. Value checks that types cannot express (a positive
learning rate, a known schedule name, ...) live in each schema's ``__post_init__`` and run when
``to_config`` turns the composed DictConfig into these dataclasses.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A mistake in the user's configuration or inputs: reported as one line, no traceback."""


# The configs, as an absolute path (Hydra would read a relative one as a package path under the
# console script). A wheel ships the top-level conf/ as the package distsgd.conf, i.e. the folder
# distsgd/conf; a source checkout, run in place or installed editable, keeps it beside distsgd/.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else _PACKAGED_CONF.parent.parent / "conf")


def _check(ok: bool, key: str, expected: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, "one of " + "|".join(choices), value)


def _check_positive(key: str, value: Optional[float]) -> None:
    _check(value is not None and value > 0, key, "> 0", value)


def _check_non_negative(key: str, value: float) -> None:
    _check(value >= 0, key, ">= 0", value)


def _reject_ignored(config, group: str, used_by: dict[str, tuple[str, ...]], option: str = "name") -> None:
    """A key set away from its default that the chosen option never reads would change nothing,
    silently; the defaults themselves pass, so the option files may set what other options read.
    ``option``: the field that chooses (a config group's ``name``, or e.g. trainer's ``comm_hook``)."""
    chosen = getattr(config, option)
    choice = group if option == "name" else f"{group}.{option}"
    for spec in fields(config):
        users = [name for name, keys in used_by.items() if spec.name in keys]
        if not users or chosen in users:
            continue
        default = spec.default_factory() if spec.default is MISSING else spec.default
        value = getattr(config, spec.name)
        _check(value == default, f"{group}.{spec.name}",
               f"left at {default!r} with {choice}={chosen}, which ignores it "
               f"(it is for {choice}={'|'.join(users)})", value)


def _home(path: Optional[str]) -> Optional[str]:
    # The shell leaves ~ in a Hydra override alone (it has to be quoted: data.path='~/x.npz').
    return os.path.expanduser(path) if path else path


# Keys that change how a run executes, watches or records itself, not what it computes: the device,
# compilation and the all-reduce engine reorder floating-point sums at most, and the data's folder,
# the loaders, logging, checkpoints and instruments change nothing. Sweep job folders
# (conf/config.yaml's override_dirname.exclude_keys) and the HParams entry leave them out, and
# reports do not count them as swept. An entry ending in "." covers a whole group.
RESULT_NEUTRAL_KEYS = ("data.in_memory", "data.num_workers", "data.root", "trainer.device", "trainer.compile",
                       "trainer.allreduce", "trainer.bucket_mb", "trainer.log_every", "trainer.val_every",
                       "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.resume",
                       "trainer.resume_override", "trainer.collective_timeout_s", "trainer.stop_signals",
                       "trainer.requeue", "trainer.peak_tflops", "diagnostics.")
# Read by the LR range test alone: training's HParams entry and reports of training runs leave them out.
LR_FIND_KEYS = ("lr_find.",)


def hydra_override(key: str, value: object) -> str:
    """``key=value`` as an argument that Hydra's override grammar reads back as exactly ``value``:
    quoted unless it is a plain word or path, since the grammar gives ``=``, ``,``, ``~``, spaces,
    brackets and quotes a meaning (a sweep job's folder is named ``optim.lr=0.1,trainer.seed=1``).
    Inside quotes, the quote and the backslashes before a quote or at the end are escaped."""
    text = str(value)
    if re.fullmatch(r"[\w./-]+", text, re.ASCII):
        return f"{key}={text}"
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"{key}='{escaped}'"


def key_in(key: str, entries: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``entries`` or lies in a group that one of them names ("group.")."""
    return any(key == entry or (entry.endswith(".") and key.startswith(entry)) for entry in entries)


DATASETS = ("synthetic", "synthetic_regression", "npz", "arrays", "digits", "mnist", "cifar10", "text", "markov")
MODELS = ("linear", "logistic", "mlp", "cnn", "resnet", "gpt")
ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
SCHEDULES = ("constant", "step", "multistep", "exponential", "inverse_time", "polynomial", "cosine")
# The keys that only some options read (as models.build and optim.build_optimizer use them); the
# others, such as lr or weight_decay, serve every option.
MODEL_KEYS = {"linear": ("bias", "init"), "logistic": ("bias", "init"), "mlp": ("depth", "width", "activation"),
              "cnn": ("width", "activation"), "resnet": ("depth", "sync_bn"),
              "gpt": ("n_layer", "n_head", "n_embd", "dropout", "bias")}
OPTIM_KEYS = {"sgd": ("momentum", "dampening", "nesterov"), "adam": ("betas", "eps"), "adamw": ("betas", "eps"),
              "adagrad": ("eps",), "rmsprop": ("momentum", "alpha", "eps")}
# The language models' data keys and the datasets that read them (the older keys, such as
# data.path or data.dim, are not checked against the dataset; data.augment has its own check).
DATA_KEYS = {"text": ("block_size", "vocab_size"),
             "markov": ("block_size", "vocab_size", "order", "concentration", "num_tokens")}
# trainer.comm_hook: how DDP communicates gradients (distsgd/comm.py), and the keys each hook reads.
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd", "local_sgd")
COMM_HOOK_KEYS = {"powersgd": ("powersgd_rank", "powersgd_warmup_steps"),
                  "local_sgd": ("local_sgd_period", "local_sgd_warmup_steps")}


@dataclass
class DataConfig:
    name: str = "synthetic"
    global_batch_size: int = 64
    # Growing batches (Smith et al. 2017): from each of these epochs on, the global batch is
    # batch_growth times what it was, as schedule.milestones and gamma do for the learning rate.
    # An integer factor keeps every batch whole, and divisible wherever the first one is.
    batch_milestones: list[int] = field(default_factory=list)
    batch_growth: int = 2
    val_fraction: float = 0.2
    # Seed of the data itself (generation and the validation split), separate from trainer.seed
    # so that a sweep over training seeds keeps the same data.
    seed: int = 0
    num_samples: int = 4096
    dim: int = 32
    num_classes: int = 4
    noise: float = 0.1
    path: Optional[str] = None
    # data=arrays: the .npy files of x (N, features...) and y (N,), memory-mapped, never loaded whole.
    x: Optional[str] = None
    y: Optional[str] = None
    # Folder of the mnist / cifar10 files (read locally, never downloaded).
    root: Optional[str] = None
    # Random crop with padding and horizontal flip (cifar10).
    augment: bool = False
    # Hold the data as tensors on the training device and gather batches by index; false streams
    # batches from host memory through a DataLoader (num_workers, pinned memory) in the same order.
    in_memory: bool = True
    num_workers: int = 2
    # data=text and data=markov: a sample is a window of block_size tokens and, as its targets, the
    # same window shifted by one token (distsgd/tokens.py).
    block_size: int = 64
    # data=markov: the chain's vocabulary; data=text with data.root: the vocabulary of nanoGPT's
    # token files, where no meta.pkl beside them says it.
    vocab_size: Optional[int] = None
    # data=markov: the chain's order (tokens of context), the Dirichlet concentration of each
    # context's next-token distribution (small: peaked, a low entropy rate), and its length.
    order: int = 2
    concentration: float = 0.2
    num_tokens: int = 262144

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, DATASETS)
        _reject_ignored(self, "data", DATA_KEYS)
        _check_positive("data.global_batch_size", self.global_batch_size)
        milestones = list(self.batch_milestones)
        _check(all(a < b for a, b in zip([0] + milestones, milestones)), "data.batch_milestones",
               "strictly increasing positive integers (epochs)", milestones)
        _check(self.batch_growth >= 1, "data.batch_growth", "an integer >= 1", self.batch_growth)
        _check(0 <= self.val_fraction < 1, "data.val_fraction", "in [0, 1)", self.val_fraction)
        _check_positive("data.num_samples", self.num_samples)
        _check_positive("data.dim", self.dim)
        _check(self.num_classes >= 2, "data.num_classes", ">= 2", self.num_classes)
        _check_non_negative("data.noise", self.noise)
        if self.name == "npz":
            _check(bool(self.path), "data.path", "a .npz file for data=npz", self.path)
        if self.name == "arrays":
            _check(bool(self.x), "data.x", "a .npy file for data=arrays", self.x)
            _check(bool(self.y), "data.y", "a .npy file for data=arrays", self.y)
            # Moving the arrays to the device would read all of them: batches are read from the
            # files by index instead, in the same order.
            _check(not self.in_memory, "data.in_memory", "false for data=arrays (they stay memory-mapped)",
                   self.in_memory)
        _check_non_negative("data.num_workers", self.num_workers)
        if self.augment:
            _check(self.name == "cifar10", "data.augment", "false unless data=cifar10 (crop and flip suit CIFAR images)",
                   self.augment)
        if self.name in ("mnist", "cifar10"):
            _check(bool(self.root), "data.root", f"the folder of the {self.name} files", self.root)
        self._check_language_model()
        self.path, self.root, self.x, self.y = _home(self.path), _home(self.root), _home(self.x), _home(self.y)

    def _check_language_model(self) -> None:
        _check_positive("data.block_size", self.block_size)
        if self.vocab_size is not None:
            _check(self.vocab_size >= 2, "data.vocab_size", "an integer >= 2", self.vocab_size)
        _check_positive("data.order", self.order)
        _check_positive("data.concentration", self.concentration)
        _check_positive("data.num_tokens", self.num_tokens)
        if self.name == "markov":
            _check(self.vocab_size is not None, "data.vocab_size", "set for data=markov (the chain's vocabulary)",
                   self.vocab_size)


@dataclass
class ModelConfig:
    name: str = "mlp"
    depth: int = 2
    width: int = 64
    activation: str = "relu"
    # BatchNorm statistics over the global batch instead of each rank's share of it.
    sync_bn: bool = False
    # model=linear|logistic: with or without a bias, starting from torch's default initialisation
    # or from zero (as analyses of least squares from w = 0 assume, e.g. Wilson et al. 2017).
    bias: bool = True
    init: str = "default"
    # model=gpt (distsgd/gpt.py): blocks, attention heads, width, dropout; bias (false in
    # conf/model/gpt.yaml, as nanoGPT's default) in its Linear and LayerNorm layers. The context
    # length is the data's block size, the vocabulary its number of outputs.
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("model.name", self.name, MODELS)
        _reject_ignored(self, "model", MODEL_KEYS)
        _check_non_negative("model.depth", self.depth)
        _check_positive("model.width", self.width)
        _check_choice("model.activation", self.activation, ACTIVATIONS)
        _check_choice("model.init", self.init, ("default", "zeros"))
        _check_positive("model.n_layer", self.n_layer)
        _check_positive("model.n_head", self.n_head)
        _check(self.n_embd > 0 and self.n_embd % self.n_head == 0, "model.n_embd",
               f"a positive multiple of model.n_head={self.n_head}", self.n_embd)
        _check(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # None keeps each optimizer's own torch default (1e-8 for Adam and RMSprop, 1e-10 for AdaGrad).
    eps: Optional[float] = None
    alpha: float = 0.99
    # optim.lr is the learning rate at this global batch size; None means "at data.global_batch_size".
    reference_batch_size: Optional[int] = None
    scaling: str = "none"
    # Which parameters weight_decay applies to: all, or matrices (the >= 2-D ones: Linear and conv
    # weights and embeddings; not biases or norms' gains). conf/model/gpt.yaml sets matrices.
    weight_decay_on: str = "all"

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _reject_ignored(self, "optim", OPTIM_KEYS)
        _check_positive("optim.lr", self.lr)
        _check(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _check(0 <= self.dampening <= 1, "optim.dampening", "in [0, 1]", self.dampening)
        if self.dampening:
            # torch.optim.SGD applies dampening to the momentum buffer only.
            _check(self.momentum > 0, "optim.dampening", "0 unless optim.momentum > 0", self.dampening)
        if self.nesterov:
            _check(self.momentum > 0 and self.dampening == 0, "optim.nesterov",
                   "false unless optim.momentum > 0 and optim.dampening = 0", self.nesterov)
        _check_non_negative("optim.weight_decay", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "optim.betas", "two values in [0, 1)", list(self.betas))
        if self.eps is not None:
            _check_positive("optim.eps", self.eps)
        _check(0 <= self.alpha < 1, "optim.alpha", "in [0, 1)", self.alpha)
        if self.reference_batch_size is not None:
            _check_positive("optim.reference_batch_size", self.reference_batch_size)
        _check_choice("optim.scaling", self.scaling, ("none", "linear", "sqrt"))
        _check_choice("optim.weight_decay_on", self.weight_decay_on, ("all", "matrices"))


@dataclass
class ScheduleConfig:
    name: str = "constant"
    unit: str = "steps"
    warmup_steps: int = 0
    step_size: int = 1
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    decay_rate: float = 0.0
    power: float = 1.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("schedule.name", self.name, SCHEDULES)
        _check_choice("schedule.unit", self.unit, ("steps", "epochs"))
        _check_non_negative("schedule.warmup_steps", self.warmup_steps)
        _check_positive("schedule.step_size", self.step_size)
        _check(all(m > 0 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
               "schedule.milestones", "increasing positive integers", list(self.milestones))
        _check_positive("schedule.gamma", self.gamma)
        _check_non_negative("schedule.decay_rate", self.decay_rate)
        _check_positive("schedule.power", self.power)
        _check_non_negative("schedule.min_lr", self.min_lr)


@dataclass
class TrainerConfig:
    # The run ends at whichever comes first; with neither set, after 200 steps.
    max_steps: Optional[int] = None
    max_epochs: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    allreduce: str = "ddp"
    log_every: int = 10
    val_every: int = 50
    # Bucket size of the manual all-reduce engine; DDP's default is 25 MiB too.
    bucket_mb: float = 25.0
    # Gradient communication on the DDP engine (see distsgd/comm.py): none (DDP's all-reduce), fp16 or
    # bf16 (all-reduce in half precision), powersgd (rank-r compression with error feedback after
    # powersgd_warmup_steps plain steps), local_sgd (after local_sgd_warmup_steps synchronous steps,
    # each rank steps alone and the parameters are averaged every local_sgd_period steps).
    comm_hook: str = "none"
    powersgd_rank: int = 2
    powersgd_warmup_steps: int = 10
    local_sgd_period: int = 4
    local_sgd_warmup_steps: int = 0
    # Micro-batches per rank and step; the update equals the one for the whole global batch.
    accumulate: int = 1
    precision: str = "32"
    clip_grad_norm: Optional[float] = None
    compile: bool = False
    # Peak FLOP/s of one device in TFLOP/s, for train/mfu; null: metrics.PEAK_TFLOPS by the GPU's name.
    peak_tflops: Optional[float] = None
    # Steps between checkpoints (0: only at the end); the newest keep_checkpoints are kept (0: all).
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    # auto: continue from the newest valid checkpoint of the run directory; never; or a file path.
    resume: str = "auto"
    # Continue even though the trajectory-deciding config differs from the checkpoint's.
    resume_override: bool = False
    collective_timeout_s: float = 600.0
    # What a non-finite loss or gradient norm does: skip the update (on every rank) or stop.
    nonfinite: str = "skip"
    max_consecutive_skips: int = 10
    # Signals that mean "save a checkpoint at the next step boundary and exit": SIGTERM is what
    # schedulers send at preemption, SIGUSR2 what `sbatch --signal=USR2@120` sends before the time limit.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR2"])
    # After such a stop, rank 0 runs `scontrol requeue $SLURM_JOB_ID`: the job comes back and resumes.
    requeue: bool = False

    def __post_init__(self) -> None:
        if self.max_steps is not None:
            _check_positive("trainer.max_steps", self.max_steps)
        if self.max_epochs is not None:
            _check_positive("trainer.max_epochs", self.max_epochs)
        _check_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("trainer.allreduce", self.allreduce, ("ddp", "manual"))
        _check_positive("trainer.log_every", self.log_every)
        _check_positive("trainer.val_every", self.val_every)
        _check_positive("trainer.bucket_mb", self.bucket_mb)
        _check_choice("trainer.comm_hook", self.comm_hook, COMM_HOOKS)
        _check(self.allreduce == "ddp" or self.comm_hook == "none", "trainer.comm_hook",
               "none with trainer.allreduce=manual (communication hooks are DDP's)", self.comm_hook)
        _reject_ignored(self, "trainer", COMM_HOOK_KEYS, option="comm_hook")
        _check_positive("trainer.powersgd_rank", self.powersgd_rank)
        # torch's PowerSGD keeps error feedback and warm-start state per DDP bucket, and DDP
        # rebuilds its buckets after the first step: compression can start at step 2 at the earliest.
        _check(self.powersgd_warmup_steps >= 2, "trainer.powersgd_warmup_steps", ">= 2", self.powersgd_warmup_steps)
        _check_positive("trainer.local_sgd_period", self.local_sgd_period)
        _check_non_negative("trainer.local_sgd_warmup_steps", self.local_sgd_warmup_steps)
        _check_positive("trainer.accumulate", self.accumulate)
        _check_choice("trainer.precision", self.precision, ("32", "bf16", "fp16"))
        if self.clip_grad_norm is not None:
            _check_positive("trainer.clip_grad_norm", self.clip_grad_norm)
        if self.peak_tflops is not None:
            _check_positive("trainer.peak_tflops", self.peak_tflops)
        _check_non_negative("trainer.checkpoint_every", self.checkpoint_every)
        _check_non_negative("trainer.keep_checkpoints", self.keep_checkpoints)
        _check(bool(self.resume), "trainer.resume", "auto, never or a checkpoint path", self.resume)
        self.resume = _home(self.resume)
        _check_positive("trainer.collective_timeout_s", self.collective_timeout_s)
        _check_choice("trainer.nonfinite", self.nonfinite, ("skip", "stop"))
        _check_non_negative("trainer.max_consecutive_skips", self.max_consecutive_skips)
        catchable = set(signal.Signals.__members__) - {"SIGKILL", "SIGSTOP"}
        for name in self.stop_signals:
            _check(name in catchable, "trainer.stop_signals", "a list of signal names such as SIGTERM or SIGUSR2 "
                   "(SIGKILL and SIGSTOP cannot be caught)", list(self.stop_signals))


@dataclass
class DiagnosticsConfig:
    # Log the gradient noise scale (gns/*) every logged step; see distsgd/diagnostics.py.
    noise_scale: bool = False
    # Samples over which its estimates are averaged (the EMA's time constant); null: 20 global batches.
    noise_ema_samples: Optional[int] = None
    # Log each parameter tensor's gradient norm, weight norm and update ratio (layers/*) every logged step.
    layers: bool = False

    def __post_init__(self) -> None:
        if self.noise_ema_samples is not None:
            _check_positive("diagnostics.noise_ema_samples", self.noise_ema_samples)


# The LR range test's suggestion is read past the skipped first 10% of its sweep
# (lr_find.SKIPPED_FRACTION), from a moving average of about 1/(1-beta) losses, 5 at the default
# beta: 20 updates leave 17 rows past the skip for a descent and a minimum after it, a few averaging
# windows. With fewer no rate can be read (lr_find.steps=2 skips its only row after the first).
MIN_LR_FIND_STEPS = 20


@dataclass
class LrFindConfig:
    # The LR range test (python -m distsgd.lr_find) takes `steps` updates, at rates growing by the
    # same factor each step from min_lr to max_lr; training reads none of these keys.
    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100
    # Weight of the past in the loss's moving average, bias-corrected: about 1/(1-beta) updates
    # are averaged, and the average trails the loss by beta/(1-beta) updates. fastai's and
    # Lightning's 0.98 trails by 49, half a default sweep: on least squares its minimum falls
    # past the divergence point. 0.8 trails by 4 and still averages out most step-to-step noise.
    beta: float = 0.8

    def __post_init__(self) -> None:
        _check_positive("lr_find.min_lr", self.min_lr)
        _check(self.max_lr > self.min_lr, "lr_find.max_lr", f"> lr_find.min_lr={self.min_lr}", self.max_lr)
        _check(self.steps >= MIN_LR_FIND_STEPS, "lr_find.steps",
               f">= {MIN_LR_FIND_STEPS} (the rate is read past the sweep's first 10%, from a moving average of "
               "several updates: shorter sweeps leave no rate to read)", self.steps)
        _check(0 <= self.beta < 1, "lr_find.beta", "in [0, 1)", self.beta)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)


def to_config(cfg: DictConfig) -> Config:
    """The composed config as validated dataclasses (raises ConfigError naming the bad key)."""
    # Hydra lets `+group.key=value` add a key the schema lacks (its own error message for a typo
    # suggests exactly that), and the dataclasses would then drop it without a word.
    unknown = sorted(set(_key_paths(OmegaConf.to_container(cfg))) - set(schema_keys()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; they would be ignored "
                          "(check the spelling against conf/ and the schemas in distsgd/config.py)")
    # Hydra's composition is typed by the schema already (distsgd_schema); merging it again took 10-20 ms.
    schema = cfg if OmegaConf.get_type(cfg) is Config else OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(schema)


def _key_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        paths += _key_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return paths


def to_yaml(config: Config) -> str:
    # The same text as from OmegaConf.structured(config) in half the time: the values are validated already.
    return OmegaConf.to_yaml(OmegaConf.create(asdict(config)))


@functools.cache  # one id per process, however often Hydra resolves the run dir
def run_id() -> str:
    """What names this run's folder (and a sweep's): the launcher's id of the job, else the time."""
    # torchrun gives every rank of a job (and every restart of it) the same run id, so all ranks
    # agree on one folder; ${now:} is read per process and could split a run in two. Likewise
    # every task of a SLURM job, and the job again when it is requeued (it keeps its id), so a
    # requeued job resumes where it stopped; torchrun's id comes first, as it is the one its
    # rendezvous (--rdzv-id) names.
    torchrun_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if torchrun_id and torchrun_id != "none":
        return torchrun_id
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"  # as SLURM's %A_%a
    if "SLURM_JOB_ID" in os.environ:
        return os.environ["SLURM_JOB_ID"]
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def _launch_rank() -> int:
    # Hydra needs the rank before any process group exists. distributed imports this module (for
    # ConfigError), so it is imported here, once Hydra resolves, when both are loaded.
    from distsgd.distributed import launch_rank

    return launch_rank()


def _hydra_output_subdir() -> Optional[str]:
    # Only rank 0 writes .hydra/; the others would race on the same files.
    return ".hydra" if _launch_rank() == 0 else None


@functools.cache  # Hydra resolves the folder names, which need these, several times per sweep job
def schema_keys() -> tuple[str, ...]:
    """Every config key, as ``group.key``, in the schemas' order."""
    return tuple(_key_paths(OmegaConf.to_container(OmegaConf.structured(Config))))


def swept_keys(sweep_dir: str | Path) -> list[str]:
    """The keys (or config groups) that the Hydra multirun writing into ``sweep_dir`` sweeps, in
    command-line order; none where no sweep has started."""
    # A job's own config holds only its values; the sweeper saves the command line's before the first job.
    path = Path(sweep_dir) / "multirun.yaml"
    return list(_swept_keys_of(path.read_text(encoding="utf-8"))) if path.is_file() else []


@functools.lru_cache(maxsize=4)  # by the file's text, never stale: parsing it took ~50 ms, several times per job
def _swept_keys_of(multirun_yaml: str) -> tuple[str, ...]:
    saved = OmegaConf.select(OmegaConf.create(multirun_yaml), "hydra.overrides.task", default=[])
    return tuple(override.key_or_group for override in OverridesParser.create().parse_overrides(list(saved))
                 if override.is_sweep_override())


def folder_name_excluded_keys(sweep_dir: str) -> list[str]:
    # Hydra's exclude_keys matches whole keys, so the groups named in RESULT_NEUTRAL_KEYS are spelled
    # out; a key the sweep varies stays in, or two of its jobs would share a folder.
    swept = swept_keys(sweep_dir)
    return [key for key in schema_keys() if key_in(key, RESULT_NEUTRAL_KEYS) and key not in swept]


_job_folders: dict[str, int] = {}  # job folder -> the job of this process's sweep that has it


def job_folder(sweep_dir: str, override_dirname: str, job_num: int) -> str:
    """A sweep job's folder: its overrides as Hydra's override_dirname writes them, or its number
    when all of them are left out."""
    # Hydra keeps a value's "/" (data.path=/x/y.npz): it would nest one job's folder in another's.
    name = override_dirname.replace("%", "%25").replace("/", "%2F") or str(job_num)
    # A sweeper other than Hydra's basic one may vary a left-out key without naming it on the command line.
    owner = _job_folders.setdefault(os.path.join(sweep_dir, name), job_num)
    if owner != job_num:
        raise ConfigError(f"hydra.sweep.subdir: jobs {owner} and {job_num} would share the folder {name}: they differ "
                          f"only in keys that folder names leave out ({', '.join(RESULT_NEUTRAL_KEYS)}); name the "
                          "jobs by number instead: hydra.sweep.subdir='${hydra.job.num}'")
    return name


def varied_keys() -> list[str]:
    """What this Hydra job varies, in command-line order: under a multirun the keys (or groups)
    its sweep varies, in a single run those its command line sets that can change its result;
    none outside Hydra."""
    if not HydraConfig.initialized():
        return []
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:
        return swept_keys(hydra_config.sweep.dir)
    overrides = OverridesParser.create().parse_overrides(list(hydra_config.overrides.task))
    return [override.key_or_group for override in overrides
            if not override.is_delete() and not key_in(override.key_or_group, RESULT_NEUTRAL_KEYS)]


def register() -> None:
    ConfigStore.instance().store(name="distsgd_schema", node=Config)
    # Cached in the config: Hydra copies the cache into each job of a sweep, so jobs that a
    # launcher runs in other processes (submitit's) resolve the same sweep directory.
    OmegaConf.register_new_resolver("distsgd_run_id", run_id, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("distsgd_output_subdir", _hydra_output_subdir, replace=True)
    OmegaConf.register_new_resolver("distsgd_folder_name_excluded_keys", folder_name_excluded_keys, replace=True)
    OmegaConf.register_new_resolver("distsgd_job_folder", job_folder, replace=True)
    OmegaConf.register_new_resolver("distsgd_rank", _launch_rank, replace=True)


register()
