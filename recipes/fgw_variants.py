# Lower-variance weight perturbation on MNIST: FG-W against its block-wise, size-scaled,
# guided and orthogonal variants (fwdgrad_plugins/estimators/blockwise.py, guided.py,
# tangents/orthogonal.py) and per-example weight tangents
# (fwdgrad_plugins/estimators/per_example.py), the paper MLP, no local
# losses and no backward pass, each variant at its best learning rate, over seeds.
#
# Training runs recipes/mnist.py (one subprocess per variant and seed, --lr-sweep inside):
#
#   python recipes/fgw_variants.py run --variants weight,blockwise,blockwise-scaled \
#       --lrs 1e-4,3e-4,1e-3 --seeds 0 --epochs 1 --train-limit 20000 --output-dir runs/fgw/screen
#   python recipes/fgw_variants.py run --variants blockwise --lrs 3e-4 --seeds 0,1,2 --epochs 10 \
#       --output-dir runs/fgw/final
#
# then one table (test error, mean and spread over seeds), a plot of loss against steps and
# against seconds, and a JSON file, across any run folders:
#
#   python recipes/fgw_variants.py report runs/fgw/final --plot docs/variance/mnist.png \
#       --json docs/variance/mnist.json
#
# Variants (name: estimator, tangents, K): see VARIANTS; the variant "backprop" runs the
# reference. --optimizer adam-size-scaled gives each layer lr·√(n_min / n_layer) (per-layer
# scaling for Adam, which ignores a scaled estimate): `train` adds it to mnist.py's optimizers.
"""MNIST comparisons of FG-W variants, through recipes/mnist.py."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parent

VARIANTS = {  # name: (estimator, tangents, num_directions)
    "weight": ("weight", "gaussian", 1),
    "weight-k2": ("weight", "gaussian", 2),
    "orthogonal-k2": ("weight", "orthogonal-gaussian", 2),
    "blockwise": ("blockwise", "gaussian", 1),
    "blockwise-rank1": ("blockwise", "rank1-gaussian", 1),
    "blockwise-parameter": ("blockwise-parameter", "gaussian", 1),
    "blockwise-parameter-rank1": ("blockwise-parameter", "rank1-gaussian", 1),
    "blockwise-scaled": ("blockwise-scaled", "gaussian", 1),
    "guided-k2": ("guided", "gaussian", 2),
    "per-example": ("weight-per-example", "gaussian", 1),
    "per-example-blockwise": ("weight-per-example-blockwise", "gaussian", 1),
    "per-example-blockwise-k4": ("weight-per-example-blockwise", "gaussian", 4),
    "per-example-blockwise-k8": ("weight-per-example-blockwise", "gaussian", 8),
    "per-example-span": ("weight-per-example-span", "gaussian", 1),
    "per-example-span-blockwise": ("weight-per-example-span-blockwise", "gaussian", 1),
    "per-example-span-blockwise-k4": ("weight-per-example-span-blockwise", "gaussian", 4),
    "activity": ("activity", "gaussian", 1),  # FG-A (activity perturbation): a reference, not FG-W
    "backprop": (None, None, None),
}


def names(text: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    return chosen


def run(argv) -> None:
    parser = argparse.ArgumentParser(prog="fgw_variants.py run")
    parser.add_argument("--variants", type=names, required=True, help="comma-separated, from VARIANTS")
    parser.add_argument("--lrs", required=True, help="learning rates swept for each variant, e.g. 1e-4,3e-4")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (initial weights, data order, tangents)")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--output-dir", required=True)
    args, rest = parser.parse_known_args(argv)  # the rest goes to recipes/mnist.py
    for variant in args.variants:
        estimator, tangents, k = VARIANTS[variant]
        for seed in args.seeds.split(","):
            folder = Path(args.output_dir) / variant / f"seed-{seed}"
            if (folder / "results.json").exists():
                print(f"{folder}: done already")
                continue
            command = [sys.executable, str(Path(__file__).resolve()), "train", "--optimizer", args.optimizer,
                       "--lr-sweep", args.lrs, "--seed", seed, "--output-dir", str(folder), *rest]
            if estimator is None:
                command += ["--method", "backprop"]
            else:
                command += ["--method", "fwdgrad", "--estimator", estimator, "--tangents", tangents,
                            "--num-directions", str(k)]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            saved = json.loads((folder / "results.json").read_text())
            saved["config"]["variant"] = variant
            (folder / "results.json").write_text(json.dumps(saved, indent=1))


def train(argv) -> None:
    """recipes/mnist.py with one more optimizer: ``adam-size-scaled``, Adam with a learning rate
    per layer, lr·√(n_min / n_layer) (fwdgrad_plugins.estimators.blockwise.size_scaled_param_groups)."""
    sys.path.insert(0, str(RECIPES))
    import mnist  # recipes/mnist.py, the shared recipe

    from fwdgrad_plugins.estimators.blockwise import size_scaled_param_groups

    mnist.OPTIMIZERS["adam-size-scaled"] = lambda params, lr: torch.optim.Adam(size_scaled_param_groups(params, lr), lr=lr)
    mnist.main(argv)


def load(folders) -> dict:
    """variant -> lr -> seed -> run (with its history), from every results.json under folders."""
    found: dict = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            results = json.loads(path.read_text())
            variant = results["config"].get("variant") or path.parent.parent.name
            if results["config"]["optimizer"] != "adam":  # the same variant under another optimizer
                variant = f"{variant} ({results['config']['optimizer']})"
            for r in results["runs"]:
                history = results["histories"][r["folder"]]
                found.setdefault(variant, {}).setdefault(r["lr"], {})[results["config"]["seed"]] = {
                    **r, **history, "batch_size": results["config"]["batch_size"], "path": str(path.parent)}
    return found


def error(run) -> float:
    return float("nan") if run["diverged"] else 100 * (1 - run["test_accuracy"])


def summarise(found) -> list[dict]:
    """Per variant, its best learning rate (lowest mean final test error over its seeds)."""
    rows = []
    for variant, by_lr in found.items():
        sweep = {lr: statistics.mean(error(r) for r in seeds.values()) for lr, seeds in by_lr.items()}
        finite = {lr: e for lr, e in sweep.items() if e == e}
        best = min(finite, key=finite.get) if finite else next(iter(sweep))
        seeds = by_lr[best]
        errors = [error(r) for r in seeds.values()]
        rows.append({
            "variant": variant, "estimator": VARIANTS.get(variant.split(" (")[0], (None,))[0] or "backprop",
            "best_lr": best, "sweep": {f"{lr:g}": e for lr, e in sorted(sweep.items())},
            "seeds": sorted(seeds), "test_error": errors,
            "mean_test_error": statistics.mean(errors),
            "spread": (max(errors) - min(errors)) if len(errors) > 1 else 0.0,
            "epochs": max(r["steps"] for r in seeds.values()) * seeds[next(iter(seeds))]["batch_size"] / 60000,
            "median_step_ms": statistics.median(1000 * r["median_step_seconds"] for r in seeds.values()),
            "runs": seeds,
        })
    return sorted(rows, key=lambda r: r["mean_test_error"] if r["mean_test_error"] == r["mean_test_error"] else 1e9)


def table(rows) -> str:
    backprop = next((r for r in rows if r["variant"] == "backprop"), None)
    lines = ["| variant | estimator, tangents, K | best lr (swept: mean test error %) | seeds | epochs "
             "| test error % (mean; min-max) | ms/step | time vs backprop |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        estimator, tangents, k = VARIANTS.get(r["variant"].split(" (")[0], ("?", "?", "?"))
        setting = "backprop" if estimator is None else f"{estimator}, {tangents}, {k}"
        sweep = ", ".join(f"{lr}: {e:.1f}" for lr, e in r["sweep"].items())
        spread = "" if len(r["test_error"]) < 2 else f"; {min(r['test_error']):.2f}-{max(r['test_error']):.2f}"
        relative = f"{r['median_step_ms'] / backprop['median_step_ms']:.2f}x" if backprop else "n/a"
        lines.append(f"| {r['variant']} | {setting} | {r['best_lr']:g} ({sweep}) | {len(r['seeds'])} | "
                     f"{r['epochs']:.2g} | {r['mean_test_error']:.2f}{spread} | {r['median_step_ms']:.1f} | {relative} |")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mnist import smooth  # recipes/mnist.py's running mean

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for colour, r in enumerate(rows):
        for i, (seed, run) in enumerate(sorted(r["runs"].items())):
            label = f"{r['variant']} (lr {r['best_lr']:g})" if i == 0 else None
            losses = smooth([loss for _, loss, _ in run["losses"]], window=50)
            axes[0].plot([s for s, _, _ in run["losses"]], losses, color=f"C{colour}", alpha=0.8, label=label)
            axes[1].plot([t for _, _, t in run["losses"]], losses, color=f"C{colour}", alpha=0.8)
    for ax, x_label in zip(axes, ("step", "training seconds")):
        ax.set_xlabel(x_label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("train loss (moving average of 50 steps)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(argv) -> None:
    parser = argparse.ArgumentParser(prog="fgw_variants.py report")
    parser.add_argument("folders", nargs="+", help="--output-dir folders of `run`")
    parser.add_argument("--plot", default=None, help="PNG: loss against steps and against seconds")
    parser.add_argument("--json", default=None, help="the table's numbers as JSON")
    parser.add_argument("--title", default="MNIST, paper MLP: FG-W variants (one line per seed)")
    args = parser.parse_args(argv)
    rows = summarise(load(args.folders))
    if not rows:
        parser.error("no results.json under those folders: pass --output-dir folders of `run`.")
    print(table(rows))
    if args.plot:
        plot(rows, Path(args.plot), args.title)
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "runs"} for r in rows]
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": slim}, indent=1))
        print(f"wrote {args.json}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        run(argv[1:])
    elif argv[:1] == ["train"]:
        train(argv[1:])
    elif argv[:1] == ["report"]:
        report(argv[1:])
    else:
        raise SystemExit("usage: fgw_variants.py run ... | report FOLDER ... (see the header)")


if __name__ == "__main__":
    main()
