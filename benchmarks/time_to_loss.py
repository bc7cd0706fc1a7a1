"""Wall time to reach a training loss on MNIST (the paper's MLP): every tangent sampler next to
backprop, each with its own learning rate, on the same initial weights and batch order.

A cheaper step with a noisier estimate only pays if training gets faster per second: this
trains each method with plain SGD until the mean of its last ``--window`` batch losses falls
to ``--target-loss`` or ``--budget-s`` seconds pass, and reports the time, steps and epochs,
for each of ``--seeds`` (initial weights, batch order and tangents), as a table, a JSON file
and a plot of the loss against time.

    FWDGRAD_DATA_DIR=../shared/data python benchmarks/time_to_loss.py --json ttl.json --plot ttl.png
    # the paper's setting: one learning rate for every method, decayed as lr·exp(-1e-4·step)
    FWDGRAD_DATA_DIR=../shared/data python benchmarks/time_to_loss.py --lr 2e-4 --decay 1e-4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fwdgrad_plugins
from fwdgrad_plugins import ForwardGradient
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # paper_models, mnist_data
from mnist_data import mnist  # noqa: E402
from paper_models import paper_mlp  # noqa: E402

# SGD learning rates from a sweep over {1e-5, 3e-5, 1e-4, 2e-4, 3e-4, 1e-3} (forward gradients)
# and {0.03, 0.1, 0.3} (backprop) on this MLP at batch 64: fast, yet stable until loss 2.0
# (1e-3 diverges within 200 steps for every sampler). Forward gradients need far smaller steps
# than backprop: the estimate's squared norm is about (number of parameters) × the gradient's.
DEFAULT_LEARNING_RATES = {"backprop": 0.1, "gaussian": 2e-4, "rademacher": 2e-4, "rank1-gaussian": 3e-4}
FORWARD_GRADIENT_LR = 2e-4  # for a sampler without its own entry
CURVE_SPACING = 1.02  # the plot's points: steps about 2 % apart (log-spaced, like its time axis)


@dataclass
class Result:
    method: str
    lr: float
    seed: int
    reached: bool
    seconds: float  # until the target, or the whole budget when not reached
    steps: int
    epochs: float
    final_loss: float  # the windowed mean at the end
    seconds_vs_backprop: Optional[float] = None  # against backprop with the same seed
    curve: list = field(default_factory=list)  # (seconds, step, windowed mean loss)


def train_until(method: str, lr: float, images, labels, *, batch: int, target: float, window: int,
                budget_s: float, seed: int, decay: float = 0.0) -> Result:
    """Train a fresh paper MLP (seeded) with ``method`` until the target or the budget, with
    the learning rate ``lr·exp(-decay·step)``."""
    torch.manual_seed(seed)
    model = paper_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer = inner if method == "backprop" else ForwardGradient(inner, tangents=method, seed=seed)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-decay)) if decay else None
    order = torch.Generator().manual_seed(seed)
    recent: deque = deque(maxlen=window)
    curve: list = []
    steps, next_point, start = 0, 1, time.perf_counter()
    with tqdm(desc=f"{method} seed {seed}", unit="step", leave=False, file=sys.stderr) as bar:
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
                if scheduler is not None:
                    scheduler.step()
                steps += 1
                recent.append(float(loss.detach()))
                elapsed = time.perf_counter() - start
                mean = sum(recent) / len(recent)
                reached = len(recent) == window and mean <= target
                done = reached or elapsed >= budget_s or mean != mean  # mean != mean: diverged to NaN
                if done or steps >= next_point:
                    curve.append((elapsed, steps, mean))
                    next_point = max(steps + 1, int(steps * CURVE_SPACING))
                bar.update()
                if steps % 50 == 0:
                    bar.set_postfix(loss=f"{mean:.3f}", refresh=False)
                if done:
                    return Result(method, lr, seed, reached, elapsed, steps, steps * batch / len(labels),
                                  mean, curve=curve)


def compare_to_backprop(results: list[Result]) -> None:
    """Set each reached result's time as a multiple of backprop's with the same seed."""
    backprop = {r.seed: r for r in results if r.method == "backprop" and r.reached}
    for r in results:
        if r.reached and r.seed in backprop:
            r.seconds_vs_backprop = r.seconds / backprop[r.seed].seconds


def format_table(results: list[Result], target: float) -> str:
    """One row per method: medians over the seeds that reached the target."""
    seeds = len({r.seed for r in results})
    lines = [f"| method | lr | reached ({seeds} seeds) | seconds to loss {target} | × backprop | steps "
             f"| ms per step |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        done = [r for r in mine if r.reached]

        def median(values, spec):
            values = [v for v in values if v is not None]
            return format(statistics.median(values), spec) if values else ""

        seconds = median([r.seconds for r in done], ".1f") or f"not in {mine[0].seconds:.0f}"
        lines.append(f"| {method} | {mine[0].lr:g} | {len(done)} | {seconds} "
                     f"| {median([r.seconds_vs_backprop for r in done], '.2f')} "
                     f"| {median([r.steps for r in done], '.0f')} "
                     f"| {median([1e3 * r.seconds / r.steps for r in mine], '.2f')} |")
    return "\n".join(lines)


def plot(results: list[Result], target: float, path: str) -> None:
    """The windowed training loss against seconds, one line per run, a colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r.method for r in results))}
    for r in results:
        if r.curve:
            seconds, _, losses = zip(*r.curve)
            label = f"{r.method} (lr {r.lr:g})" if r.seed == results[0].seed else None
            ax.plot(seconds, losses, color=colours[r.method], label=label, linewidth=1.2)
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target}")
    ax.set_xscale("log")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("train loss (mean of the last batches)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def learning_rates(methods: list[str], options: list[str]) -> dict[str, float]:
    """Each method's rate: the defaults, then ``--lr LR`` (every method) and ``--lr METHOD=LR``
    in the order given."""
    rates = dict(DEFAULT_LEARNING_RATES)
    for option in options:
        name, _, value = option.rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            raise SystemExit(f"--lr {option}: give a number, or METHOD=NUMBER") from None
        if not name:
            rates.update(dict.fromkeys(methods, rate))
        elif name in methods:
            rates[name] = rate
        else:
            raise SystemExit(f"--lr {option}: {name} is not among the methods run ({', '.join(methods)})")
    return {m: rates.get(m, FORWARD_GRADIENT_LR) for m in methods}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with MNIST/raw (default: $FWDGRAD_DATA_DIR)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated: backprop and tangent sampler names, or 'all'")
    parser.add_argument("--lr", action="append", default=[], metavar="[METHOD=]LR",
                        help="learning rate of one method, or of every method without METHOD= "
                             "(repeatable); defaults: "
                             + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LEARNING_RATES.items()))
    parser.add_argument("--decay", type=float, default=0.0,
                        help="lr·exp(-DECAY·step), as the paper's 1e-4 (default: constant)")
    parser.add_argument("--target-loss", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=20, help="batch losses averaged for the target")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds per run at most")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--limit", type=int, help="use the first LIMIT training images only")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run of each method per seed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="write the results and loss curves to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of loss against time to PATH")
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
    rates = learning_rates(methods, args.lr)
    seeds = [int(s) for s in args.seeds.split(",")]
    images, labels = mnist(args.data_dir, train=True, limit=args.limit).tensors
    for m in methods:  # one step each first, so that no timed run pays a one-time kernel build
        train_until(m, rates[m], images, labels, batch=args.batch, target=args.target_loss,
                    window=args.window, budget_s=0.0, seed=seeds[0])
    results = [train_until(m, rates[m], images, labels, batch=args.batch, target=args.target_loss,
                           window=args.window, budget_s=args.budget_s, seed=seed, decay=args.decay)
               for seed in seeds for m in methods]
    compare_to_backprop(results)
    print(format_table(results, args.target_loss))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": sys.argv, "target_loss": args.target_loss, "decay": args.decay,
                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": [asdict(r) for r in results]}, out, indent=1)
    if args.plot:
        plot(results, args.target_loss, args.plot)
        print(f"wrote {args.plot}")
    return results


if __name__ == "__main__":
    main()
