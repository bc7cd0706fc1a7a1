"""Wall time to reach a training loss on MNIST (the paper's MLP): every tangent sampler next to
backprop, each with its own learning rate, on the same initial weights and batch order.

A cheaper step with a noisier estimate only pays if training gets faster per second: this
trains each method with plain SGD until the mean of its last ``--window`` batch losses falls
to ``--target-loss`` or ``--budget-s`` seconds pass, and reports the time, steps and epochs.

    FWDGRAD_DATA_DIR=../shared/data python benchmarks/time_to_loss.py --target-loss 2.0 --json ttl.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import fwdgrad_plugins
from fwdgrad_plugins import ForwardGradient
from fwdgrad_plugins.data import mnist
from fwdgrad_plugins.models import paper_mlp

# SGD learning rates from a sweep over {1e-5, 3e-5, 1e-4, 2e-4, 3e-4, 1e-3} (forward gradients)
# and {0.03, 0.1, 0.3} (backprop) on this MLP at batch 64: fast, yet stable until loss 2.0
# (1e-3 diverges within 200 steps for every sampler). Forward gradients need far smaller steps
# than backprop: the estimate's squared norm is about (number of parameters) × the gradient's.
DEFAULT_LEARNING_RATES = {"backprop": 0.1, "gaussian": 2e-4, "rademacher": 2e-4, "rank1-gaussian": 3e-4}
FORWARD_GRADIENT_LR = 2e-4  # for a sampler without its own entry


@dataclass
class Result:
    method: str
    lr: float
    reached: bool
    seconds: float  # until the target, or the whole budget when not reached
    steps: int
    epochs: float
    final_loss: float  # the windowed mean at the end
    seconds_vs_backprop: Optional[float] = None


def train_until(method: str, lr: float, images, labels, *, batch: int, target: float, window: int,
                budget_s: float, seed: int) -> Result:
    """Train a fresh paper MLP (seeded) with ``method`` until the target or the budget."""
    torch.manual_seed(seed)
    model = paper_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer = inner if method == "backprop" else ForwardGradient(inner, tangents=method, seed=seed)
    order = torch.Generator().manual_seed(seed)
    recent: deque = deque(maxlen=window)
    steps, start = 0, time.perf_counter()
    while True:
        for indices in torch.randperm(len(labels), generator=order).split(batch):
            x, y = images[indices], labels[indices]
            optimizer.zero_grad()
            if method == "backprop":
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
            else:
                loss = optimizer.step(lambda: F.cross_entropy(model(x), y))
            steps += 1
            recent.append(float(loss.detach()))
            elapsed = time.perf_counter() - start
            mean = sum(recent) / len(recent)
            reached = len(recent) == window and mean <= target
            if reached or elapsed >= budget_s or mean != mean:  # mean != mean: diverged to NaN
                return Result(method, lr, reached, elapsed, steps, steps * batch / len(labels), mean)


def format_table(results: list[Result], target: float) -> str:
    lines = [f"| method | lr | time to loss {target} (s) | × backprop | steps | epochs | final loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        seconds = f"{r.seconds:.1f}" if r.reached else f"not in {r.seconds:.0f}"
        ratio = "" if r.seconds_vs_backprop is None else f"{r.seconds_vs_backprop:.2f}"
        lines.append(f"| {r.method} | {r.lr:g} | {seconds} | {ratio} | {r.steps} | {r.epochs:.2f} "
                     f"| {r.final_loss:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with MNIST/raw (default: $FWDGRAD_DATA_DIR)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated: backprop and tangent sampler names, or 'all'")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="learning rate of one method (repeatable); defaults: "
                             + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LEARNING_RATES.items()))
    parser.add_argument("--target-loss", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=20, help="batch losses averaged for the target")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds per method at most")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--limit", type=int, help="use the first LIMIT training images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH")
    return parser.parse_args(argv)


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    known = ["backprop", *fwdgrad_plugins.registered("tangent_samplers")]
    methods = known if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown method {', '.join(unknown)}; known: {', '.join(known)}")
    rates = dict(DEFAULT_LEARNING_RATES)
    for item in args.lr:
        name, _, value = item.partition("=")
        rates[name] = float(value)
    rates = {m: rates.get(m, FORWARD_GRADIENT_LR) for m in methods}
    images, labels = mnist(args.data_dir, train=True, limit=args.limit).tensors
    results = [train_until(m, rates[m], images, labels, batch=args.batch, target=args.target_loss,
                           window=args.window, budget_s=args.budget_s, seed=args.seed) for m in methods]
    backprop = next((r for r in results if r.method == "backprop" and r.reached), None)
    for r in results:
        if backprop is not None and r.reached:
            r.seconds_vs_backprop = r.seconds / backprop.seconds
    print(format_table(results, args.target_loss))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": sys.argv, "target_loss": args.target_loss, "torch": torch.__version__,
                       "results": [asdict(r) for r in results]}, out, indent=1)
    return results


if __name__ == "__main__":
    main()
