"""The benchmark scripts, through their real commands on tiny cases."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO


def run(*args):
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_step_benchmark_times_and_measures_memory(tmp_path):
    out = tmp_path / "step.json"
    stdout = run("benchmarks/step.py", "--cases", "paper-mlp-64", "--samplers", "rank1-gaussian",
                 "--directions", "1,2", "--methods", "step", "--repeats", "3", "--warmup", "1",
                 "--memory-steps", "1", "--threads", "1", "--json", str(out))
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"backprop", "step/rank1-gaussian/K=1", "step/rank1-gaussian/K=2"}
    assert "| paper-mlp-64 | step/rank1-gaussian/K=1 |" in stdout
    backprop = rows["backprop"]
    for row in rows.values():
        assert row["median_ms"] > 0
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
    assert rows["step/rank1-gaussian/K=1"]["peak_vs_backprop"] == pytest.approx(
        rows["step/rank1-gaussian/K=1"]["peak_mb"] / backprop["peak_mb"])
    assert rows["step/rank1-gaussian/K=2"]["peak_mb"] is None  # memory: K=1 unless asked


def load_step_benchmark():
    spec = importlib.util.spec_from_file_location("step_benchmark", REPO / "benchmarks" / "step.py")
    step = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = step  # dataclasses look their module up there
    try:
        spec.loader.exec_module(step)
    finally:
        del sys.modules[spec.name]
    return step


def test_unknown_case_names_the_known_ones():
    step = load_step_benchmark()
    with pytest.raises(SystemExit, match="unknown case nope; known: paper-mlp-64"):
        step.main(["--cases", "nope"])


def test_time_to_loss_reaches_an_easy_target(tmp_path, mnist_root):
    out = tmp_path / "ttl.json"
    run("benchmarks/time_to_loss.py", "--data-dir", str(mnist_root), "--methods", "backprop,rank1-gaussian",
        "--limit", "512", "--target-loss", "2.2", "--window", "5", "--budget-s", "5", "--threads", "1",
        "--json", str(out))
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert results["backprop"]["reached"] and results["backprop"]["final_loss"] <= 2.2
    assert results["backprop"]["seconds_vs_backprop"] == pytest.approx(1.0)
    assert results["rank1-gaussian"]["steps"] > 0


def test_ratios_are_medians_of_per_round_ratios():
    """A machine that slows down between rounds moves both methods of a round alike."""
    step = load_step_benchmark()
    backprop = [1.0, 2.0, 4.0, 8.0, 16.0]
    method = [1.5, 3.0, 6.0, 12.0, 100.0]  # 1.5× in every round but a disturbed last one
    assert step.median_ratio(method, backprop) == pytest.approx(1.5)
    rows = step.build_rows("case", {"backprop": backprop, "step/gaussian/K=1": method}, {})
    assert rows[1].vs_backprop == pytest.approx(1.5) and rows[1].median_ms == pytest.approx(6000.0)


def test_tangent_draw_benchmark_times_every_draw(tmp_path):
    out = tmp_path / "draw.json"
    stdout = run("benchmarks/tangent_draw.py", "--count", "1000", "--repeats", "2", "--warmup", "1",
                 "--json", str(out))
    medians = json.loads(out.read_text())["median_seconds"]
    assert set(medians) == {"torch normal_", "counter_rng.normal", "counter_rng.signs"}
    assert all(seconds > 0 for seconds in medians.values())
    assert "| counter_rng.normal |" in stdout
