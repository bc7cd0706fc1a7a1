"""Long sequences: the blocked forward-mode attention rule next to torch's math kernel.

A stack of GPT-2 blocks (HuggingFace ``GPT2LMHeadModel``, sdpa attention, causal) at sequence
length 2048 trains with ``ForwardGradient.step`` (SGD, gaussian tangents). Two methods:

- ``math``: every attention takes torch's math kernel (the engine's attention rule bypassed),
  which materialises the (batch, heads, L, L) scores, their softmax and both tangents;
- ``blocked``: the default, ``fwdgrad_plugins.engine.attention``'s rule, queries in blocks of
  ``--block-size``.

Step time: both methods in one process, interleaved round by round; the ratio is the median
over rounds of blocked / math in the same round. Peak memory: in a fresh process per method,
the peak resident memory above the resting footprint (model, batch, optimizer built, one step
run, gradients released), with glibc handing freed blocks above 64 KiB back (as
``benchmarks/step.py`` measures it); ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/attention.py --json docs/attention/attention_cpu.json \\
        --plot docs/attention/attention_cpu.png --markdown docs/attention/attention_cpu.md
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import unittest.mock

import torch

from fwdgrad_plugins import ForwardGradient, cpu_memory
from fwdgrad_plugins.engine import attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import _rss_bytes, machine, median_ratio  # noqa: E402  (the same measurements as step.py)

METHODS = ("math", "blocked")
TARGETS = {"memory": 0.3, "time": 1.3}  # blocked / math, from issue 15


def build(args, device):
    """The model and the closure ``ForwardGradient.step`` takes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=args.length, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).to(device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length),
                        generator=torch.Generator().manual_seed(0)).to(device)
    return model, lambda: model(input_ids=ids, labels=ids).loss


def runner(method, args, device):
    """One forward-gradient step of ``method``: a function taking no arguments."""
    model, closure = build(args, device)
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=1e-6), num_directions=args.directions, seed=0)
    rule = attention.scaled_dot_product_attention
    if method == "math":
        rule = lambda *args, single_direction, **kwargs: torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)  # noqa: E731
    else:
        rule = functools.partial(_with_block_size, rule, args.block_size)

    def step():
        with unittest.mock.patch.object(attention, "scaled_dot_product_attention", rule):
            opt.zero_grad()
            opt.step(closure)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step.model = model
    return step


def _with_block_size(rule, block_size, *args, **kwargs):
    """The engine's attention rule with queries in blocks of ``block_size``."""
    with unittest.mock.patch.object(attention, "BLOCK_SIZE", block_size):
        return rule(*args, **kwargs)


def peak_memory_here(method, args, device) -> dict:
    step = runner(method, args, device)
    step()
    for p in step.model.parameters():
        p.grad = None
    gc.collect()
    cpu_memory.empty_cache()
    if device.type == "cuda":
        resting = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.memory_steps):
            step()
        return {"resting_bytes": resting, "peak_above_resting_bytes": torch.cuda.max_memory_allocated(device) - resting}
    resting = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM, the peak resident set, to the current one
    for _ in range(args.memory_steps):
        step()
    return {"resting_bytes": resting, "peak_above_resting_bytes": _rss_bytes("VmHWM") - resting}


def peak_memory(method, argv) -> dict:
    """``peak_memory_here`` in a fresh process."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--memory-child", method]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"memory run {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_times(args, device) -> dict[str, list[float]]:
    steps = {m: runner(m, args, device) for m in METHODS}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {m: [] for m in METHODS}
    for repeat in range(args.repeats):
        for m in METHODS if repeat % 2 == 0 else METHODS[::-1]:
            start = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - start)
    return times


def table(rows) -> str:
    lines = ["| method | ms/step (median) | × math | peak MB above resting | × math |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['median_ms']:.0f} | {r['time_vs_math']:.2f} | "
                     f"{r['peak_mb']:.1f} | {r['memory_vs_math']:.3f} |")
    return "\n".join(lines)


def plot(rows, title, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
    names = [r["method"] for r in rows]
    for ax, key, label, target in ((axes[0], "peak_mb", "peak MB above resting", TARGETS["memory"]),
                                   (axes[1], "median_ms", "ms per step (median)", TARGETS["time"])):
        values = [r[key] for r in rows]
        ax.bar(names, values, color=["grey", "C0"])
        for x, value in enumerate(values):
            ax.text(x, value, f"{value:.0f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(target * values[0], color="C3", linestyle="--", linewidth=1, label=f"target: {target}× math")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=attention.BLOCK_SIZE)
    parser.add_argument("--directions", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--markdown")
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        print(json.dumps(peak_memory_here(args.memory_child, args, device)))
        return None
    times = step_times(args, device)
    memory = {m: peak_memory(m, argv) for m in METHODS}
    rows = [{"method": m, "median_ms": statistics.median(times[m]) * 1e3,
             "time_vs_math": median_ratio(times[m], times["math"]),
             "peak_mb": memory[m]["peak_above_resting_bytes"] / 2**20,
             "memory_vs_math": memory[m]["peak_above_resting_bytes"] / memory["math"]["peak_above_resting_bytes"],
             "times_s": times[m], **memory[m]} for m in METHODS]
    title = (f"Forward-gradient step, GPT-2 ({args.layers} blocks, width {args.width}, {args.heads} heads), "
             f"seq {args.length}, K={args.directions}, {device.type}: blocked attention vs math kernel")
    text = f"{title}\n\n{table(rows)}\n"
    print(text, flush=True)
    report = {"title": title, "command": ["python", "benchmarks/attention.py", *argv],
              "machine": machine(device), "targets": TARGETS, "rows": rows}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(f"`{' '.join(report['command'])}`\n\n{text}")
    if args.plot:
        plot(rows, title, args.plot)
    return report


if __name__ == "__main__":
    main()
