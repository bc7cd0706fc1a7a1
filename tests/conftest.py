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


@pytest.fixture
def one_thread():
    """One torch thread: tiny models run faster on one, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_backward(monkeypatch):
    """Fails the test if autograd's backward engine runs or computes any parameter gradient."""
    def refuse(*args, **kwargs):
        raise AssertionError("a backward pass ran")

    monkeypatch.setattr(torch.autograd.graph, "_engine_run_backward", refuse)
    monkeypatch.setattr(torch.autograd, "_engine_run_backward", refuse, raising=False)

    def watch(module):
        for p in module.parameters():
            p.register_hook(refuse)
            p.register_post_accumulate_grad_hook(refuse)
    return watch
