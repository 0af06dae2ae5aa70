"""Where the LR range test's suggestion lands against the best rate of a grid of full runs.

    python scripts/lr_find_bias.py --out /tmp/lr_find_bias

For each config: a grid of rates 10^(k/8) trained for a fixed budget (the final training-set loss
ranks them, as the lr study does) and distsgd's range test (1e-4 to 10 in 100 updates) on the same
config and seed; the table gives the steepest descent over the grid's best rate, read where the
smoothed loss shows it and read back by the smoothing's lag (what distsgd.lr_find suggests), and
the other rule, the lowest smoothed loss / 10. The digits MLP, where the suspicion arose, is the
tuning config; the others test the rule. Markdown on stdout, every number in bias.json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's distsgd, installed or not

from distsgd import lr_find  # noqa: E402
from distsgd.config import to_config  # noqa: E402
from distsgd.studies import runs  # noqa: E402

RANGE_TEST = ["lr_find.min_lr=1e-4", "lr_find.max_lr=10"]
# name: (overrides, updates per grid run, grid exponents k of 10^(k/8), (data seed, trainer seed) pairs)
CONFIGS = {
    "digits MLP, SGD (tuning)": (["data=digits", "model=mlp", "optim=sgd"], 600, range(-16, 9), [(0, 0)]),
    "synthetic MLP, SGD": (["data=synthetic", "model=mlp", "optim=sgd"], 600, range(-16, 9), [(3, 3), (4, 4), (5, 5)]),
    "least squares, SGD": (["data=synthetic_regression", "model=linear", "optim=sgd"], 200, range(-16, 5),
                           [(3, 3), (4, 4), (5, 5)]),
}


def measure(out: Path, name: str, overrides: list[str], steps: int, exponents, seed: tuple[int, int]) -> dict:
    tag = f"{name.split(',')[0].replace(' ', '_')}_d{seed[0]}t{seed[1]}"
    seeded = [*overrides, f"data.seed={seed[0]}", f"trainer.seed={seed[1]}"]
    lrs = [10 ** (k / 8) for k in exponents]
    grid = runs.train_all(out, {f"{tag}/lr{lr:.3g}": [*seeded, f"optim.lr={lr:.4g}", f"trainer.max_steps={steps}"]
                                for lr in lrs}, workers=2)
    losses = [result.final_train_loss() for result in grid.values()]
    best = lrs[int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan)))]
    cfg, run_dir = runs.prepare(out, f"{tag}/lr_find", [*seeded, *RANGE_TEST], program="distsgd-lr-find")
    sweep = lr_find.run(cfg, run_dir)
    suggestion = sweep.suggest(to_config(cfg).lr_find)
    steepest_row = suggestion.rows[0]
    return {"config": name, "seed": list(seed), "grid": lrs, "final_train_loss": losses, "best": best,
            "steepest_as_read": sweep.lrs[steepest_row], "steepest": suggestion.steepest,
            "lowest_over_10": suggestion.lowest / 10,
            "lag_updates": lr_find.lag(steepest_row, to_config(cfg).lr_find.beta)}


def table(rows: list[dict]) -> str:
    lines = ["| config | data, trainer seed | grid-best rate | steepest descent as read (/ best) | read back by "
             "the lag, suggested (/ best) | lowest / 10 (/ best) |", "|---|---|---|---|---|---|"]
    for r in rows:
        best = r["best"]
        lines.append(f"| {r['config']} | {r['seed'][0]}, {r['seed'][1]} | {best:.3g} | "
                     f"{r['steepest_as_read']:.3g} ({r['steepest_as_read'] / best:.2f}x) | "
                     f"{r['steepest']:.3g} ({r['steepest'] / best:.2f}x) | "
                     f"{r['lowest_over_10']:.3g} ({r['lowest_over_10'] / best:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and bias.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs.quiet()
    rows = [measure(args.out, name, overrides, steps, exponents, seed)
            for name, (overrides, steps, exponents, seeds) in CONFIGS.items() for seed in seeds]
    (args.out / "bias.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
