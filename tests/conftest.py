import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The MNIST folder (torchvision layout) from FWDGRAD_DATA_DIR; .ci/run sets it."""
    root = os.environ.get("FWDGRAD_DATA_DIR")
    if not root:
        pytest.skip("set FWDGRAD_DATA_DIR to a folder holding MNIST/raw (e.g. ../shared/data)")
    return Path(root)
