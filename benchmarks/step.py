"""Step time and peak memory of forward-gradient training next to backprop, side by side.

Every case times, in one process and interleaved round by round (each round runs every
method once; a ratio is the median over rounds of the two methods' times in one round):

- ``backprop``: ``zero_grad(); loss_fn().backward(); optimizer.step()``;
- ``step``: ``zero_grad(); ForwardGradient.step(loss_fn)``, as users call it (the tangents
  drawn, the forward-mode pass, the estimate written to ``.grad``, the SGD update);
- ``forward-sgd``: ``ForwardSGD.step(loss_fn)``, the update without ``.grad``;
- ``core``: ``directional_derivatives(loss_fn, params, tangents)`` alone, on tangents drawn
  beforehand: the forward-mode pass without drawing tangents or updating.

Peak memory is measured for ``backprop`` and ``step`` in a fresh process each: the peak
resident memory above the resting footprint (model, batch and optimizer built, one step run,
gradients released) on CPU, and ``torch.cuda.max_memory_allocated`` above the resting
allocation on CUDA. Each timed method also reports its minor page faults per step: pages
faulted in afresh, which ``--keep-freed-memory`` (``fwdgrad_plugins.cpu_memory``) avoids.

    python benchmarks/step.py --cases paper-mlp-64 --directions 1 --json step.json --plot step.png
    python benchmarks/step.py --cases deep-mlp-32 --samplers gaussian --memory-only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fwdgrad_plugins
from fwdgrad_plugins import ForwardGradient, ForwardSGD, cpu_memory
from fwdgrad_plugins.engine.forward_mode import directional_derivatives
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # paper_models, mnist_data
from paper_models import deep_mlp, paper_cnn, paper_mlp  # noqa: E402

LR = 1e-6  # tiny, so the model stays put over the repeats; the update's cost does not depend on it


# --------------------------------------------------------------------------- cases


@dataclass
class Workload:
    model: torch.nn.Module
    loss_fn: Callable[[], torch.Tensor]  # the closure users pass: calls the model on a fixed batch


def _classifier(build_model, batch, input_shape, classes=10):
    def build(device):
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = build_model().to(device)
        x = torch.randn(batch, *input_shape, generator=generator).to(device)
        y = torch.randint(0, classes, (batch,), generator=generator).to(device)
        return Workload(model, lambda: F.cross_entropy(model(x), y))

    return build


def _tiny_gpt2(batch=8, length=64):
    def build(device):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=512, n_positions=length, n_embd=128, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config).to(device)
        ids = torch.randint(0, config.vocab_size, (batch, length),
                            generator=torch.Generator().manual_seed(0)).to(device)
        return Workload(model, lambda: model(input_ids=ids, labels=ids).loss)

    return build


CASES: dict[str, Callable[[torch.device], Workload]] = {
    "paper-mlp-64": _classifier(paper_mlp, 64, (1, 28, 28)),
    "paper-mlp-1024": _classifier(paper_mlp, 1024, (1, 28, 28)),
    "paper-cnn-64": _classifier(paper_cnn, 64, (1, 28, 28)),
    "deep-mlp-8": _classifier(lambda: deep_mlp(512, 8), 4096, (784,)),
    "deep-mlp-16": _classifier(lambda: deep_mlp(512, 16), 4096, (784,)),
    "deep-mlp-32": _classifier(lambda: deep_mlp(512, 32), 4096, (784,)),
    "tiny-gpt2": _tiny_gpt2(),
}
DEFAULT_CASES = ("paper-mlp-64", "paper-mlp-1024", "paper-cnn-64", "tiny-gpt2")


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    kind: str  # "backprop", "step", "forward-sgd" or "core"
    sampler: Optional[str] = None
    directions: Optional[int] = None

    @property
    def name(self) -> str:
        return self.kind if self.kind == "backprop" else f"{self.kind}/{self.sampler}/K={self.directions}"

    @classmethod
    def parse(cls, name: str) -> "Method":
        if name == "backprop":
            return cls("backprop")
        kind, sampler, directions = name.split("/")
        return cls(kind, sampler, int(directions.removeprefix("K=")))


def make_runner(method: Method, work: Workload) -> Callable[[], None]:
    """A function running one step of ``method`` on ``work``."""
    params = [p for p in work.model.parameters() if p.requires_grad]
    if method.kind == "backprop":
        optimizer = torch.optim.SGD(params, lr=LR)

        def backprop():
            optimizer.zero_grad()
            work.loss_fn().backward()
            optimizer.step()

        return backprop
    if method.kind == "step":
        optimizer = ForwardGradient(torch.optim.SGD(params, lr=LR), num_directions=method.directions,
                                    tangents=method.sampler, seed=0)

        def forward_gradient_step():
            optimizer.zero_grad()
            optimizer.step(work.loss_fn)

        forward_gradient_step.workspace = optimizer.estimator.estimator.workspace  # see peak_memory_here
        return forward_gradient_step
    if method.kind == "forward-sgd":
        optimizer = ForwardSGD(params, lr=LR, num_directions=method.directions, tangents=method.sampler, seed=0)
        return lambda: optimizer.step(work.loss_fn)
    if method.kind == "core":
        sampler = fwdgrad_plugins.get("tangent_samplers", method.sampler)()
        tangents = sampler.sample(params, method.directions, 0)
        return lambda: directional_derivatives(work.loss_fn, params, tangents)
    raise ValueError(f"unknown method kind {method.kind!r}: use backprop, step, forward-sgd or core")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    """Pages this process has faulted in so far without reading a disk: first writes to
    freshly mapped memory, mostly."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_times(work: Workload, methods: list[Method], device: torch.device, repeats: int,
               warmup: int, label: str = "rounds") -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each method, one per round (every round runs each method once, in
    a rotating order), and each method's minor page faults per call."""
    runners = [make_runner(m, work) for m in methods]
    for run in runners:
        for _ in range(warmup):
            run()
    _synchronize(device)
    times: list[list[float]] = [[] for _ in methods]
    faults = [0] * len(methods)
    for repeat in tqdm(range(repeats), desc=label, unit="round", leave=False, file=sys.stderr):
        shift = repeat % len(methods)
        for index in list(range(shift, len(methods))) + list(range(shift)):
            faults_before = _minor_faults()
            start = time.perf_counter()
            runners[index]()
            _synchronize(device)
            times[index].append(time.perf_counter() - start)
            faults[index] += _minor_faults() - faults_before
    return ({m.name: t for m, t in zip(methods, times)},
            {m.name: f / repeats for m, f in zip(methods, faults)})


