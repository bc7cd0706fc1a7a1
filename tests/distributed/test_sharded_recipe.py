"""recipes/sharded_finetune.py runs as its header says: torchrun, two gloo processes, a
checkpoint, and a resumed run from it."""

import os
import subprocess
import sys

import pytest

from processes import free_port
from conftest import REPO

TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--vocab", "32", "--length", "8", "--batch", "2"]


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(REPO / "recipes" / "sharded_finetune.py"), *TINY, *args]
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_the_recipe_trains_saves_and_resumes(tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    assert "over 3 steps on 2 processes" in torchrun("--steps", "3", "--optimizer", "adamw", "--checkpoint", checkpoint)
    assert os.path.exists(os.path.join(checkpoint, ".metadata"))
    assert "over 2 steps on 2 processes" in torchrun("--steps", "2", "--optimizer", "adamw", "--checkpoint",
                                                      checkpoint, "--resume")
