"""Time per training step of the FG-W variants (fwdgrad_plugins/directions.py) and backprop,
side by side in one process: rounds of interleaved steps, the median per method.

    python benchmarks/variance_step.py --rounds 5 --steps 10 --json docs/variance/step_times.json

The paper MLP (784-1024-1024-10) on random MNIST-shaped batches of 64, Adam, one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad_plugins import ForwardGradientEstimator

METHODS = {  # name: (estimator, tangents, K); None: backprop
    "backprop": None,
    "weight": ("weight", "gaussian", 1),
    "weight-k2": ("weight", "gaussian", 2),
    "orthogonal-k2": ("weight", "orthogonal-gaussian", 2),
    "blockwise": ("blockwise", "gaussian", 1),
    "blockwise-rank1": ("blockwise", "rank1-gaussian", 1),
    "guided-k2": ("guided", "gaussian", 2),
}


def paper_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


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
