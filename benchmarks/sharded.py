"""Sharded training on N gloo processes, side by side: FSDP2 backprop (SGD, AdamW), FSDP2 +
``ForwardSGD``, FSDP2 + ``ForwardGradient(SGD)``, and replicated ``ForwardSGD`` (each process
the whole model, K floats all-reduced: the Accelerate loop's forward gradient).

Each (ranks, method) runs in N fresh processes, on a GPT-2 built from a config (every block
``fully_shard``-ed, then the root; for forward gradients the root with
``reshard_after_forward=True``, which FSDP2 backprop leaves off for the root since its backward
pass needs the root at once). Per rank it reports:

- peak memory above resting, parameters included: the peak resident set (``VmHWM``, reset
  through ``/proc/self/clear_refs`` after the model is built and sharded and one step has run)
  minus the resident set before the model was built, with glibc's mmap threshold at 64 KiB so
  that freed blocks go back to the system (``MALLOC_MMAP_THRESHOLD_``);
- bytes per step through collectives, counted by
  :class:`fwdgrad_plugins.distributed.traffic.CollectiveTraffic` (the whole tensor each
  all-gather, reduce-scatter and all-reduce moves), and the seconds spent inside those calls;
- the median step time (ranks start each step together; a step's time is its slowest rank's),
  and of its forward pass (backprop: the loss; ``ForwardSGD``: the forward-mode pass and the
  K-float all-reduce, before the update).

The table gives the largest per-rank peak over the ranks and rank 0's bytes.

    python benchmarks/sharded.py --ranks 2,4 --json docs/benchmarks/sharded_cpu.json \\
        --markdown docs/benchmarks/sharded_cpu.md --plot docs/benchmarks/sharded_cpu.png
    python benchmarks/sharded.py --quick     # a smoke test: a tiny GPT-2, 2 ranks, seconds
    python benchmarks/sharded.py --ranks 2 --methods fsdp-forward-sgd --where 8   # where the peak is
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch

from step import _rss_bytes  # (step.py's resident-memory reading, beside this file)

METHODS = {  # name: (sharded, optimizer)
    "fsdp-backprop-sgd": (True, "backprop-sgd"),
    "fsdp-backprop-adamw": (True, "backprop-adamw"),
    "fsdp-forward-sgd": (True, "forward-sgd"),
    "fsdp-forward-gradient-sgd": (True, "forward-gradient-sgd"),
    "replicated-forward-sgd": (False, "forward-sgd"),
}
TARGETS = [  # (method, reference, bound at 2 ranks, bound at 4 ranks, what)
    ("fsdp-forward-sgd", "replicated-forward-sgd", "peak", 0.6, 0.4, "FSDP2 + ForwardSGD peak vs replicated ForwardSGD"),
    ("fsdp-forward-sgd", "fsdp-backprop-adamw", "peak", 0.5, 0.5, "FSDP2 + ForwardSGD peak vs FSDP2 backprop + AdamW"),
    ("fsdp-forward-sgd", "fsdp-backprop-sgd", "bytes", 0.4, 0.4, "FSDP2 + ForwardSGD bytes/step vs FSDP2 backprop"),
]


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers,
                                      n_head=args.heads, n_positions=args.length, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def child(method: str, rank: int, world: int, port: str, args) -> dict:
    """One rank of one method: its peak, traffic and step times."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fwdgrad_plugins import ForwardGradient, ForwardSGD
    from fwdgrad_plugins.distributed.traffic import CollectiveTraffic
    from fwdgrad_plugins.tangents import counter_rng

    import transformers.models.gpt2.modeling_gpt2  # noqa: F401 (imported before resting memory is read)

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    counter_rng.build_kernels()  # one-time, before resting memory is read
    resting = _rss_bytes("VmRSS")
    sharded, kind = METHODS[method]
    model = build(args)
    parameters = sum(p.numel() for p in model.parameters())
    if sharded:
        for block in model.transformer.h:
            fully_shard(block)
        # forward gradients: the root resharded after forward too, so it is not held through the
        # blocks (FSDP2's default keeps it gathered for the backward pass that backprop runs next)
        fully_shard(model, reshard_after_forward=None if kind.startswith("backprop") else True)
    params = list(model.parameters())
    if kind == "backprop-sgd":
        opt = torch.optim.SGD(params, lr=args.lr)
    elif kind == "backprop-adamw":
        opt = torch.optim.AdamW(params, lr=args.lr)
    elif kind == "forward-sgd":
        opt = ForwardSGD(params, lr=args.lr, seed=0)
    else:
        opt = ForwardGradient(torch.optim.SGD(params, lr=args.lr), seed=0)

    def mean(derivatives):
        total = derivatives.clone()
        dist.all_reduce(total)
        return total / world

    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, args.vocab, (args.batch, args.length), generator=generator)
               for _ in range(args.steps + 1)]

    forward_times = []

    def step(ids):
        """One step; appends the seconds of its forward pass (ForwardSGD: the forward-mode
        pass and the all-reduce, before the update) to forward_times."""
        closure = lambda: model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        started = time.perf_counter()
        if kind.startswith("backprop"):
            loss = closure()
            forward_times.append(time.perf_counter() - started)
            loss.backward()
            opt.step()
            return loss.item()
        if kind == "forward-sgd":
            loss = opt.accumulate(closure, reduce=None if sharded else mean).loss
            forward_times.append(time.perf_counter() - started)
            opt.step()
            return loss.item()
        forward_times.append(float("nan"))  # ForwardGradient: one call
        return opt.step(closure).item()

    step(batches[0])  # one-time costs (FSDP2's lazy init, optimizer state) count in the peak, not the time
    forward_times.clear()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM from here: the steady state, the model's memory included
    times, losses, traffic = [], [], CollectiveTraffic()
    for ids in batches[1:]:
        dist.barrier()
        started = time.perf_counter()
        with traffic:
            losses.append(step(ids))
        times.append(time.perf_counter() - started)
    peak = _rss_bytes("VmHWM") - resting
    timed_forward_times = list(forward_times)  # (before the step of peak_intervals)
    where = peak_intervals(step, batches[1], model, resting) if args.where else []
    dist.destroy_process_group()
    return {"method": method, "rank": rank, "ranks": world, "parameters": parameters, "peak_bytes": peak,
            "bytes_per_step": traffic.bytes / args.steps, "calls_per_step": {k: v / args.steps for k, v in traffic.calls.items()},
            "collective_seconds_per_step": traffic.seconds / args.steps, "step_seconds": times,
            "forward_seconds": timed_forward_times, "losses": losses, "where": where}


