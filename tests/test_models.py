import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distsgd import batchnorm, models
from distsgd.config import ConfigError, ModelConfig

BATCH = 3


def _build(shape: tuple[int, ...], task: str = "classification", num_outputs: int = 10, **model) -> nn.Module:
    return models.build(ModelConfig(**model), shape, num_outputs, task)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model, shape, task, num_outputs", [
    (dict(name="linear"), (16,), "regression", 2),
    (dict(name="logistic"), (16,), "classification", 4),
    (dict(name="mlp", depth=2), (16,), "classification", 4),
    (dict(name="mlp", depth=0), (16,), "regression", 1),
    (dict(name="cnn"), (1, 8, 8), "classification", 10),
    (dict(name="cnn"), (1, 28, 28), "classification", 10),
    (dict(name="cnn", width=16, activation="tanh"), (3, 32, 32), "classification", 10),
    (dict(name="resnet", depth=20), (3, 32, 32), "classification", 10),
    (dict(name="resnet", depth=32), (3, 32, 32), "classification", 10),
    (dict(name="resnet", depth=56), (3, 32, 32), "classification", 10),
    (dict(name="resnet", depth=18), (3, 32, 32), "classification", 10),
    (dict(name="resnet", depth=20), (1, 8, 8), "classification", 10),
])
def test_output_shape(model, shape, task, num_outputs):
    net = _build(shape, task, num_outputs, **model)
    assert net(torch.randn(BATCH, *shape)).shape == (BATCH, num_outputs)


# He et al. 2016 (Table 6) publish 0.27M / 0.46M / 0.85M for ResNet-20/32/56 with the
# parameter-free option-A shortcuts; the counts below (10 classes) are within 1% of those.
# ResNet-18 with a 3x3 stem has the 11.17M of the usual CIFAR baselines.
@pytest.mark.parametrize("depth, count, published", [
    (20, 269_722, 0.27e6), (32, 464_154, 0.46e6), (56, 853_018, 0.85e6), (18, 11_173_962, 11.17e6),
])
def test_resnet_parameter_counts(depth, count, published):
    n = _num_params(_build((3, 32, 32), name="resnet", depth=depth))
    assert n == count
    assert abs(n - published) / published < 0.02


def test_cnn_width_scales_channels():
    convs = [m for m in _build((1, 28, 28), name="cnn", width=32).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32]


@pytest.mark.parametrize("model, shape, task, key", [
    (dict(name="resnet", depth=2), (3, 32, 32), "classification", "model.depth"),
    (dict(name="resnet", depth=50), (3, 32, 32), "classification", "model.depth"),
    (dict(name="resnet", depth=20), (3, 32, 32), "regression", "model=resnet"),
    (dict(name="cnn"), (1, 28, 28), "regression", "model=cnn"),
    (dict(name="cnn"), (784,), "classification", "model=cnn"),
    (dict(name="resnet", depth=20), (3, 2, 2), "classification", "model=resnet"),
    (dict(name="linear"), (16,), "classification", "model=linear"),
    (dict(name="logistic"), (16,), "regression", "model=logistic"),
])
def test_config_errors_name_the_key(model, shape, task, key):
    with pytest.raises(ConfigError, match=key):
        _build(shape, task, **model)


@pytest.mark.parametrize("name, task", [("linear", "regression"), ("logistic", "classification")])
def test_linear_models_without_bias_from_zero(name, task):
    default = dict(_build((4, 2), task, 3, name=name).named_parameters())
    net = _build((4, 2), task, 3, name=name, bias=False, init="zeros")
    params = dict(net.named_parameters())
    assert set(default) == {"1.weight", "1.bias"} and set(params) == {"1.weight"}
    assert params["1.weight"].shape == (3, 8) and not params["1.weight"].any()
    assert default["1.weight"].any()
    assert not _build((8,), task, 3, name=name, init="zeros")(torch.randn(BATCH, 8)).any()


