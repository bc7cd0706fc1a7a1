"""Time to draw one set of tangent values: the counter-based generator against torch's own.

Times, interleaved round by round, drawing ``--count`` values (default: the paper MLP's
1,863,690 parameters) with ``counter_rng.normal``, ``counter_rng.signs`` and torch's
``Tensor.normal_`` (mt19937 on the CPU, Philox on CUDA), and ``counter_rng.normal`` into a
buffer kept between draws (``out=``, as K > 1 steps draw), and prints the median of each.

    python benchmarks/tangent_draw.py
    python benchmarks/tangent_draw.py --count 29819040   # K = 16 directions of the paper MLP
    python benchmarks/tangent_draw.py --count 100000 --repeats 50 --json draw.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fwdgrad_plugins.tangents import counter_rng

PAPER_MLP_PARAMETERS = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10


def draws(count: int, device: torch.device) -> dict:
    """The draws to time, each a function of the round number (a new seed per round)."""
    buffer = torch.empty(count, device=device)
    kept = torch.empty(count, device=device)  # as ForwardGradient keeps K > 1 tangents' memory
    generator = torch.Generator(device=device)
    return {
        "torch normal_": lambda seed: buffer.normal_(generator=generator.manual_seed(seed)),
        "counter_rng.normal": lambda seed: counter_rng.normal(seed, 0, count, device),
        "counter_rng.normal into a kept buffer": lambda seed: counter_rng.normal(seed, 0, count, device, out=kept),
        "counter_rng.signs": lambda seed: counter_rng.signs(seed, 0, count, device),
    }


def median_times(count: int, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per draw, the draws interleaved round by round."""
    functions = draws(count, device)
    for draw in functions.values():
        for seed in range(warmup):  # the first counter_rng call compiles its kernel
            draw(seed)
    times = {name: [] for name in functions}
    for seed in range(repeats):
        for name, draw in functions.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            draw(seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=PAPER_MLP_PARAMETERS, help="values per draw")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH", help="write the medians (seconds) to PATH")
    args = parser.parse_args(argv)
    medians = median_times(args.count, torch.device(args.device), args.repeats, args.warmup)
    print(f"| draw of {args.count:,} values on {args.device} ({torch.get_num_threads()} threads) | ms |")
    print("| --- | ---: |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"count": args.count, "device": args.device, "threads": torch.get_num_threads(),
                       "median_seconds": medians}, out, indent=1)
    return medians


if __name__ == "__main__":
    main()
