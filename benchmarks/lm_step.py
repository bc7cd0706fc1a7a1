"""Step time on a causal LM, interleaved in one process: backprop, ForwardSGD and SPSA, with
the closure a user writes, and where a ForwardSGD step's time goes.

The models are ``benchmarks/memory.py``'s cases (built from configs: ``gpt2`` is a 91.5 M-parameter
GPT-2, ``llama`` a 97.5 M-parameter Llama, both 2 × 256 tokens), every method's loss
``model(input_ids=ids, labels=ids).loss`` (``--closure``). Each round runs every method once on
the same batch, and a ratio is the median over rounds of two methods' times in one round, so a
load that drifts during the run moves both. The methods:

- ``backprop``: ``loss.backward()`` and ``torch.optim.SGD``'s step;
- ``forward-sgd``: ``ForwardSGD.step(closure)`` (Gaussian tangents, streamed above 32 MiB);
- ``spsa``: ``ForwardSGD(estimator="spsa").step(closure)``, two forward passes;

and the parts of a ForwardSGD step, timed alike:

- ``forward``: the closure under ``torch.no_grad()``, a plain forward pass;
- ``draw``: every parameter's tangent drawn once from the counter-based stream (a streamed
  step draws them twice: in the pass and for the update);
- ``jvp``: ``directional_derivatives`` on the streamed tangents, the forward-mode pass with
  its draws and no update.

So ``forward-sgd − jvp`` is the update (its draws included) and ``jvp − forward − draw`` what
forward mode adds to the pass besides the draws.

    python benchmarks/lm_step.py --cases gpt2,llama --rounds 5 --json lm_step.json --markdown lm_step.md
    python benchmarks/lm_step.py --cases gpt2 --profile   # torch.profiler's split of one jvp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import CASES, CLOSURES, batches, make_step  # noqa: E402

METHODS = ["backprop", "forward-sgd", "spsa", "forward", "draw", "jvp"]


def make_runner(method: str, model: torch.nn.Module, case, closure: str):
    """A function of a batch that runs ``method`` once."""
    if method in ("backprop", "forward-sgd", "spsa"):
        return make_step(method, model, case, closure)
    from fwdgrad_plugins.engine.forward_mode import directional_derivatives
    from fwdgrad_plugins.tangents.samplers import GaussianSampler
    from fwdgrad_plugins.tangents.streaming import tangent_stream

    loss_of = CLOSURES[closure](model)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = GaussianSampler()
    seed = iter(range(10**9))
    if method == "forward":
        return lambda ids: torch.no_grad()(loss_of)(ids)
    if method == "draw":
        def draw(ids):
            stream = tangent_stream(sampler, params, 1, next(seed))
            for index in range(len(params)):
                stream.draw(index, 0)
        return draw
    return lambda ids: directional_derivatives(lambda: loss_of(ids), params,
                                               tangent_stream(sampler, params, 1, next(seed)))


def profile_case(name: str, closure: str, layers) -> str:
    """torch.profiler's table of one forward-mode pass (``jvp``) after a warm-up one: the ops by
    self CPU time."""
    case = CASES[name] if layers is None else dataclasses.replace(CASES[name], layers=layers)
    torch.manual_seed(0)
    model = case.build()
    model.train()
    ids = batches(case, 1)[0]
    run = make_runner("jvp", model, case, closure)
    run(ids)
    with torch.profiler.profile() as profile:
        run(ids)
    return profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=16)


def run_case(name: str, methods: list[str], rounds: int, closure: str) -> dict:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    model.train()
    ids = batches(case, 1)[0]
    runners = {m: make_runner(m, model, case, closure) for m in methods}
    for run in runners.values():  # warm-up: one-time costs
        run(ids)
    times = {m: [] for m in methods}
    for _ in tqdm(range(rounds), desc=name):
        for method, run in runners.items():
            started = time.perf_counter()
            run(ids)
            times[method].append(time.perf_counter() - started)
    return {"case": name, "parameters": sum(p.numel() for p in model.parameters()), "times": times}


def ratio(times: dict, method: str, reference: str) -> float:
    return statistics.median(a / b for a, b in zip(times[method], times[reference]))


def markdown(results: list[dict]) -> str:
    lines = ["| case | method | median step (s) | × backprop | × SPSA |", "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        t = r["times"]
        for method in t:
            cells = [f"{ratio(t, method, ref):.2f}" if ref in t else "" for ref in ("backprop", "spsa")]
            lines.append(f"| {r['case']} | {method} | {statistics.median(t[method]):.2f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpt2,llama", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--closure", choices=list(CLOSURES), default="plain")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's split of one jvp per case")
    parser.add_argument("--layers", type=int, help="with --profile: the case with this many layers")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods + args.cases.split(",") if m not in METHODS and m not in CASES]
    if unknown:
        raise SystemExit(f"unknown {', '.join(unknown)}; methods: {', '.join(METHODS)}; cases: {', '.join(CASES)}")
    if args.profile:
        for case in args.cases.split(","):
            print(f"{case}: one forward-mode pass\n{profile_case(case, args.closure, args.layers)}")
        return []
    results = [run_case(case, methods, args.rounds, args.closure) for case in args.cases.split(",") if case]
    table = markdown(results)
    print(table)
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": args.threads, "processor": platform.processor() or platform.machine()}
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": info, "command": ["python", "benchmarks/lm_step.py", *(argv or sys.argv[1:])],
                       "closure": args.closure, "results": results}, file, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(table)
    return results


if __name__ == "__main__":
    main()