@pytest.mark.parametrize("model, message", [
    (dict(name="mlp", bias=False), "model.bias must be left at True with model=mlp"),
    (dict(name="cnn", init="zeros"), "model.init must be left at 'default' with model=cnn"),
    (dict(name="linear", init="ones"), "model.init must be one of default|zeros"),
])
def test_bias_and_init_are_for_linear_models(model, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**model)


def test_bad_shape_message_names_the_shape():
    with pytest.raises(ConfigError, match=r"\(784,\)"):
        _build((784,), name="cnn")


def test_has_batchnorm():
    assert batchnorm.has_batchnorm(_build((3, 32, 32), name="resnet", depth=20))
    assert not batchnorm.has_batchnorm(_build((1, 8, 8), name="cnn"))
    assert not batchnorm.has_batchnorm(_build((16,), name="mlp"))


def assert_converted_like_batchnorm(device: torch.device, backend: str, kind: type, batch: int,
                                    out_rtol: float = 1e-5) -> None:
    """convert_sync_bn on ``device`` gives layers of ``kind`` under the same state_dict keys, and on
    one rank the outputs, gradients and running statistics of plain BatchNorm (test_cuda uses it too)."""
    torch.manual_seed(0)
    net = models.build(ModelConfig(name="resnet", depth=20), (3, 32, 32), 10, "classification").to(device)
    reference = copy.deepcopy(net)
    synced = batchnorm.convert_sync_bn(net, device).to(device)
    kinds = {type(m) for m in synced.modules()}
    assert kind in kinds and nn.BatchNorm2d not in kinds
    assert batchnorm.has_batchnorm(synced)
    assert set(synced.state_dict()) == set(reference.state_dict())  # checkpoints load into either form
    x = torch.randn(batch, 3, 32, 32, device=device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        out, expected = synced(x), reference(x)
        out.square().sum().backward()
        expected.square().sum().backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(out, expected, rtol=out_rtol, atol=1e-5)
    for (name, a), b in zip(synced.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(synced.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=name)
    synced.eval(), reference.eval()
    torch.testing.assert_close(synced(x), reference(x), rtol=out_rtol, atol=1e-5)


def test_convert_sync_bn_on_cpu_keeps_keys_and_equals_batchnorm_on_one_rank():
    assert_converted_like_batchnorm(torch.device("cpu"), "gloo", batchnorm.GlobalBatchNorm, BATCH)


def test_cnn_sgd_reduces_loss():
    torch.manual_seed(0)
    net = _build((1, 8, 8), name="cnn", width=16)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    loss_fn = models.loss_fn("classification")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    first = loss_fn(net(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    # Memorising 32 random samples: the loss falls from ~ln(10) to well under a quarter of it.
    assert loss_fn(net(x), y).item() < first / 4


GPT = dict(name="gpt", n_layer=2, n_head=2, n_embd=32, bias=False)


def _gpt(block_size: int = 16, vocab_size: int = 50, **model) -> nn.Module:
    return _build((block_size,), "language_model", vocab_size, **{**GPT, **model})


@pytest.mark.parametrize("bias", [False, True])
def test_gpt_shapes_and_parameter_count(bias):
    torch.manual_seed(0)
    net = _gpt(bias=bias)
    assert net(torch.randint(50, (BATCH, 16))).shape == (BATCH, 16, 50)
    assert net(torch.randint(50, (BATCH, 5))).shape == (BATCH, 5, 50)  # a shorter context
    d, layers = 32, 2
    # Per block: qkv 3d^2, projection d^2, MLP 8d^2, two LayerNorm gains (with biases: 9d in the
    # Linear layers, 2d in the norms); then the token embedding (the head's matrix) and the final norm.
    per_block = 12 * d * d + 2 * d + (11 * d if bias else 0)
    expected = layers * per_block + 50 * d + d * (2 if bias else 1)
    assert net.num_params() == expected
    assert _num_params(net) == expected + 16 * d  # the position embedding, left out of num_params
    assert net.flops_per_token() == 6 * expected + 12 * layers * 16 * d


def test_gpt2_small_has_gpt2s_parameter_count():
    # GPT-2 small (12 layers, 12 heads, 768 wide, with biases, 50257 tokens, context 1024) has the
    # 124,439,808 parameters of the published checkpoint; nanoGPT's count without the position
    # embedding is 123.65M. On the meta device: no memory, no initialisation.
    with torch.device("meta"):
        net = _gpt(1024, 50257, n_layer=12, n_head=12, n_embd=768, bias=True)
    assert _num_params(net) == 124_439_808
    assert net.num_params() == 124_439_808 - 1024 * 768


def test_gpt_is_causal_and_its_head_is_the_token_embedding():
    torch.manual_seed(0)
    net = _gpt().eval()
    x = torch.randint(50, (BATCH, 16))
    changed = x.clone()
    changed[:, 9:] = (x[:, 9:] + 1) % 50
    out, out_changed = net(x), net(changed)
    torch.testing.assert_close(out[:, :9], out_changed[:, :9])  # positions before 9 see nothing after
    assert not torch.allclose(out[:, 9:], out_changed[:, 9:])
    torch.testing.assert_close(out, net.hidden(x) @ net.token.weight.T)
    assert not any("head" in name for name, _ in net.named_parameters())


def test_gpt_initialisation_is_gpt2s():
    torch.manual_seed(0)
    net = _gpt(n_layer=8, n_embd=64, bias=True)
    block = net.blocks[3]
    for weight in (net.token.weight, net.position.weight, block.attention.qkv.weight, block.mlp[0].weight):
        assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    for weight in block.residual_projections():  # scaled by 1/sqrt(2 n_layer) = 1/4
        assert weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert not block.attention.qkv.bias.any() and (block.attention_norm.weight == 1).all()


@pytest.mark.parametrize("model, task, message", [
    (dict(GPT, n_embd=30, n_head=4), "language_model", "model.n_embd must be a positive multiple of model.n_head=4"),
    (dict(GPT, dropout=1.0), "language_model", r"model.dropout must be in \[0, 1\)"),
    (GPT, "classification", "model=gpt is for language modelling but the data is classification"),
    (dict(name="mlp"), "language_model", "model=mlp does not model language .*; use model=gpt"),
    (dict(name="mlp", n_layer=3), "classification", "model.n_layer must be left at 4 with model=mlp"),
])
def test_gpt_config_errors_name_the_key(model, task, message):
    with pytest.raises(ConfigError, match=message):
        _build((16,), task, 50, **model)


def test_language_model_loss_is_the_mean_over_every_token():
    torch.manual_seed(0)
    logits, targets = torch.randn(BATCH, 5, 7), torch.randint(7, (BATCH, 5))
    by_hand = -logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T) nats
    loss_fn = models.loss_fn("language_model")
    torch.testing.assert_close(loss_fn(logits, targets), by_hand.mean())
    # reduction="none", as validate.py reads it: one loss per token, reshapeable to (N, T).
    torch.testing.assert_close(loss_fn(logits, targets, reduction="none").reshape(BATCH, -1), by_hand)


def test_generate_draws_from_its_generator_only():
    torch.manual_seed(0)
    net = _gpt(block_size=8)
    prompt = torch.randint(50, (1, 4))
    state = torch.get_rng_state()
    rows = [net.generate(prompt, 12, [0.0, 1.0, 1.0], torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state) and net.training  # the training RNG and mode untouched
    assert torch.equal(rows[0], rows[1]) and rows[0].shape == (3, 16)
    assert torch.equal(rows[0][:, :4], prompt.repeat(3, 1))
    assert not torch.equal(rows[0][1], rows[0][2])  # two samples at temperature 1
    greedy = prompt
    for _ in range(12):  # argmax over the last 8 tokens at most, as the context allows
        greedy = torch.cat([greedy, net.eval()(greedy[:, -8:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(rows[0][0], greedy[0])
