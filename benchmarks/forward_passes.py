"""Loss against forward passes: forward gradient (ForwardSGD) next to SPSA / MeZO.

A tiny causal LM (GPT-2 from a config) learns the counting stream of ``benchmarks/memory.py``
from a fixed initialisation. Each method trains at each learning rate of a small sweep, three
seeds (the seed of the tangents and of the batch stream); the best learning rate is the one
with the lowest mean final held-out loss. A forward-gradient step costs one forward-mode pass,
an SPSA step two forward passes, so both are compared at the same number of passes (SPSA
takes half as many steps) and against time.

    python benchmarks/forward_passes.py --passes 800 --json docs/benchmarks/forward_passes.json \\
        --markdown docs/benchmarks/forward_passes.md --plot docs/benchmarks/forward_passes.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import Case, batches  # noqa: E402

CASE = Case("gpt2", layers=2, width=32, heads=2, vocab=32, batch=8, length=16)
LEARNING_RATES = {"forward-gradient": [1e-4, 3e-4, 1e-3, 3e-3], "spsa": [1e-4, 3e-4, 1e-3, 3e-3]}
PASSES_PER_STEP = {"forward-gradient": 1, "spsa": 2}


def run(method: str, lr: float, seed: int, passes: int, evaluate_every: int) -> dict:
    from fwdgrad_plugins import ForwardSGD

    torch.manual_seed(0)  # the same initialisation for every run
    model = CASE.build()
    model.eval()  # no dropout: the same function for both methods
    held_out = batches(CASE, 1, seed=1000)[0]
    steps = passes // PASSES_PER_STEP[method]
    stream = batches(CASE, steps, seed=seed)
    opt = ForwardSGD(model.parameters(), lr=lr, seed=seed, estimator="weight" if method == "forward-gradient" else "spsa")
    curve, seconds = [], 0.0

    def held_out_loss():
        with torch.no_grad():
            return model(input_ids=held_out, labels=held_out).loss.item()

    curve.append((0, 0.0, held_out_loss()))
    for step, ids in enumerate(stream, start=1):
        started = time.perf_counter()
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        seconds += time.perf_counter() - started
        done = step * PASSES_PER_STEP[method]
        if done % evaluate_every == 0 or step == steps:
            loss = held_out_loss()
            curve.append((done, seconds, loss if loss == loss else float("inf")))
    return {"method": method, "lr": lr, "seed": seed, "curve": curve, "final_loss": curve[-1][2]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=400, help="forward passes per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluate_every = max(2, args.passes // 20) // 2 * 2
    runs = [run(m, lr, seed, args.passes, evaluate_every)
            for m, rates in LEARNING_RATES.items() for lr in rates for seed in range(args.seeds)]
    summary = []
    for method, rates in LEARNING_RATES.items():
        for lr in rates:
            finals = [r["final_loss"] for r in runs if r["method"] == method and r["lr"] == lr]
            summary.append({"method": method, "lr": lr, "mean_final_loss": statistics.fmean(finals),
                            "finals": finals,
                            "seconds": statistics.fmean(r["curve"][-1][1] for r in runs
                                                        if r["method"] == method and r["lr"] == lr)})
    best = {m: min((s for s in summary if s["method"] == m), key=lambda s: s["mean_final_loss"])
            for m in LEARNING_RATES}
    initial = runs[0]["curve"][0][2]
    lines = [f"Initial held-out loss {initial:.4f}; {args.passes} forward passes per run, {args.seeds} seeds.", "",
             "| method | lr | mean final held-out loss | per seed | mean seconds |", "| --- | ---: | ---: | --- | ---: |"]
    for s in summary:
        mark = " (best)" if best[s["method"]] is s else ""
        lines.append(f"| {s['method']}{mark} | {s['lr']:g} | {s['mean_final_loss']:.4f} | "
                     f"{', '.join(f'{f:.4f}' for f in s['finals'])} | {s['seconds']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": {"torch": torch.__version__, "python": platform.python_version(),
                                   "cpu_count": os.cpu_count(), "torch_threads": args.threads},
                       "command": ["python", "benchmarks/forward_passes.py", *(argv if argv is not None else sys.argv[1:])],
                       "case": CASE.__dict__, "runs": runs, "summary": summary}, file, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for method, color in (("forward-gradient", "tab:blue"), ("spsa", "tab:orange")):
            chosen = [r for r in runs if r["method"] == method and r["lr"] == best[method]["lr"]]
            for i, r in enumerate(chosen):
                label = f"{method} (lr {best[method]['lr']:g})" if i == 0 else None
                axes[0].plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], color=color, label=label)
                axes[1].plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]], color=color, label=label)
        axes[0].set_xlabel("forward passes")
        axes[1].set_xlabel("seconds of training")
        for ax in axes:
            ax.set_ylabel("held-out loss")
            ax.legend()
        fig.suptitle(f"Forward gradient vs SPSA on a tiny GPT-2, best lr of a sweep, {args.seeds} seeds")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    main()