def _clear_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM from here


def peak_intervals(step, ids, model, resting: int) -> list[tuple[str, float]]:
    """One more step, with the peak resident set read and reset as every module's forward
    starts and ends: ``(interval, MB above resting)`` in order, an interval named by the
    marks at its ends (``in m``: ``m``'s forward starts, its FSDP2 hooks included; ``after m``:
    it ended); the last is the rest of the step (the update)."""
    names = {m: n or "model" for n, m in model.named_modules()}
    state = {"label": "step start"}
    found = []

    def mark(label):
        found.append((f"{state['label']} -> {label}", (_rss_bytes("VmHWM") - resting) / 2**20))
        state["label"] = label
        _clear_peak()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(
                   lambda m, args: mark(f"in {names.get(m, type(m).__name__)}")),
               torch.nn.modules.module.register_module_forward_hook(
                   lambda m, args, out: mark(f"after {names.get(m, type(m).__name__)}"))]
    _clear_peak()
    try:
        step(ids)
    finally:
        for handle in handles:
            handle.remove()
    mark("step end")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(method: str, world: int, args) -> dict:
    """``method`` on ``world`` fresh processes; the ranks' reports combined."""
    port = str(_free_port())
    command = [sys.executable, os.path.abspath(__file__), "--child", method, "--port", port, *args.forwarded]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore",
                   "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([*command, "--rank", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=environment) for rank in range(world)]
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"{method} on {world} ranks failed:\n{err[-3000:]}")
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    slowest = [max(r["step_seconds"][i] for r in ranks) for i in range(len(ranks[0]["step_seconds"]))]
    return {"method": method, "ranks": world, "parameters": ranks[0]["parameters"],
            "peak_bytes": max(r["peak_bytes"] for r in ranks), "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "bytes_per_step": ranks[0]["bytes_per_step"], "calls_per_step": ranks[0]["calls_per_step"],
            "collective_seconds_per_step": max(r["collective_seconds_per_step"] for r in ranks),
            "median_step_seconds": statistics.median(slowest), "step_seconds": slowest,
            "median_forward_seconds": statistics.median(max(r["forward_seconds"][i] for r in ranks)
                                                        for i in range(len(slowest))),
            "losses": [r["losses"] for r in ranks], "where": ranks[0]["where"]}


def add_ratios(rows: list[dict]) -> None:
    """Each row's peak, bytes and time over FSDP2 backprop SGD's on as many ranks."""
    for row in rows:
        reference = next((r for r in rows if r["ranks"] == row["ranks"] and r["method"] == "fsdp-backprop-sgd"), None)
        row["time_vs_fsdp_backprop_sgd"] = (float("nan") if reference is None  # (--methods without it)
                                            else row["median_step_seconds"] / reference["median_step_seconds"])


