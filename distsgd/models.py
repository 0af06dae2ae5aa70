"""Models: built from the model config and the shape of the data."""

from __future__ import annotations

import math

import torch
from torch import nn

from distsgd.config import ConfigError, ModelConfig
from distsgd.gpt import GPT

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
RESNET_DEPTHS = (18, 20, 32, 56)


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, task: str) -> nn.Module:
    in_features = math.prod(input_shape)
    if (task == "language_model") != (cfg.name == "gpt"):
        raise ConfigError(f"model={cfg.name} is for language modelling but the data is {task}" if cfg.name == "gpt"
                          else f"model={cfg.name} does not model language (the data's task); use model=gpt")
    match cfg.name:
        case "gpt":
            # A sample is a window of block_size token ids; the vocabulary is the number of outputs.
            return GPT(cfg, block_size=input_shape[0], vocab_size=num_outputs)
        case "linear" | "logistic":
            expected = "regression" if cfg.name == "linear" else "classification"
            if task != expected:
                other = "logistic" if cfg.name == "linear" else "linear"
                raise ConfigError(f"model={cfg.name} is for {expected} but the data is {task}; use model={other}")
            layer = nn.Linear(in_features, num_outputs, bias=cfg.bias)
            if cfg.init == "zeros":
                for param in layer.parameters():
                    nn.init.zeros_(param)
            return nn.Sequential(nn.Flatten(), layer)
        case "mlp":
            layers: list[nn.Module] = [nn.Flatten()]
            width = in_features
            for _ in range(cfg.depth):
                layers += [nn.Linear(width, cfg.width), ACTIVATIONS[cfg.activation]()]
                width = cfg.width
            layers.append(nn.Linear(width, num_outputs))
            return nn.Sequential(*layers)
        case "cnn" | "resnet":
            if task != "classification":
                raise ConfigError(f"model={cfg.name} is for classification but the data is {task}; "
                                  "use model=linear or model=mlp")
            # The cnn's two 2x max-pools must leave at least one pixel, hence H, W >= 4.
            if len(input_shape) != 3 or min(input_shape[1:]) < 4:
                raise ConfigError(f"model={cfg.name} needs images of shape (C, H, W) with H, W >= 4, "
                                  f"got input shape {tuple(input_shape)}")
            builder = _cnn if cfg.name == "cnn" else _resnet
            return builder(cfg, input_shape[0], num_outputs)


def _cnn(cfg: ModelConfig, in_channels: int, num_outputs: int) -> nn.Module:
    # LeNet-style, scaled by model.width: conv channels width//2 and width, hidden layer 2*width
    # (32/64/128 at the default width 64, about 86k parameters on MNIST: quick on a CPU).
    c1, c2 = max(cfg.width // 2, 1), cfg.width
    act = ACTIVATIONS[cfg.activation]
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2), act(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), act(), nn.MaxPool2d(2),
        # A fixed 2x2 grid whatever the image size: 8x8 digits, 28x28 MNIST and 32x32 CIFAR alike.
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(4 * c2, 2 * cfg.width), act(),
        nn.Linear(2 * cfg.width, num_outputs),
    )


def _resnet(cfg: ModelConfig, in_channels: int, num_outputs: int) -> nn.Module:
    # model.width is not used: the depths name published architectures, whose widths are fixed.
    match cfg.depth:
        case 20 | 32 | 56:
            # He et al. 2016, section 4.2. Their option-A shortcuts are parameter-free, so the
            # parameter counts match the paper's 0.27M / 0.46M / 0.85M.
            widths, blocks, projection = (16, 32, 64), ((cfg.depth - 2) // 6,) * 3, False
        case 18:
            # ResNet-18 with the usual CIFAR stem (3x3 conv, no max-pool) and torchvision's 1x1
            # projection shortcuts, so its 11.17M parameters compare with the common baselines.
            widths, blocks, projection = (64, 128, 256, 512), (2, 2, 2, 2), True
        case _:
            raise ConfigError(f"model.depth must be one of {'|'.join(map(str, RESNET_DEPTHS))} "
                              f"for model=resnet, got {cfg.depth!r}")
    layers: list[nn.Module] = [_conv3x3(in_channels, widths[0], 1), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    channels = widths[0]
    for stage, (width, n) in enumerate(zip(widths, blocks)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(_BasicBlock(channels, width, stride, projection))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_outputs)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    # No bias: the BatchNorm that follows every conv has its own.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, projection: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            _conv3x3(out_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
        )
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif projection:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = _PadShortcut(out_channels - in_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class _PadShortcut(nn.Module):
    """Option A of He et al.: subsample, then zero-pad the new channels."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def loss_fn(task: str):
    match task:
        case "classification":
            return nn.functional.cross_entropy
        case "language_model":
            return next_token_cross_entropy
        case _:
            return nn.functional.mse_loss


def next_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every token of logits (N, T, V) and targets (N, T), in nats per token;
    ``reduction="none"``: one loss per token, (N * T,)."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


def describe(model: nn.Module) -> str:
    """What the start line says of the model: its size, and for a GPT the FLOPs per token of train/mfu."""
    count = sum(p.numel() for p in model.parameters())
    if not isinstance(model, GPT):
        return f"model: {count:,} parameters"
    return (f"model: {model.num_params():,} parameters without the position embedding ({count:,} with it); "
            f"{model.flops_per_token():,} FLOPs per token (6N + 12 L T d, for train/mfu)")
