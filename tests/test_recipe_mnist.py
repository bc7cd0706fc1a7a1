"""recipes/mnist.py through its real command (`accelerate launch`), on a small MNIST subset:
results and plots, two processes against one, stop-and-resume, the sweep, bad input."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fwdgrad_plugins
from paper_models import paper_mlp
from processes import free_port

pytestmark = pytest.mark.slow  # each test trains or starts processes

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "mnist.py")
# 128 images at batch 32: 4 steps per epoch, so 6 steps cross an epoch and step 3 is mid-epoch.
SMALL = ["--train-limit", "128", "--test-limit", "100", "--batch-size", "32", "--max-steps", "6",
         "--epochs", "2", "--lr", "1e-3", "--eval-every", "2"]
METHODS = ("fwdgrad", "backprop")


def launch(mnist_root, output_dir, *args, processes=1):
    """`accelerate launch` with every option given, so no accelerate config file is needed."""
    placement = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1", "--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *placement, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               "--main_process_port", str(free_port()), RECIPE, "--data-dir", str(mnist_root),
               "--output-dir", str(output_dir), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for alarming in ("gpuGetDeviceCount", "USDT", "CPUAllocator", "Traceback"):
        assert alarming not in done.stdout + done.stderr, alarming
    return done.stdout


def final_weights(output_dir, method, steps=6):
    return load_file(str(output_dir / method / "checkpoints" / f"checkpoint-{steps}" / "model.safetensors"))


def results(output_dir):
    return json.loads((output_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def one_process(mnist_root, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_process")
    stdout = launch(mnist_root, output_dir, *SMALL)
    return output_dir, stdout


def test_recipe_trains_both_methods_and_writes_finite_results_and_plots(one_process):
    output_dir, stdout = one_process
    runs = {r["method"]: r for r in results(output_dir)["runs"]}
    assert set(runs) == set(METHODS)
    for run in runs.values():
        assert run["steps"] == 6 and not run["diverged"] and run["bytes_per_step"] == 0
        for key in ("final_train_loss", "test_accuracy", "median_step_seconds", "steps_per_second"):
            assert isinstance(run[key], (int, float)) and math.isfinite(run[key]) and run[key] >= 0, key
        # the CPU allocator keeps no peak count: memory is benchmarks/step.py's job there
        assert run["peak_step_memory_bytes"] is None
    histories = results(output_dir)["histories"]
    assert [s for s, _, _ in histories["fwdgrad"]["losses"]] == list(range(1, 7))
    assert [s for s, _, _ in histories["backprop"]["evaluations"]] == [0, 2, 4, 6]  # step 0 too
    first = {m: histories[m]["evaluations"][0][1:] for m in METHODS}
    assert first["fwdgrad"] == first["backprop"]  # the same initial weights
    for plot in ("loss_vs_step.png", "loss_vs_time.png", "accuracy_vs_step.png"):
        assert (output_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    for method in METHODS:  # the trackers' files
        assert (output_dir / method / "metrics.jsonl").stat().st_size > 0
        assert (output_dir / method / "metrics.csv").stat().st_size > 0
    assert "fwdgrad / backprop" in stdout and "test accuracy" in stdout
    assert "2 run(s) (fwdgrad at lr 0.001, backprop at lr 0.001), 6 steps each" in stdout
    assert "peak memory" not in stdout  # measured on CUDA only


OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": ""}  # a proxy that refuses: no network
ONE_PROCESS = ["-q", "--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


@pytest.mark.parametrize("launcher", [[], ["-m", "accelerate.commands.launch", *ONE_PROCESS]],
                         ids=["python", "accelerate-launch-q"])
def test_offline_without_a_data_folder_prints_one_line_with_the_fix_and_leaves_no_empty_folder(tmp_path, launcher):
    """No --data-dir, no FWDGRAD_DATA_DIR and no network: one line on stderr, under python or
    `accelerate launch -q` alike, and no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "FWDGRAD_DATA_DIR"}
    done = subprocess.run([sys.executable, *launcher, RECIPE, "--max-steps", "1"], cwd=tmp_path,
                          env={**env, **OFFLINE}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: could not download MNIST into data"), lines
    assert "--data-dir" in lines[0] and "FWDGRAD_DATA_DIR" in lines[0]
    assert not (tmp_path / "data").exists()


def test_a_data_folder_without_mnist_is_one_line_too(tmp_path):
    done = subprocess.run([sys.executable, RECIPE, "--data-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path} does not hold MNIST") and "FWDGRAD_DATA_DIR" in done.stderr


def test_two_processes_stay_identical_and_match_one_process_on_the_same_global_batch(
        mnist_root, tmp_path, one_process):
    launch(mnist_root, tmp_path, *SMALL, processes=2)
    runs = {r["method"]: r for r in results(tmp_path)["runs"]}
    torch.manual_seed(0)  # the recipe's initial weights: paper_mlp() after manual_seed(--seed)
    initial = paper_mlp().state_dict()
    parameter_bytes = sum(t.numel() * 4 for t in initial.values())
    for method in METHODS:
        digests = runs[method]["parameter_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], f"{method}: processes differ"
        two, one = final_weights(tmp_path, method), final_weights(one_process[0], method)
        moved = sum((one[k] - initial[k]).norm() ** 2 for k in one) ** 0.5
        apart = sum((two[k] - one[k]).norm() ** 2 for k in one) ** 0.5
        assert moved > 0 and apart <= 1e-4 * moved, (method, apart, moved)
    assert runs["fwdgrad"]["bytes_per_step"] == 4  # one float32 directional derivative
    assert runs["backprop"]["bytes_per_step"] == parameter_bytes


def test_a_stopped_and_resumed_run_ends_with_the_uninterrupted_parameters(mnist_root, tmp_path, one_process):
    stopped = [*SMALL, "--checkpoint-every", "3"]
    stopped[stopped.index("--max-steps") + 1] = "3"
    launch(mnist_root, tmp_path, *stopped)
    stdout = launch(mnist_root, tmp_path, *SMALL, "--resume-from", str(tmp_path))
    assert "resuming from" in stdout
    for method in METHODS:
        resumed, whole = final_weights(tmp_path, method), final_weights(one_process[0], method)
        assert all(torch.equal(resumed[k], whole[k]) for k in whole), method
    history = results(tmp_path)["histories"]["fwdgrad"]["losses"]
    assert [s for s, _, _ in history] == list(range(1, 7))  # the history survives the checkpoint


def test_lr_sweep_reports_diverged_runs_as_diverged_and_picks_the_best_finite_one(mnist_root, tmp_path):
    sweep = [*SMALL, "--lr-sweep", "1e-3,1e30"]
    stdout = launch(mnist_root, tmp_path, *sweep)
    found = results(tmp_path)
    for run in found["runs"]:
        if run["lr"] == 1e30:
            assert run["diverged"] and run["test_accuracy"] == "diverged" and run["final_train_loss"] == "diverged"
        else:
            assert not run["diverged"] and math.isfinite(run["test_accuracy"])
    assert found["best_lr"] == {"fwdgrad": 1e-3, "backprop": 1e-3}
    assert "diverged at step" in stdout and (tmp_path / "lr_sweep.png").exists()


def load_recipe():
    spec = importlib.util.spec_from_file_location("mnist_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "{empty}"], "does not hold MNIST"),
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--tangents", "uniform"], "invalid choice: 'uniform'"),
    (["--lr-sweep", "1e-4,fast"], "'fast' is not a float"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--resume-from", "{empty}/nothing"], "no such folder"),
    (["--lr-sweep", "adam:1e-3"], "'adam' is not a method"),
    (["--method", "backprop", "--lr-sweep", "fwdgrad:1e-3"], "does not train fwdgrad"),
])
def test_bad_options_fail_before_training_with_a_clear_message(mnist_root, tmp_path, capsys, args, message):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit:
        load_recipe().main(["--data-dir", str(mnist_root), "--output-dir", str(tmp_path / "out"), *args])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lr_sweep_takes_one_grid_for_all_methods_or_one_per_method(mnist_root):
    def grid(*args):
        return load_recipe().parse_args(["--data-dir", str(mnist_root), *args]).grid

    assert grid() == {"fwdgrad": [2e-4], "backprop": [2e-4]}
    assert grid("--lr-sweep", "1e-3,1e-2") == {"fwdgrad": [1e-3, 1e-2], "backprop": [1e-3, 1e-2]}
    assert grid("--lr-sweep", "fwdgrad:1e-4,2e-4", "--lr-sweep", "backprop:0.1") == {
        "fwdgrad": [1e-4, 2e-4], "backprop": [0.1]}
    assert grid("--method", "fwdgrad", "--lr", "1e-4") == {"fwdgrad": [1e-4]}


@pytest.mark.parametrize("estimator", fwdgrad_plugins.registered("estimators"))
def test_every_registered_estimator_trains_through_the_recipe(mnist_root, tmp_path, estimator):
    load_recipe().main(["--data-dir", str(mnist_root), "--output-dir", str(tmp_path), "--method", "fwdgrad",
                        "--estimator", estimator, "--max-steps", "3", "--batch-size", "16",
                        "--train-limit", "64", "--test-limit", "50"])
    (run,) = results(tmp_path)["runs"]
    assert run["steps"] == 3 and not run["diverged"] and math.isfinite(run["final_train_loss"])


def test_estimator_and_tangent_choices_come_from_the_registry(capsys):
    with pytest.raises(SystemExit):
        load_recipe().parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "``" not in help_text  # plain text, not reST
    for name in fwdgrad_plugins.registered("estimators") + fwdgrad_plugins.registered("tangent_samplers"):
        assert name in help_text
