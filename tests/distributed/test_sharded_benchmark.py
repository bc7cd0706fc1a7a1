"""benchmarks/sharded.py through its real command, on its --quick case."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_sharded_benchmark_counts_traffic_and_writes_its_report(tmp_path):
    out = tmp_path / "sharded.json"
    command = [sys.executable, "benchmarks/sharded.py", "--quick", "--methods", "fsdp-backprop-sgd,fsdp-forward-sgd",
               "--json", str(out), "--markdown", str(tmp_path / "sharded.md"), "--plot", str(tmp_path / "sharded.png")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "TORCH_COMPILE_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    backprop, forward = rows["fsdp-backprop-sgd"], rows["fsdp-forward-sgd"]
    # backprop: all-gathers in forward and backward, and a reduce-scatter of the gradients
    assert backprop["calls_per_step"]["reduce_scatter_single"] > 0 and backprop["bytes_per_step"] > 0
    # forward gradient: the forward pass's all-gathers and one all-reduce of K = 1 float
    assert set(forward["calls_per_step"]) == {"all_gather_single", "all_reduce"}
    assert forward["calls_per_step"]["all_reduce"] == 1
    assert forward["bytes_per_step"] < 0.5 * backprop["bytes_per_step"]
    assert all(r["peak_bytes"] > 0 and r["median_step_seconds"] > 0 for r in rows.values())
    assert "| 2 | fsdp-forward-sgd |" in (tmp_path / "sharded.md").read_text()
    assert (tmp_path / "sharded.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
