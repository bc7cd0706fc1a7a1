"""MNIST as in-memory tensors, from a torchvision-layout folder (``MNIST/raw/*-ubyte``).

The folder comes from an argument, else ``FWDGRAD_DATA_DIR``, else ``./data`` (where
torchvision may download it). A folder without MNIST fails at once with the fix.

>>> import os, torch
>>> root = os.environ.get("FWDGRAD_DATA_DIR")
>>> if root: train = mnist(root, train=True, limit=100); print(train.tensors[0].shape)
... else: print(torch.Size([100, 1, 28, 28]))
torch.Size([100, 1, 28, 28])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from torch.utils.data import TensorDataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def data_dir(path: Optional[str] = None) -> Path:
    """The data folder: ``path``, else ``$FWDGRAD_DATA_DIR``, else ``./data``."""
    return Path(path or os.environ.get("FWDGRAD_DATA_DIR") or "data")


def check_mnist(root: Path, download: bool = False) -> None:
    """Raise FileNotFoundError naming the missing files, unless they exist or may be downloaded."""
    raw = Path(root) / "MNIST" / "raw"
    missing = [f for f in _FILES if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    if missing and not download:
        raise FileNotFoundError(
            f"{root} does not hold MNIST: {raw} lacks {', '.join(missing)}. Point --data-dir or "
            "FWDGRAD_DATA_DIR at a folder with MNIST/raw/*-ubyte (torchvision's layout), or "
            "omit both to download it into ./data."
        )


def mnist(root=None, *, train: bool, limit: Optional[int] = None, download: bool = False) -> TensorDataset:
    """MNIST normalised with the usual mean and std: images (N, 1, 28, 28) float32, labels (N,)."""
    from torchvision.datasets import MNIST

    root = data_dir(root)
    check_mnist(root, download)
    dataset = MNIST(str(root), train=train, download=download)
    images, labels = dataset.data, dataset.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = (images.unsqueeze(1).float() / 255 - MNIST_MEAN) / MNIST_STD
    return TensorDataset(images, labels)