def median_ratio(times: list[float], reference: list[float]) -> float:
    """The median over rounds of time / the reference's time in the same round: robust to a
    machine whose speed drifts between rounds, as shared VMs' does."""
    return statistics.median(t / r for t, r in zip(times, reference))


# --------------------------------------------------------------------------- memory


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _release_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def peak_memory_here(case: str, method: Method, device: torch.device, steps: int) -> dict:
    """Peak memory of ``steps`` steps above the resting footprint, in this process.

    One step runs first, so one-time costs (lazy imports, thread pools, compiled kernels)
    count as resting; the gradients are then released, since every step makes them anew, and
    so is the tangent workspace that K > 1 steps keep between steps: it counts as the step's.
    So is the free memory glibc holds after that step, which ``--keep-freed-memory`` keeps.
    """
    work = CASES[case](device)
    run = make_runner(method, work)
    run()
    _release_grads(work.model)
    if hasattr(run, "workspace"):
        run.workspace.clear()
    gc.collect()
    cpu_memory.empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        resting = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        resting = _rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM, the peak resident set, to the current one
        for _ in range(steps):
            run()
        peak = _rss_bytes("VmHWM")
    return {"resting_bytes": resting, "peak_above_resting_bytes": peak - resting}


def peak_memory(case: str, method: Method, device: torch.device, steps: int,
                keep_freed_memory: bool = False) -> dict:
    """``peak_memory_here`` in a fresh Python process, so no other method's caches count.

    glibc's malloc keeps freed blocks of a dynamically growing size for reuse, which would
    hide a step's allocations in the resting footprint; a fixed mmap threshold of 64 KiB
    hands every larger block back to the system when it is freed. With ``keep_freed_memory``
    the child keeps freed memory instead, as a training script calling it would: its peak
    then includes what glibc's heap grows by before it reuses its free blocks.
    """
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", case, method.name, "--device",
               str(device), "--memory-steps", str(steps), "--threads", str(torch.get_num_threads())]
    if keep_freed_memory:
        command.append("--keep-freed-memory")
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"memory run {case} {method.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    case: str
    method: str
    median_ms: Optional[float] = None
    vs_backprop: Optional[float] = None  # median over rounds of time / backprop's time
    vs_one_direction: Optional[float] = None  # the same, over the same sampler's K=1 time
    k_target: Optional[float] = None  # 1 + 0.7 (K - 1)
    page_faults: Optional[float] = None  # minor page faults per timed step
    peak_mb: Optional[float] = None  # above resting
    peak_vs_backprop: Optional[float] = None


