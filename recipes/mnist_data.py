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
    """Raise FileNotFoundError naming the missing files and the fix, unless they exist or
    ``download`` may fetch them. The fix offers the download only where the caller does it."""
    raw = Path(root) / "MNIST" / "raw"
    missing = [f for f in _FILES if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    if missing and not download:
        raise FileNotFoundError(
            f"{root} does not hold MNIST: {raw} lacks {', '.join(missing)}. Point --data-dir or "
            "FWDGRAD_DATA_DIR at a folder with MNIST/raw/*-ubyte (torchvision's layout)."
        )


def _download(root: Path) -> None:
    """torchvision's download into ``root``; on failure, a one-line error with the fix, and the
    folders it made removed again (so no empty ``data/MNIST`` is left behind)."""
    from torchvision.datasets import MNIST

    made = [d for d in (root, root / "MNIST", root / "MNIST" / "raw") if not d.exists()]
    try:
        MNIST(str(root), train=True, download=True)
    except Exception as error:  # offline, a mirror down, a proxy: torchvision tries each mirror
        for folder in reversed(made):
            for leftover in folder.glob("*") if folder.name == "raw" else ():
                leftover.unlink()  # partial downloads
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise ConnectionError(
            f"could not download MNIST into {root} ({type(error).__name__}; offline?): pass "
            "--data-dir or set FWDGRAD_DATA_DIR to a folder holding MNIST/raw/*-ubyte "
            "(torchvision's layout), e.g. one copied from a machine that is online."
        ) from None


def mnist(root=None, *, train: bool, limit: Optional[int] = None, download: bool = False) -> TensorDataset:
    """MNIST normalised with the usual mean and std: images (N, 1, 28, 28) float32, labels (N,).
    ``download``: fetch it into ``root`` first if it is not there (torchvision's mirrors)."""
    from torchvision.datasets import MNIST

    root = data_dir(root)
    try:
        check_mnist(root)
    except FileNotFoundError:
        if not download:
            raise
        _download(root)
    dataset = MNIST(str(root), train=train)
    images, labels = dataset.data, dataset.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = (images.unsqueeze(1).float() / 255 - MNIST_MEAN) / MNIST_STD
    return TensorDataset(images, labels)
