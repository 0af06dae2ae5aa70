"""Every model x optimizer x precision x engine x sync_bn x accumulate, covered pairwise, on 2 processes.

Each case trains a few steps with a checkpoint at step K, then a second run starts in a fresh
directory holding only the checkpoints up to K (as a run killed right after saving step K leaves
it) and resumes from there. The bar is test_resume's: on CPU and at the same world size, the
resumed run ends bitwise where the uninterrupted one does (the whole final checkpoint: model,
optimizer, scaler, RNG states of both ranks) and returns the same final metrics; the metrics are
finite, no step was skipped as non-finite, the steps after K changed the model, the final val/loss
is the one logged and the one of ``last.pt`` evaluated again on the same ranks.

Two processes are spawned once, and each runs every case in-process (``train.train``, as
``train.run`` calls it), since a torchrun launch per case would cost seconds each.

Pairwise, with one refinement: ``model.sync_bn`` acts only on a model with BatchNorm (elsewhere it
is a config error), so a pair of sync_bn and another factor (precision, engine, ...) counts as
covered only by a case whose model has BatchNorm. The point is exactly such pairs: sync_bn with bf16 once crashed at step 0. The
greedy set has 49 cases, the fewest possible: 7 optimizers for each of the 5 models without
BatchNorm, and for resnet each optimizer with sync_bn on and off.

The GPT cases train with dropout (model.dropout=0.1): its masks come from each rank's RNG, which
the checkpoints keep, so the bitwise resume holds with them too (at another world size it does not:
README, Language models; test_distributed checks world-size invariance without dropout).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed
from conftest import CONF, make_config, on_two_gloo_ranks, read_scalars, token_windows
from test_resume import assert_bitwise_equal, interrupted_after

from distsgd import batchnorm, data, distributed, models, resume
from distsgd.config import MODELS, Config, to_config
from distsgd.distributed import Dist
from distsgd.step import autocast
from distsgd.train import train
from distsgd.validate import validate

STEPS, INTERRUPTED_AT = 4, 2
# The factors under test and their values. Models and optimizer presets come from the package and
# conf/, so that a new one joins the cases by itself (and fails DATA below until it has data).
FACTORS: dict[str, tuple] = {
    "model": MODELS,
    "optim": tuple(sorted(p.stem for p in (CONF / "optim").glob("*.yaml"))),
    "precision": ("32", "bf16", "fp16"),
    "allreduce": ("ddp", "manual"),
    "sync_bn": (False, True),
    "accumulate": (1, 2),
}
# 64 samples, a quarter for validation: 48 training samples, 3 global batches of 16 per epoch, so
# the resume at step 2 is mid-epoch and the run crosses an epoch boundary after it. Validation at
# steps 0, 3 and 4: the save at step 2 is not also a validation step (both make plain BatchNorm's
# running statistics agree across ranks). A cosine schedule with warmup gives every step its own
# learning rate.
COMMON = ["data.num_samples=64", "data.val_fraction=0.25", "data.global_batch_size=16", "trainer.device=cpu",
          f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every={INTERRUPTED_AT}", "trainer.val_every=3",
          "trainer.log_every=1", "schedule=cosine", "schedule.warmup_steps=1"]
VECTORS = ["data=synthetic", "data.dim=8"]
DATA = {
    "linear": ["data=synthetic_regression", "data.dim=8"],
    "logistic": VECTORS,
    "mlp": VECTORS + ["model.width=8"],
    "cnn": ["data=npz", "data.path={images}", "model.width=8"],
    "resnet": ["data=npz", "data.path={images}"],  # depth 20, the smallest; its widths are fixed
    # conftest.token_windows: 64 windows of 16 tokens, the last 16 for validation, as above.
    "gpt": ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.dropout=0.1"],
}
# The data of the GPT cases: COMMON's data keys are the vector sets' (data.num_samples), which
# data=markov and data=text refuse as keys they ignore.
GIVEN_DATA = {"gpt": token_windows}
IMAGE_SHAPE = (1, 8, 8)


def has_batchnorm(model_name: str) -> bool:
    model = to_config(make_config(f"model={model_name}")).model  # its conf/ defaults (resnet: depth 20)
    if model_name == "gpt":
        return batchnorm.has_batchnorm(models.build(model, (16,), 32, "language_model"))
    task = "regression" if model_name == "linear" else "classification"
    return batchnorm.has_batchnorm(models.build(model, IMAGE_SHAPE, 4, task))


def valid(case: dict, bn_models: set) -> bool:
    # model.sync_bn=true on a model without BatchNorm is a config error (it would do nothing).
    return not (case.get("sync_bn") and case.get("model", next(iter(bn_models))) not in bn_models)


def counts(case: dict, pair: tuple, bn_models: set) -> bool:
    """Whether ``case`` covers ``pair`` = ((factor, value), (factor, value)) in a way that matters."""
    if any(case.get(f, object()) != v for f, v in pair):
        return False
    factors = {f for f, _ in pair}
    return "sync_bn" not in factors or "model" in factors or case.get("model") in bn_models


def required_pairs(bn_models: set) -> list[tuple]:
    return [pair for f1, f2 in itertools.combinations(FACTORS, 2) for v1 in FACTORS[f1] for v2 in FACTORS[f2]
            if valid(dict(pair := ((f1, v1), (f2, v2))), bn_models)]


def pairwise_cases(bn_models: set) -> list[dict]:
    """A small covering set, deterministically: each case starts from the first pair still
    uncovered, then takes for each other factor the value that covers most uncovered pairs."""
    uncovered = required_pairs(bn_models)
    cases = []
    while uncovered:
        seed = uncovered[0]
        case = dict(seed)
        for factor in FACTORS:
            if factor in case:
                continue

            def score(value):
                trial = {**case, factor: value}
                return (valid(trial, bn_models), counts(trial, seed, bn_models),
                        sum(counts(trial, p, bn_models) for p in uncovered))

            case[factor] = max(FACTORS[factor], key=score)  # the first of equals: deterministic
        case = {f: case[f] for f in FACTORS}
        cases.append(case)
        uncovered = [p for p in uncovered if not counts(case, p, bn_models)]
    return cases


def name_of(case: dict) -> str:
    return "-".join(f"{v}" if f in ("model", "optim") else f"{f}={v}" for f, v in case.items())


def overrides(case: dict, images: Path) -> list[str]:
    return [*COMMON, *(o.format(images=images) for o in DATA[case["model"]]), f"model={case['model']}",
            f"optim={case['optim']}", f"trainer.precision={case['precision']}",
            f"trainer.allreduce={case['allreduce']}", f"model.sync_bn={str(case['sync_bn']).lower()}",
            f"trainer.accumulate={case['accumulate']}"]


def write_images(path: Path) -> Path:
    # Labels from the images' mean brightness: learnable, so the loss means something.
    gen = np.random.default_rng(0)
    x = gen.normal(size=(64, *IMAGE_SHAPE)).astype(np.float32)
    y = np.digitize(x.mean(axis=(1, 2, 3)), np.quantile(x.mean(axis=(1, 2, 3)), [0.25, 0.5, 0.75]))
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def train_in(config: Config, dataset: data.Dataset, dist: Dist, run_dir: Path) -> dict[str, float]:
    """What train.run does on a process group that already exists."""
    resume_from = distributed.decided_by_rank0(lambda: resume.choose(config.trainer, run_dir / "checkpoints"))
    return train(config, dataset, dist, run_dir, resume_from)


def evaluate_saved(config: Config, dataset: data.Dataset, dist: Dist, path: Path) -> dict[str, float]:
    """The validation metrics of the model in ``path``, loaded into a model built afresh (as a user
    evaluating last.pt would) and sharded over the ranks as in training."""
    model = models.build(config.model, dataset.input_shape, dataset.num_outputs, dataset.task)
    if config.model.sync_bn and batchnorm.has_batchnorm(model):
        model = batchnorm.convert_sync_bn(model, dist.device)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    val_idx = data.val_indices(len(dataset.x_val), dist.rank, dist.world_size, dist.device)
    return validate(model, dataset, val_idx, models.loss_fn(dataset.task),
                    autocast(dist.device, config.trainer.precision))


def train_every_case(dist: Dist, root: Path, configs: dict) -> dict:
    """One rank's part (conftest.on_two_gloo_ranks): every case, uninterrupted and resumed, and
    the uninterrupted run's last.pt evaluated again."""
    datasets, results = {}, {}
    for name, config in configs.items():
        given = GIVEN_DATA.get(config.model.name)
        key = config.model.name if given else repr(config.data)
        if key not in datasets:
            datasets[key] = (given() if given else data.load(config.data)).place(dist.device, True, 0)
        dataset = datasets[key]
        try:
            uninterrupted = train_in(config, dataset, dist, root / name / "uninterrupted")
            if dist.is_main:
                interrupted_after(root / name / "uninterrupted", INTERRUPTED_AT, root / name / "resumed")
            torch.distributed.barrier()
            resumed = train_in(config, dataset, dist, root / name / "resumed")
            reevaluated = evaluate_saved(config, dataset, dist, root / name / "uninterrupted/checkpoints/last.pt")
        except Exception as err:
            err.add_note(f"in case {name} (rank {dist.rank}'s stderr: {root / f'rank{dist.rank}.stderr'})")
            raise
        results[name] = {"uninterrupted": uninterrupted, "resumed": resumed, "reevaluated": reevaluated}
    return results


