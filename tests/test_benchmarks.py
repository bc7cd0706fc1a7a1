"""The benchmark scripts, through their real commands on tiny cases."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def run(*args):
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_step_benchmark_times_and_measures_memory(tmp_path):
    out = tmp_path / "step.json"
    stdout = run("benchmarks/step.py", "--cases", "paper-mlp-64", "--samplers", "rank1-gaussian",
                 "--directions", "1,2", "--methods", "step,forward-sgd", "--repeats", "3", "--warmup", "1",
                 "--memory-steps", "1", "--threads", "1", "--json", str(out), "--plot", str(tmp_path / "step.png"))
    report = json.loads(out.read_text())
    assert report["machine"]["keep_freed_memory"] is False
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"backprop", "step/rank1-gaussian/K=1", "step/rank1-gaussian/K=2",
                         "forward-sgd/rank1-gaussian/K=1", "forward-sgd/rank1-gaussian/K=2"}
    assert "| paper-mlp-64 | step/rank1-gaussian/K=1 |" in stdout
    backprop = rows["backprop"]
    for row in rows.values():
        assert row["median_ms"] > 0 and row["page_faults"] >= 0
        # a median of per-round ratios: near the ratio of medians, not equal to it
        assert row["vs_backprop"] == pytest.approx(row["median_ms"] / backprop["median_ms"], rel=0.5)
    assert backprop["vs_backprop"] == 1.0
    two = rows["step/rank1-gaussian/K=2"]
    assert two["vs_one_direction"] == pytest.approx(
        two["median_ms"] / rows["step/rank1-gaussian/K=1"]["median_ms"], rel=0.5)
    assert two["k_target"] == pytest.approx(1.7)
    # Backprop writes a gradient as large as the parameters (1.86 M floats): the peak above
    # resting must see it; so must the forward-gradient step, which writes the same .grad.
    gradient_mb = (784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10) * 4 / 2**20
    for name in ("backprop", "step/rank1-gaussian/K=1"):
        assert rows[name]["peak_mb"] > 0.9 * gradient_mb
    # ForwardSGD writes none: one parameter's update at a time (the largest is 4 MiB)
    assert rows["forward-sgd/rank1-gaussian/K=1"]["peak_mb"] < 0.75 * gradient_mb
    assert rows["step/rank1-gaussian/K=1"]["peak_vs_backprop"] == pytest.approx(
        rows["step/rank1-gaussian/K=1"]["peak_mb"] / backprop["peak_mb"])
    assert rows["step/rank1-gaussian/K=2"]["peak_mb"] is None  # memory: K=1 unless asked


@pytest.mark.slow
def test_step_benchmark_with_freed_memory_kept_still_sees_a_steps_memory(tmp_path):
    """glibc keeps the first step's freed blocks; they are given back before the resting
    footprint is read, so the gradient a step writes still counts as the step's."""
    out = tmp_path / "step.json"
    run("benchmarks/step.py", "--cases", "paper-mlp-64", "--samplers", "gaussian", "--directions", "1",
        "--methods", "step", "--repeats", "3", "--warmup", "1", "--memory-steps", "2", "--threads", "1",
        "--keep-freed-memory", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["machine"]["keep_freed_memory"] is True
    gradient_mb = (784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10) * 4 / 2**20
    for row in report["rows"]:
        assert row["page_faults"] >= 0 and 0.9 * gradient_mb < row["peak_mb"] < 4 * gradient_mb


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_unknown_case_names_the_known_ones():
    step = load_benchmark("step")
    with pytest.raises(SystemExit, match="unknown case nope; known: paper-mlp-64"):
        step.main(["--cases", "nope"])


@pytest.mark.slow
def test_time_to_loss_reaches_an_easy_target(tmp_path, mnist_root):
    out, picture = tmp_path / "ttl.json", tmp_path / "ttl.png"
    stdout = run("benchmarks/time_to_loss.py", "--data-dir", str(mnist_root), "--methods",
                 "backprop,rank1-gaussian", "--limit", "512", "--target-loss", "2.2", "--window", "5",
                 "--budget-s", "5", "--threads", "1", "--seeds", "0,1", "--decay", "1e-4",
                 "--json", str(out), "--plot", str(picture))
    report = json.loads(out.read_text())
    assert report["decay"] == 1e-4
    results = {(r["method"], r["seed"]): r for r in report["results"]}
    assert set(results) == {(m, s) for m in ("backprop", "rank1-gaussian") for s in (0, 1)}
    for seed in (0, 1):
        backprop = results["backprop", seed]
        assert backprop["reached"] and backprop["final_loss"] <= 2.2
        assert backprop["seconds_vs_backprop"] == pytest.approx(1.0)
        assert results["rank1-gaussian", seed]["steps"] > 0
        # the curve ends where the run ended, its losses are the windowed means
        seconds, steps, loss = backprop["curve"][-1]
        assert steps == backprop["steps"] and loss == pytest.approx(backprop["final_loss"])
    assert "| backprop | 0.1 | 2 |" in stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_to_loss_learning_rates_for_one_or_every_method():
    time_to_loss = load_benchmark("time_to_loss")
    methods = ["backprop", "gaussian"]
    assert time_to_loss.learning_rates(methods, []) == {"backprop": 0.1, "gaussian": 2e-4}
    assert time_to_loss.learning_rates(methods, ["2e-4"]) == {"backprop": 2e-4, "gaussian": 2e-4}
    assert time_to_loss.learning_rates(methods, ["2e-4", "backprop=0.3"]) == {"backprop": 0.3, "gaussian": 2e-4}
    with pytest.raises(SystemExit, match="rademacher is not among the methods run"):
        time_to_loss.learning_rates(methods, ["rademacher=1e-3"])
    with pytest.raises(SystemExit, match="give a number"):
        time_to_loss.learning_rates(methods, ["fast"])


def test_ratios_are_medians_of_per_round_ratios():
    """A machine that slows down between rounds moves both methods of a round alike."""
    step = load_benchmark("step")
    backprop = [1.0, 2.0, 4.0, 8.0, 16.0]
    method = [1.5, 3.0, 6.0, 12.0, 100.0]  # 1.5× in every round but a disturbed last one
    assert step.median_ratio(method, backprop) == pytest.approx(1.5)
    rows = step.build_rows("case", {"backprop": backprop, "step/gaussian/K=1": method}, {})
    assert rows[1].vs_backprop == pytest.approx(1.5) and rows[1].median_ms == pytest.approx(6000.0)


def test_page_faults_are_counted_per_step():
    """A step that writes a fresh 64 MiB buffer (above glibc's mmap threshold) faults in
    each of its 16384 pages."""
    step = load_benchmark("step")
    model = torch.nn.Linear(2, 1)
    work = step.Workload(model, lambda: model(torch.ones(1, 2)).sum() + torch.ones(2**24).sum() * 0)
    times, faults = step.step_times(work, [step.Method("backprop")], torch.device("cpu"), repeats=3, warmup=1)
    assert len(times["backprop"]) == 3
    assert 2**14 <= faults["backprop"] < 2 * 2**14


@pytest.mark.slow
def test_tangent_draw_benchmark_times_every_draw(tmp_path):
    out = tmp_path / "draw.json"
    stdout = run("benchmarks/tangent_draw.py", "--count", "1000", "--repeats", "2", "--warmup", "1",
                 "--json", str(out))
    medians = json.loads(out.read_text())["median_seconds"]
    assert set(medians) == {"torch normal_", "counter_rng.normal", "counter_rng.normal into a kept buffer",
                            "counter_rng.signs"}
    assert all(seconds > 0 for seconds in medians.values())
    assert "| counter_rng.normal |" in stdout
