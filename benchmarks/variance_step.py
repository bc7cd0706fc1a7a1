"""Time per training step of the FG-W variants (fwdgrad_plugins/estimators/blockwise.py,
guided.py) and backprop, side by side in one process: rounds of interleaved steps, the median per method.

    python benchmarks/variance_step.py --rounds 5 --steps 10 --json docs/variance/step_times.json

The paper MLP (784-1024-1024-10) on random MNIST-shaped batches of 64, Adam, one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fwdgrad_plugins import ForwardGradientEstimator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fgw_variants import VARIANTS  # noqa: E402  (the recipe's variants: one table of them)
from paper_models import paper_mlp  # noqa: E402

TIMED = ("weight", "weight-k2", "orthogonal-k2", "blockwise", "blockwise-rank1", "guided-k2",
         "per-example", "per-example-blockwise", "per-example-span", "per-example-span-blockwise", "activity")
METHODS = {"backprop": None, **{name: VARIANTS[name] for name in TIMED}}  # None: backprop


def make_step(spec, seed=0):
    torch.manual_seed(seed)
    model = paper_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    fg = None if spec is None else ForwardGradientEstimator(estimator=spec[0], tangents=spec[1], num_directions=spec[2])
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step():
        optimizer.zero_grad()
        if fg is None:
            F.cross_entropy(model(x), y).backward()
        else:
            fg.backward(lambda: F.cross_entropy(model(x), y), model.parameters())
        optimizer.step()
    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = {name: make_step(spec) for name, spec in METHODS.items()}
    for step in steps.values():  # warm up
        step()
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print("| method | median ms/step | vs backprop | vs weight (FG-W K=1) |\n|---|---|---|---|")
    for name, t in medians.items():
        print(f"| {name} | {1000 * t:.1f} | {t / medians['backprop']:.2f}x | {t / medians['weight']:.2f}x |")
    if args.json:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread"
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/variance_step.py " + " ".join(argv or []), "machine": machine,
                       "rounds": args.rounds, "steps": args.steps, "seconds": times, "median_seconds": medians}, f, indent=1)


if __name__ == "__main__":
    main()
