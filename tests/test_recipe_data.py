"""Where the recipes' MNIST comes from: a folder, or torchvision's download; without either,
one line that names the fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mnist_data

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.slow
def test_hf_trainer_without_mnist_names_the_folder_fix_and_never_offers_a_download(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FWDGRAD_DATA_DIR"}
    done = subprocess.run([sys.executable, str(RECIPES / "hf_trainer.py"), "--data_dir", str(tmp_path),
                           "--output_dir", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "does not hold MNIST" in line and "FWDGRAD_DATA_DIR" in line and "omit" not in line


def test_a_folder_without_mnist_fails_with_the_fix_and_no_download_offer(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir or FWDGRAD_DATA_DIR") as error:
        mnist_data.mnist(tmp_path, train=True)
    assert "download" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_removes_the_folders_it_made(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train=True, download=False):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ConnectionError, match="could not download MNIST.*--data-dir"):
        mnist_data.mnist(kept / "data", train=True, download=True)
    assert list(kept.iterdir()) == []  # no data/MNIST/raw, no partial file


def test_the_folder_comes_from_the_argument_then_the_environment_then_data(monkeypatch):
    monkeypatch.setenv("FWDGRAD_DATA_DIR", "/somewhere")
    assert mnist_data.data_dir("here") == Path("here")
    assert mnist_data.data_dir() == Path("/somewhere")
    monkeypatch.delenv("FWDGRAD_DATA_DIR")
    assert mnist_data.data_dir() == Path("data")
