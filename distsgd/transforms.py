"""Transforms of a batch on its device: per-channel normalisation and CIFAR's crop and flip.

Images stay uint8 in memory and on their way to the device; a batch is augmented and normalized
there, which keeps host memory and host-to-device traffic at a quarter of float32's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Per-channel (mean, std) of the training images in [0, 1]. CIFAR-10's std is the per-pixel one;
# the (0.2023, 0.1994, 0.2010) often copied instead is not the dataset's per-pixel std.
MNIST_MEAN_STD: tuple[tuple[float, ...], tuple[float, ...]] = ((0.1307,), (0.3081,))
CIFAR10_MEAN_STD: tuple[tuple[float, ...], tuple[float, ...]] = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Float32 [B, C, H, W] standardized per channel; uint8 images are scaled from 0..255 to [0, 1] first.

    Pass ``mean`` and ``std`` as float32 tensors on x's device (see ``mean_std_on``) in a training
    loop: from Python numbers every call would copy them to the device, a sync on CUDA."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t


def mean_std_on(device: torch.device, mean_std: tuple[Sequence[float], Sequence[float]]) -> tuple[Tensor, Tensor]:
    """(mean, std) as float32 tensors on ``device``, made once for ``normalize``."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in mean_std)


def crop_flip_params(num_samples: int, padding: int, seed: int, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Crop offsets dy, dx in [0, 2*padding] (int64) and flip flags (bool) of every training sample for one epoch.

    They are drawn for the whole training set from (seed, epoch) alone, identically on every rank, and
    a batch takes the entries of its own sample indices. A sample's augmentation therefore does not
    depend on the number of processes, on which rank or batch it lands in, or on whether the epoch was
    resumed from a checkpoint midway: runs at any world size see the same augmented global batches.
    """
    # SeedSequence mixes (seed, epoch) so that neighbouring pairs give unrelated streams, and unlike
    # the sampler's seed + epoch, so that augmentation is not correlated with the shuffle.
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state))
    dy, dx = torch.randint(0, 2 * padding + 1, (2, num_samples), generator=gen)
    flip = torch.rand(num_samples, generator=gen) < 0.5
    return dy, dx, flip


def random_crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int) -> Tensor:
    """x [B, C, H, W] zero-padded by `padding`, cropped back to HxW at (dy[i], dx[i]), flipped horizontally where flip[i].

    One gather for the whole batch on x's device, for any dtype. Apply it to uint8 images before
    normalize() so that the border is black, as in the usual recipe, rather than the mean colour.
    """
    b, c, h, w = x.shape
    dy, dx, flip = dy.to(x.device), dx.to(x.device), flip.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]