def assert_same_values(a: dict, b: dict, what: str) -> None:
    """Equal keys and bitwise equal values, NaN equal to NaN (fp16 runs may log a NaN gradient norm)."""
    assert sorted(a) == sorted(b), what
    np.testing.assert_array_equal(np.array([a[k] for k in sorted(a)], dtype=float),
                                  np.array([b[k] for k in sorted(a)], dtype=float), err_msg=what, strict=True)


def check_case(run_dir: Path, returned: dict) -> None:
    uninterrupted, resumed = returned["uninterrupted"], returned["resumed"]
    final = {run: torch.load(run_dir / run / "checkpoints/last.pt", weights_only=True)
             for run in ("uninterrupted", "resumed")}
    assert final["uninterrupted"]["step"] == STEPS
    assert_bitwise_equal(final["resumed"], final["uninterrupted"], "the resumed run's last.pt")
    at_k = torch.load(run_dir / "resumed/checkpoints" / f"step_{INTERRUPTED_AT:08d}.pt", weights_only=True)
    assert at_k["step"] == INTERRUPTED_AT
    assert any(not torch.equal(at_k["model"][k], v) for k, v in final["resumed"]["model"].items()), (
        f"the steps after {INTERRUPTED_AT} left the model as it was (fp16 overflows? scaler "
        f"{final['resumed']['scaler']}): the resume check would be vacuous")

    timing = ("train/samples_per_sec", "train/tokens_per_sec")
    assert_same_values({k: v for k, v in resumed.items() if k not in timing},
                       {k: v for k, v in uninterrupted.items() if k not in timing}, "the final metrics")
    assert uninterrupted["train/skipped_steps"] == 0
    assert math.isfinite(uninterrupted["train/loss"]) and math.isfinite(uninterrupted["val/loss"]), uninterrupted
    evaluated = {k: v for k, v in uninterrupted.items() if k.startswith("val/") and not k.startswith("val/best_")}
    assert returned["reevaluated"] == evaluated, \
        "the final val metrics are not those of last.pt evaluated again on the same ranks"

    logged = {run: read_scalars(run_dir / run) for run in ("uninterrupted", "resumed")}
    # TensorBoard keeps float32.
    assert logged["uninterrupted"]["val/loss"][-1] == (STEPS, float(np.float32(uninterrupted["val/loss"])))
    # The resumed run logs the uninterrupted run's values from step K on (the curves of a run that
    # restarts show one value per step, the same as without the interruption).
    curves = {run: {tag: dict(points) for tag, points in logged[run].items() if tag not in timing} for run in logged}
    assert sorted(curves["resumed"]) == sorted(curves["uninterrupted"])
    for tag, points in curves["uninterrupted"].items():
        assert_same_values(curves["resumed"][tag], {s: v for s, v in points.items() if s >= INTERRUPTED_AT}, tag)


@pytest.mark.slow  # about 25 s on 2 cores; CI runs it (pytest runs every test)
def test_pairwise_combinations_run_and_resume_bitwise(tmp_path):
    bn_models = {m for m in FACTORS["model"] if has_batchnorm(m)}
    assert bn_models, "no model has BatchNorm: model.sync_bn would be tested nowhere"
    cases = pairwise_cases(bn_models)
    # The covering set is checked here, not trusted: every pair of values of any two factors.
    missing = [p for p in required_pairs(bn_models) if not any(counts(c, p, bn_models) for c in cases)]
    assert not missing, missing
    assert all(valid(c, bn_models) for c in cases)
    assert len(cases) <= 50, f"{len(cases)} cases: the suite's time budget was planned for 49"

    images = write_images(tmp_path / "images.npz")
    configs = {name_of(c): to_config(make_config(*overrides(c, images))) for c in cases}
    returned = on_two_gloo_ranks(train_every_case, tmp_path, configs)[0]
    problems = []
    for name in configs:
        try:
            check_case(tmp_path / name, returned[name])
        except AssertionError as err:
            problems.append(f"{name}: {err}")
    assert not problems, "\n".join(problems)