def targets(rows: list[dict]) -> list[dict]:
    found = {(r["method"], r["ranks"]): r for r in rows}
    checks = []
    for method, reference, what, bound2, bound4, label in TARGETS:
        for ranks, bound in ((2, bound2), (4, bound4)):
            if (method, ranks) in found and (reference, ranks) in found:
                key = "peak_bytes" if what == "peak" else "bytes_per_step"
                ratio = found[(method, ranks)][key] / max(found[(reference, ranks)][key], 1)
                checks.append({"target": label, "ranks": ranks, "ratio": ratio, "bound": bound, "met": ratio <= bound})
    return checks


def markdown(rows: list[dict], checks: list[dict]) -> str:
    lines = ["| ranks | method | peak per rank above resting (MB) | collective MB per step | in collectives (s/step) "
             "| forward pass (s) | step (s, median) | step vs FSDP2 backprop SGD |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        forward = "" if r["median_forward_seconds"] != r["median_forward_seconds"] else f"{r['median_forward_seconds']:.2f}"
        lines.append(f"| {r['ranks']} | {r['method']} | {r['peak_bytes'] / 2**20:.0f} | {r['bytes_per_step'] / 2**20:.1f} "
                     f"| {r['collective_seconds_per_step']:.2f} | {forward} | {r['median_step_seconds']:.2f} "
                     f"| {r['time_vs_fsdp_backprop_sgd']:.2f} |")
    lines += ["", "| target | ranks | ratio | bound | met |", "| --- | ---: | ---: | ---: | --- |"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['ranks']} | {c['ratio']:.2f} | ≤ {c['bound']} | {'yes' if c['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["ranks"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, key, label, scale in ((axes[0], "peak_bytes", "peak per rank above resting (MB)", 2**20),
                                  (axes[1], "bytes_per_step", "collective MB per step (rank 0)", 2**20),
                                  (axes[2], "median_step_seconds", "step time (s, median)", 1)):
        methods = list(dict.fromkeys(r["method"] for r in rows))
        width = 0.8 / len(worlds)
        for i, world in enumerate(worlds):
            values = [next((r[key] / scale for r in rows if r["method"] == m and r["ranks"] == world), 0) for m in methods]
            ax.barh([j + i * width for j in range(len(methods))], values, height=width, label=f"{world} ranks")
        ax.set_yticks([j + width * (len(worlds) - 1) / 2 for j in range(len(methods))], methods, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sharded training on N gloo processes: FSDP2 backprop against "
                                     "FSDP2 with forward gradients and replicated ForwardSGD.")
    parser.add_argument("--ranks", default="2,4", help="comma-separated process counts")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192, help="GPT-2's own is 50257; see docs/distributed.md")
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT-2 on 2 ranks: a smoke test")
    parser.add_argument("--where", type=int, default=0, metavar="N",
                        help="after the timed steps, one more with the peak read at every module's start and "
                             "end: print each method's N highest intervals (rank 0), and keep all in the JSON")
    parser.add_argument("--json"), parser.add_argument("--markdown"), parser.add_argument("--plot")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.layers, args.width, args.heads, args.vocab, args.length, args.steps = "2", 2, 32, 2, 128, 16, 2
    args.forwarded = [f"--{k}={getattr(args, k)}" for k in
                      ("layers", "width", "heads", "vocab", "batch", "length", "steps", "lr", "threads", "where")]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rank, int(os.environ["WORLD_SIZE"]), args.port, args)), flush=True)
        sys.stderr.flush()
        # The report is out and the process group destroyed: skip the interpreter's teardown,
        # where gloo's background threads now and then abort the process ("terminate called
        # without an active exception") after the work is done.
        os._exit(0)
    from tqdm.auto import tqdm

    runs = [(world, method) for world in map(int, args.ranks.split(",")) for method in args.methods.split(",")]
    rows = []
    for world, method in tqdm(runs, desc="sharded", unit="run", file=sys.stderr):
        rows.append(measure(method, world, args))
    add_ratios(rows)
    checks = targets(rows)
    table = markdown(rows, checks)
    print(table)
    for row in rows if args.where else []:
        print(f"{row['ranks']} ranks, {row['method']}: highest peaks above resting in one step (rank 0), MB")
        for interval, mb in sorted(row["where"], key=lambda item: -item[1])[:args.where]:
            print(f"  {mb:7.1f}  {interval}")
    machine = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "processor": platform.processor() or platform.machine(), "torch_threads_per_rank": args.threads,
               "backend": "gloo"}
    config = {k: getattr(args, k) for k in ("layers", "width", "heads", "vocab", "batch", "length", "steps", "lr")}
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine, "command": ["python", "benchmarks/sharded.py", *(argv or sys.argv[1:])],
                       "config": config, "rows": rows, "targets": checks}, out, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(table)
    if args.plot:
        plot(rows, args.plot, f"GPT-2 ({rows[0]['parameters'] / 1e6:.0f} M parameters) sharded on gloo CPU "
                              "processes: FSDP2 backprop vs forward gradients")
    return rows


if __name__ == "__main__":
    main()
