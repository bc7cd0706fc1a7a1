"""benchmarks/memory.py through its real command, on its --quick case."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # each test trains or starts processes


def test_quick_run_measures_memory_time_and_loss(tmp_path):
    out = tmp_path / "memory.json"
    command = [sys.executable, "benchmarks/memory.py", "--quick", "--methods", "forward-sgd", "--steps", "1",
               "--threads", "1", "--json", str(out), "--markdown", str(tmp_path / "memory.md")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert (result["case"], result["method"], result["steps"]) == ("quick", "forward-sgd", 1)
    assert result["resting_bytes"] > result["parameter_bytes"] > 0
    assert result["peak_above_resting_bytes"] >= 0 and result["median_step_seconds"] > 0
    assert len(result["losses"]) == 2 and result["held_out_loss"] > 0
    assert report["machine"]["torch_threads"] == 1 and report["commands"][0][1] == "benchmarks/memory.py"
    assert "| quick | forward-sgd |" in (tmp_path / "memory.md").read_text()


def test_unknown_method_names_the_known_ones():
    done = subprocess.run([sys.executable, "benchmarks/memory.py", "--methods", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "known: backprop" in done.stderr


def test_forward_passes_benchmark_compares_both_methods(tmp_path):
    out = tmp_path / "passes.json"
    command = [sys.executable, "benchmarks/forward_passes.py", "--passes", "4", "--seeds", "1", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {s["method"] for s in report["summary"]} == {"forward-gradient", "spsa"}
    for r in report["runs"]:
        assert r["curve"][-1][0] == 4  # both methods end at the same number of forward passes
        assert r["curve"][0][2] == report["runs"][0]["curve"][0][2]  # from the same initialisation


def test_merge_keeps_the_later_file_s_result_and_checks_the_targets(tmp_path):
    def result(method, mb, seconds):
        return {"case": "gpt2-tanh", "method": method, "peak_above_resting_bytes": mb * 2**20,
                "median_step_seconds": seconds, "held_out_loss": 9.0, "parameters": 1}

    earlier = [result("backprop-checkpointing", 400, 2.0), result("forward-sgd", 200, 3.0), result("spsa", 50, 2.0)]
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    files[0].write_text(json.dumps({"commands": [["first"]], "results": earlier}))
    files[1].write_text(json.dumps({"commands": [["second"]], "results": [result("forward-sgd", 100, 2.5)]}))
    out = tmp_path / "merged.json"
    done = subprocess.run([sys.executable, "benchmarks/memory.py", "--merge", *map(str, files), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["backprop-checkpointing", "forward-sgd", "spsa"]
    assert report["commands"] == [["first"], ["second"]]
    targets = {t["target"]: t for t in report["targets"] if t["case"] == "gpt2-tanh"}
    assert targets["no-.grad FG peak ≤ 0.3 × checkpointing"]["measured"] == 0.25
    assert targets["no-.grad FG peak ≤ 0.3 × checkpointing"]["met"]
    assert targets["no-.grad FG peak ≤ 3 × SPSA"]["measured"] == 2.0
    assert targets["no-.grad FG step time ≤ 1.5 × SPSA's"]["measured"] == 1.25