def build_rows(case: str, times: dict[str, list[float]], memory: dict[str, dict],
               faults: Optional[dict[str, float]] = None) -> list[Row]:
    rows = []
    names = list(times) or list(memory)
    for name in names:
        method = Method.parse(name)
        row = Row(case, name)
        if name in times:
            row.median_ms = statistics.median(times[name]) * 1e3
            row.page_faults = (faults or {}).get(name)
            if "backprop" in times:
                row.vs_backprop = median_ratio(times[name], times["backprop"])
            one = Method(method.kind, method.sampler, 1).name
            if method.kind != "backprop" and method.directions > 1 and one in times:
                row.vs_one_direction = median_ratio(times[name], times[one])
                row.k_target = 1 + 0.7 * (method.directions - 1)
        if name in memory:
            row.peak_mb = memory[name]["peak_above_resting_bytes"] / 2**20
            if "backprop" in memory and memory["backprop"]["peak_above_resting_bytes"] > 0:
                row.peak_vs_backprop = (memory[name]["peak_above_resting_bytes"]
                                        / memory["backprop"]["peak_above_resting_bytes"])
        rows.append(row)
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""

    def cell(value, spec):
        return "" if value is None else format(value, spec)

    lines = ["| case | method | ms/step | × backprop | × K=1 (target) | page faults/step | peak MB "
             "| × backprop |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        k = "" if r.vs_one_direction is None else f"{r.vs_one_direction:.2f} ({r.k_target:.1f})"
        lines.append(f"| {r.case} | {r.method} | {cell(r.median_ms, '.2f')} | {cell(r.vs_backprop, '.2f')} "
                     f"| {k} | {cell(r.page_faults, '.0f')} | {cell(r.peak_mb, '.1f')} "
                     f"| {cell(r.peak_vs_backprop, '.3f')} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    """One panel per case: each method's step time as a multiple of backprop's, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows if r.vs_backprop is not None))
    if not cases:
        return
    heights = [sum(r.case == case and r.vs_backprop is not None for r in rows) for case in cases]
    fig, axes = plt.subplots(len(cases), 1, figsize=(7, 0.8 + 0.28 * sum(heights) + 0.6 * len(cases)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        shown = [r for r in rows if r.case == case and r.vs_backprop is not None][::-1]
        colours = ["grey" if r.method == "backprop" else "C0" if r.method.startswith("step") else "C1"
                   for r in shown]
        ax.barh([r.method for r in shown], [r.vs_backprop for r in shown], color=colours)
        for y, r in enumerate(shown):
            ax.text(r.vs_backprop, y, f" {r.vs_backprop:.2f}", va="center", fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(case, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("step time × backprop's (median of per-round ratios)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine(device: torch.device, keep_freed_memory: bool = False) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "keep_freed_memory": keep_freed_memory}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------- command line


def _names(text: str, known, what: str) -> list[str]:
    names = list(known) if text == "all" else [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)} (or 'all')")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, or 'all': {', '.join(CASES)}")
    parser.add_argument("--samplers", default="all", help="comma-separated tangent samplers, or 'all'")
    parser.add_argument("--directions", default="1,4,16", help="comma-separated K values")
    parser.add_argument("--methods", default="step,core", help="forward-gradient methods: step, forward-sgd, core")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per method (>= 20 for reports)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory measurement")
    parser.add_argument("--memory-directions", default="1",
                        help="K values whose peak memory is measured ('all' for every K)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--no-memory", action="store_true", help="time only")
    what.add_argument("--memory-only", action="store_true", help="measure memory only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="let glibc keep freed memory for reuse, in the timing and the memory runs "
                             "(fwdgrad_plugins.cpu_memory.keep_freed_memory)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the time ratios to PATH")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.memory_steps < 1:
        raise SystemExit("--repeats and --memory-steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.keep_freed_memory and not cpu_memory.keep_freed_memory():
        raise SystemExit("--keep-freed-memory needs glibc's malloc")
    if args.memory_child:
        case, name = args.memory_child
        print(json.dumps(peak_memory_here(case, Method.parse(name), device, args.memory_steps)))
        return []
    cases = _names(args.cases, list(CASES), "case")
    samplers = _names(args.samplers, fwdgrad_plugins.registered("tangent_samplers"), "sampler")
    directions = [int(k) for k in args.directions.split(",")]
    memory_directions = directions if args.memory_directions == "all" else [
        int(k) for k in args.memory_directions.split(",")]
    kinds = _names(args.methods, ["step", "forward-sgd", "core"], "method")
    methods = [Method("backprop")] + [Method(kind, s, k) for kind in kinds for s in samplers
                                      for k in directions]
    rows = []
    for case in cases:
        times, faults = {}, {}
        if not args.memory_only:
            times, faults = step_times(CASES[case](device), methods, device, args.repeats, args.warmup, case)
        memory = {}
        if not args.no_memory:
            for m in methods:
                if m.kind == "backprop" or (m.kind in ("step", "forward-sgd") and m.directions in memory_directions):
                    memory[m.name] = peak_memory(case, m, device, args.memory_steps, args.keep_freed_memory)
        case_rows = build_rows(case, times, memory, faults)
        print(format_table(case_rows), flush=True)
        rows += case_rows
        if args.json:  # after every case, so a run cut short keeps what it measured
            with open(args.json, "w") as out:
                json.dump({"machine": machine(device, args.keep_freed_memory), "command": sys.argv,
                           "rows": [asdict(r) for r in rows]}, out, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
