"""distsgd against nanoGPT's own train.py, side by side on this machine, one CPU process each
(nanoGPT's DDP path needs CUDA): tokens/s and the loss at equal tokens.

    python scripts/bench_nanogpt.py --nanogpt PATH [--steps 200] [--rounds 2]

PATH is a nanoGPT checkout (karpathy/nanoGPT: train.py, model.py, configurator.py), used as it
is and never copied into distsgd. Both train on the same data: distsgd's default corpus
(data=text's standard-library modules) as byte-level tokens, written in nanoGPT's format
(train.bin and val.bin of uint16 ids, the last 10% for validation, as its prepare.py scripts
split, and a meta.pkl of plain values) into a temporary folder; distsgd reads it through
data=text data.root. The same model shape (experiment=gpt_char's: 4 layers, 4 heads, 128 wide,
no biases, tied head), batch (32 windows of 128 tokens), AdamW (lr 2e-3, betas 0.9/0.99, weight
decay 0.1 on the >= 2-D parameters in both), warmup and cosine decay to a tenth, clipping at 1,
float32, no compilation, each library's default threads.

Rounds alternate the two (nanoGPT first in even rounds). Speed: the median time per update over
updates 10 onward, from nanoGPT's per-iteration line and from distsgd's train/tokens_per_sec at
every step (trainer.log_every=1). Loss at equal tokens: after the last update, nanoGPT's
estimate of val loss (eval_iters random batches) and distsgd's val/loss (the whole validation
set); and the mean training loss of the last 20 updates in each. What differs by design:
nanoGPT draws windows at random offsets and initialises from its own seed; its warmup ramps as
(t+1)/(W+1), distsgd's as (t+1)/W.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's distsgd, installed or not

from distsgd.metrics import read_scalars  # noqa: E402
from distsgd.text import default_corpus_files  # noqa: E402

SHAPE = dict(block_size=128, batch=32, n_layer=4, n_head=4, n_embd=128, lr=2e-3, min_lr=2e-4, warmup=50,
             beta2=0.99, weight_decay=0.1)
SKIPPED = 10  # first updates left out of the speed (start-up, the first evaluation)
LAST = 20  # updates whose training loss is averaged


def write_bins(folder: Path) -> None:
    data = np.frombuffer(b"".join(f.read_bytes() for f in default_corpus_files()), dtype=np.uint8)
    split = int(len(data) * 0.9)
    folder.mkdir(parents=True)
    data[:split].astype(np.uint16).tofile(folder / "train.bin")
    data[split:].astype(np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 256}, f)


def checked(command: list[str], **options) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **options)
    if done.returncode:
        sys.exit(f"bench_nanogpt: {' '.join(command[:3])} ... failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done


def run_nanogpt(nanogpt: Path, work: Path, steps: int) -> dict[str, float]:
    s = SHAPE
    args = ["--dataset=bench", f"--out_dir={work / 'out'}", "--device=cpu", "--compile=False", "--dtype=float32",
            f"--batch_size={s['batch']}", f"--block_size={s['block_size']}", "--gradient_accumulation_steps=1",
            f"--n_layer={s['n_layer']}", f"--n_head={s['n_head']}", f"--n_embd={s['n_embd']}", "--dropout=0.0",
            "--bias=False", f"--learning_rate={s['lr']}", f"--min_lr={s['min_lr']}", f"--warmup_iters={s['warmup']}",
            f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--beta2={s['beta2']}",
            f"--weight_decay={s['weight_decay']}", "--grad_clip=1.0", f"--eval_interval={steps}", "--eval_iters=20",
            "--log_interval=1", "--always_save_checkpoint=False"]
    # train.py reads configurator.py and data/<dataset>/ from its working folder, model.py from its own.
    (work / "configurator.py").write_bytes((nanogpt / "configurator.py").read_bytes())
    done = checked([sys.executable, str(nanogpt / "train.py"), *args], cwd=work)
    iters = [(int(i), float(loss), float(ms)) for i, loss, ms in
             re.findall(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", done.stdout, re.M)]
    val = float(re.findall(rf"^step {steps}: train loss [\d.]+, val loss ([\d.]+)", done.stdout, re.M)[0])
    ms = statistics.median(t for i, _, t in iters if SKIPPED <= i < steps)
    return {"ms": ms, "val": val, "train": statistics.mean(loss for i, loss, _ in iters if steps - LAST <= i < steps)}


def run_distsgd(data_dir: Path, run_dir: Path, steps: int) -> dict[str, float]:
    s = SHAPE
    overrides = ["data=text", f"data.root={data_dir}", f"data.block_size={s['block_size']}",
                 f"data.global_batch_size={s['batch']}", "model=gpt", f"model.n_layer={s['n_layer']}",
                 f"model.n_head={s['n_head']}", f"model.n_embd={s['n_embd']}", "optim=adamw", f"optim.lr={s['lr']}",
                 f"optim.betas=[0.9,{s['beta2']}]", f"optim.weight_decay={s['weight_decay']}", "schedule=cosine",
                 f"schedule.warmup_steps={s['warmup']}", f"schedule.min_lr={s['min_lr']}", f"trainer.max_steps={steps}",
                 "trainer.clip_grad_norm=1.0", "trainer.device=cpu", "trainer.log_every=1",
                 f"trainer.val_every={steps}", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    checked([sys.executable, "-m", "distsgd.train", *overrides], cwd=REPO, env=env)
    curves = read_scalars(run_dir / "tensorboard")
    tokens = s["batch"] * s["block_size"]
    ms = statistics.median(1e3 * tokens / e.value for e in curves["train/tokens_per_sec"] if e.step >= SKIPPED)
    return {"ms": ms, "val": curves["val/loss"][-1].value,
            "train": statistics.mean(e.value for e in curves["train/loss"] if e.step >= steps - LAST)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (train.py, model.py)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.steps <= max(SHAPE["warmup"], SKIPPED, LAST):
        parser.error(f"--steps must exceed the warmup's {SHAPE['warmup']} steps")
    missing = [name for name in ("train.py", "model.py", "configurator.py") if not (args.nanogpt / name).is_file()]
    if missing:
        sys.exit(f"bench_nanogpt: error: --nanogpt {args.nanogpt} lacks {', '.join(missing)} (a nanoGPT checkout)")
    tokens = SHAPE["batch"] * SHAPE["block_size"]
    results: dict[str, list[dict]] = {"nanogpt": [], "distsgd": []}
    with tempfile.TemporaryDirectory(prefix="distsgd-bench-nanogpt-") as tmp:
        work = Path(tmp)
        write_bins(work / "data" / "bench")
        for r in range(args.rounds):
            for name in ("nanogpt", "distsgd") if r % 2 == 0 else ("distsgd", "nanogpt"):
                result = (run_nanogpt(args.nanogpt, work, args.steps) if name == "nanogpt"
                          else run_distsgd(work / "data" / "bench", work / f"distsgd{r}", args.steps))
                results[name].append(result)
                print(f"round {r} {name:>8}: {result['ms']:.1f} ms/update, {tokens / result['ms'] * 1e3:,.0f} "
                      f"tokens/s; after {args.steps} updates ({args.steps * tokens:,} tokens): val loss "
                      f"{result['val']:.4f}, train loss (last {LAST}) {result['train']:.4f}", flush=True)
    ms = {name: statistics.median(r["ms"] for r in rs) for name, rs in results.items()}
    # Within a round the two ran minutes apart, under about the same load: their ratio is the figure.
    ratios = [n["ms"] / d["ms"] for n, d in zip(results["nanogpt"], results["distsgd"])]
    print(f"\ntokens/s (medians over rounds): distsgd {tokens / ms['distsgd'] * 1e3:,.0f}, nanoGPT "
          f"{tokens / ms['nanogpt'] * 1e3:,.0f}; distsgd/nanoGPT tokens/s {statistics.median(ratios):.3f}, the median "
          f"of the rounds' ratios ({', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
