"""The tiny classifier and data the Accelerate-loop tests train."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

DECAY = 0.9  # lr multiplier per step: makes a scheduler stepping twice per update visible


def dataset():
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(40, 6, generator=generator), torch.randint(0, 3, (40,), generator=generator))


def fresh_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
