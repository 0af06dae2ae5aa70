"""Models: built from the model config and the shape of the data."""

from __future__ import annotations

import math

import torch
from torch import nn

from distsgd.config import ConfigError, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, task: str) -> nn.Module:
    in_features = math.prod(input_shape)
    match cfg.name:
        case "linear" | "logistic":
            expected = "regression" if cfg.name == "linear" else "classification"
            if task != expected:
                other = "logistic" if cfg.name == "linear" else "linear"
                raise ConfigError(f"model={cfg.name} is for {expected} but the data is {task}; use model={other}")
            return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_outputs))
        case "mlp":
            layers: list[nn.Module] = [nn.Flatten()]
            width = in_features
            for _ in range(cfg.depth):
                layers += [nn.Linear(width, cfg.width), ACTIVATIONS[cfg.activation]()]
                width = cfg.width
            layers.append(nn.Linear(width, num_outputs))
            return nn.Sequential(*layers)


def loss_fn(task: str):
    return nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss
