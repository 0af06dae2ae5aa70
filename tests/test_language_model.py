"""What a language-model run logs beyond the loss: tokens/s and MFU, bits per byte, next-token
accuracy, text samples; and the start line's model and parameter-group counts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import pytest
import torch
from conftest import make_config, read_scalars, token_windows, train_alone
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distsgd import data, metrics, models, samples, train
from distsgd.config import to_config
from distsgd.distributed import Dist

TEXT = b"the quick brown fox jumps over the lazy dog; " * 24  # 1080 bytes: 67 windows of 16


@dataclass(frozen=True)
class ByteText(data.Dataset):
    """What data=text gives for byte-level text (these fields are the language-model data's)."""

    bytes_per_token: float | None = 1.0
    token_bytes: tuple[bytes, ...] | None = tuple(bytes([b]) for b in range(256))


def byte_windows(block_size: int = 16) -> ByteText:
    stream = torch.tensor(list(TEXT), dtype=torch.long)
    n = (len(stream) - 1) // block_size
    x, y = stream[:n * block_size].view(n, block_size), stream[1:n * block_size + 1].view(n, block_size)
    return ByteText(x[:48], y[:48], x[48:], y[48:], "language_model", 256)


RUN = ["model=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "optim=adamw", "optim.lr=0.01",
       "optim.weight_decay=0.1", "data.global_batch_size=16", "trainer.max_steps=12", "trainer.log_every=1",
       "trainer.val_every=6", "trainer.device=cpu", "trainer.peak_tflops=0.001"]


def test_a_language_model_run_logs_tokens_mfu_bits_accuracy_and_samples(tmp_path, caplog):
    config, dataset = to_config(make_config(*RUN)), byte_windows()
    caplog.set_level(logging.INFO, logger="distsgd")
    final = train_alone(config, dataset, tmp_path)
    torch.manual_seed(0)
    model = models.build(config.model, dataset.input_shape, 256, "language_model")
    model.load_state_dict(torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["model"])
    n, flops = model.num_params(), model.flops_per_token()
    assert flops == 6 * n + 12 * 2 * 16 * 32
    start = (f"model: {n:,} parameters without the position embedding ({n + 16 * 32:,} with it); {flops:,} FLOPs "
             f"per token (6N + 12 L T d, for train/mfu); parameter groups: 10 tensors ({n + 16 * 32 - 160:,} "
             "parameters) with weight decay 0.1; 5 tensors (160 parameters) with weight decay 0")
    assert start in caplog.messages

    curves = read_scalars(tmp_path)
    rates = {tag: dict(curves[tag]) for tag in ("train/samples_per_sec", "train/tokens_per_sec", "train/mfu")}
    assert sorted(rates["train/mfu"]) == list(range(1, 12))  # no rate at step 0 (start-up)
    for step, samples_per_sec in rates["train/samples_per_sec"].items():
        assert rates["train/tokens_per_sec"][step] == pytest.approx(16 * samples_per_sec, rel=1e-6)
        # trainer.peak_tflops=0.001: 1e9 FLOP/s on the one device.
        assert rates["train/mfu"][step] == pytest.approx(rates["train/tokens_per_sec"][step] * flops / 1e9, rel=1e-6)

    # val/loss in nats per token over every validation token, val/accuracy the next token's, in bits per byte.
    with torch.no_grad():
        logits = model.eval()(dataset.x_val)
    loss = models.loss_fn("language_model")(logits, dataset.y_val).item()
    assert final["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert final["val/accuracy"] == (logits.argmax(-1) == dataset.y_val).sum().item() / dataset.y_val.numel()
    assert final["val/bits_per_byte"] == pytest.approx(final["val/loss"] / math.log(2), rel=1e-12)
    assert "val/bits_per_token" not in final
    assert curves["train/loss"][-1][1] < 0.6 * curves["train/loss"][0][1]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    assert sorted(texts) == [0, 6, 12]
    prompt = TEXT[48 * 16:48 * 16 + 8].decode()  # the first validation window's first half
    assert f"**prompt**\n\n    {prompt}" in texts[12] and "**temperature 0**" in texts[12]
    # The text is a function of the model, trainer.seed and the step alone: last.pt samples it again.
    assert samples.Samples(dataset, config.trainer.seed, torch.device("cpu"))(model, 12) == texts[12]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_with_dropout_each_rank_draws_its_own_masks(dropout):
    config = to_config(make_config(*RUN, f"model.dropout={dropout}"))
    models_and_draws = []
    for rank in (0, 1):
        model, _, _ = train.build(config, token_windows(vocab_size=256), Dist(rank, 2, rank, torch.device("cpu")), 0.1)
        models_and_draws.append((model.state_dict(), torch.rand(4)))
    (model0, draw0), (model1, draw1) = models_and_draws
    assert all(torch.equal(model0[k], model1[k]) for k in model0)  # the same initialisation on every rank
    # One seed for all would give every rank the same masks for its different samples.
    assert torch.equal(draw0, draw1) == (dropout == 0)


def test_samples_decode_the_tokens_bytes_or_show_their_ids():
    assert samples.decoder(byte_windows())([104, 105, 0xE2, 0x82, 0xAC]) == "hi\u20ac"
    assert samples.decoder(byte_windows())([0xFF]) == "\ufffd"  # not UTF-8: replaced, not an error
    characters = replace(byte_windows(), token_bytes=(b"a", "\u00e9".encode(), b"\n"))  # a meta.pkl's vocabulary
    assert samples.decoder(characters)([1, 0, 2]) == "\u00e9a\n"
    assert samples.decoder(token_windows())([3, 14, 15]) == "3 14 15"  # nothing says what the ids stand for
    assert samples.indented("a\n```\nb") == "    a\n    ```\n    b"


def test_peak_flops_by_gpu_name_or_the_config(monkeypatch):
    cuda, names = torch.device("cuda", 0), iter(["NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB",
                                                 "NVIDIA GeForce GTX 1080"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: next(names))
    assert [metrics.peak_flops(cuda, None) for _ in range(4)] == [756e12, 989e12, 312e12, None]
    assert metrics.peak_flops(cuda, 100.0) == 100e12
    assert metrics.peak_flops(torch.device("cpu"), None) is None
    # Two devices at 1e12 FLOP/s each, 1000 tokens/s of 1e9 FLOPs: half the peak.
    rates = metrics.TokenRates(tokens_per_sample=10, flops_per_token=10**9, peak_flops=2e12).of(100.0)
    assert rates == {"train/tokens_per_sec": 1000.0, "train/mfu": 0.5}
    assert metrics.TokenRates(10, 10**9, None).of(100.0) == {"train/tokens_per_sec": 1000.0}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
def test_on_cuda_a_compiled_bf16_gpt_with_fused_adamw_trains_and_logs_its_mfu(tmp_path):
    cuda = [*RUN[:-2], "trainer.device=cuda", "trainer.precision=bf16"]
    peak = [] if metrics.peak_flops(torch.device("cuda"), None) else ["trainer.peak_tflops=100"]  # a GPU not in the table
    runs = {name: train_alone(to_config(make_config(*cuda, *peak, *extra)), byte_windows(), tmp_path / name)
            for name, extra in (("eager", []), ("compiled", ["trainer.compile=true"]))}
    state = torch.load(tmp_path / "compiled/checkpoints/last.pt", weights_only=True)
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])
    assert not any(key.startswith("_orig_mod.") for key in state["model"])
    for name in runs:
        curve = [v for _, v in read_scalars(tmp_path / name)["train/loss"]]
        assert curve[-1] < 0.6 * curve[0], name
        assert 0 < runs[name]["train/mfu"] < 1, name
    assert runs["compiled"]["val/loss"] == pytest.approx(runs["eager"]["val/loss"], rel=0.05)


def test_a_small_gpt_approaches_the_markov_chains_loss_floor(tmp_path):
    # A bigram chain over 8 tokens: its floor is the entropy rate, 1.392 nats per token. 102
    # validation windows of 32 tokens put about +-0.02 nats of sampling noise around it, so the
    # tolerance is 0.05; at the start the loss is ln 8 = 2.08, 0.7 above it.
    train.run(make_config("model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "data=markov",
                          "data.vocab_size=8", "data.order=1", "data.num_tokens=32768", "data.block_size=32",
                          "data.global_batch_size=32", "optim=adamw", "optim.lr=0.01", "trainer.max_steps=300",
                          "trainer.val_every=100", "trainer.log_every=100"), tmp_path)
    curves = read_scalars(tmp_path)
    floor = curves["val/loss_floor"][-1][1]
    assert floor == pytest.approx(1.3918, abs=1e-4)
    assert curves["val/loss"][0][1] > floor + 0.5
    assert abs(curves["val/loss"][-1][1] - floor) < 0.05
