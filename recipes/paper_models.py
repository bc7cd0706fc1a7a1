"""The models of the paper's MNIST experiments, and the deep MLP of the benchmarks.

>>> import torch
>>> paper_mlp()(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> paper_cnn()(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from torch import nn


def paper_mlp() -> nn.Sequential:
    """784-1024-1024-10 with ReLU (Baydin et al. 2022, MNIST)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )


def paper_cnn() -> nn.Sequential:
    """Four 3×3 convolutions of 64 channels, 2×2 max-pool after the 2nd and 4th, FC 1024, FC 10."""

    def conv(in_channels):
        return [nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *conv(1), *conv(64), nn.MaxPool2d(2),  # (B, 64, 14, 14)
        *conv(64), *conv(64), nn.MaxPool2d(2),  # (B, 64, 7, 7)
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )


def deep_mlp(width: int = 512, depth: int = 8, in_features: int = 784, classes: int = 10) -> nn.Sequential:
    """``depth`` linear layers of ``width`` with ReLU, for the memory benchmarks."""
    layers = [nn.Flatten(), nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)
