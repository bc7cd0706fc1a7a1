"""Reading recipes/finetune.py's results: the table, the plots, and the targets.

    python recipes/finetune_report.py runs/finetune/*/results.json
    python recipes/finetune_report.py --merge runs/finetune/lm.json runs/finetune/lm-a/results.json runs/finetune/lm-b/results.json

prints each run's table and the targets: the recommended forward-gradient configuration
against SPSA at equal forward passes and seconds (and its memory over SPSA's), the share of
backprop's improvement it reaches and the time it takes against backprop's, and for
bfloat16 runs (--dtype bfloat16) the share of the float32 run's improvement kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def at(curve, axis: int, budget: float) -> float:
    """The metric of the last evaluation made within ``budget`` on ``axis`` (0: passes, 1: seconds)."""
    return [point[2] for point in curve if point[axis] <= budget + 1e-9][-1]


def summary(results: dict) -> list[dict]:
    """Per method: mean final metric, metric at the smallest common budget of passes and of
    seconds, mean peak memory, ms per forward pass, time per step."""
    methods = results["methods"]
    runs = {m: list(v["seeds"].values()) for m, v in methods.items()}
    equal_passes = min(r["forward_passes"] for rs in runs.values() for r in rs)
    equal_seconds = min(r["seconds"] for rs in runs.values() for r in rs)
    rows = []
    for m, rs in runs.items():
        rows.append({
            "method": m, "config": methods[m]["config"],
            "start": statistics.mean(r["curve"][0][2] for r in rs),
            "final": statistics.mean(r["final"] for r in rs),
            "finals": [r["final"] for r in rs],
            "at_equal_passes": statistics.mean(at(r["curve"], 0, equal_passes) for r in rs),
            "at_equal_seconds": statistics.mean(at(r["curve"], 1, equal_seconds) for r in rs),
            "forward_passes": statistics.mean(r["forward_passes"] for r in rs),
            "seconds": statistics.mean(r["seconds"] for r in rs),
            "ms_per_step": statistics.median(1000 * r["seconds"] / max(r["steps"], 1) for r in rs),
            "peak_mb": statistics.mean(r["peak_mb"] for r in rs),
        })
    return rows, equal_passes, equal_seconds


def markdown(results: dict) -> str:
    rows, passes, seconds = summary(results)
    metric = results["metric"]
    lines = [f"{results['task']} ({metric}, {'higher' if results['higher_is_better'] else 'lower'} is better; "
             f"mean of seeds {', '.join(results['seeds'])}; start {rows[0]['start']:.3f})", "",
             f"| method | configuration | final (per seed) | at {passes:g} forward passes | at {seconds:.1f} s | "
             "forward passes | seconds | ms/step | peak MB above resting |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['config']} | {r['final']:.3f} ({', '.join(f'{v:.2f}' for v in r['finals'])}) | "
                     f"{r['at_equal_passes']:.3f} | {r['at_equal_seconds']:.3f} | {r['forward_passes']:.0f} | "
                     f"{r['seconds']:.1f} | {r['ms_per_step']:.1f} | {r['peak_mb']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for colour, (name, method) in enumerate(results["methods"].items()):
        for i, run in enumerate(method["seeds"].values()):
            passes, seconds, metric = zip(*run["curve"])
            axes[0].plot(passes, metric, color=f"C{colour % 10}", alpha=0.8, label=name if i == 0 else None)
            axes[1].plot(seconds, metric, color=f"C{colour % 10}", alpha=0.8)
    for ax, label in zip(axes, ("forward passes", "training seconds")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(results["metric"])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fine-tuning, {results['task']} ({results['params']}, {results['dtype']}): "
                 f"{results['metric']} per method, one line per seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)




# ---- targets -----------------------------------------------------------------------------------------


def better(results: dict, a: float, b: float) -> bool:
    return a > b if results["higher_is_better"] else a < b


def first_reaching(curve, threshold: float, higher: bool, axis: int = 1) -> float:
    """Seconds (axis 1) or passes (axis 0) at the first evaluation at or past ``threshold``."""
    for point in curve:
        if (point[2] >= threshold) if higher else (point[2] <= threshold):
            return point[axis]
    return float("inf")


def targets(results: dict, recommended: str = "recommended") -> list[str]:
    """The targets one results.json can answer, as Markdown lines: met or missed, with numbers."""
    methods, lines = results["methods"], []
    if recommended not in methods:
        return lines
    rec = list(methods[recommended]["seeds"].values())
    start = statistics.mean(r["curve"][0][2] for r in rec)
    for spsa_name in [m for m in methods if m.startswith("spsa")]:
        spsa = list(methods[spsa_name]["seeds"].values())
        passes = min(r["forward_passes"] for r in rec + spsa)
        seconds = min(r["seconds"] for r in rec + spsa)
        fg_p, sp_p = (statistics.mean(at(r["curve"], 0, passes) for r in rs) for rs in (rec, spsa))
        fg_s, sp_s = (statistics.mean(at(r["curve"], 1, seconds) for r in rs) for rs in (rec, spsa))
        memory = statistics.mean(r["peak_mb"] for r in rec) / max(statistics.mean(r["peak_mb"] for r in spsa), 1e-9)
        met = better(results, fg_p, sp_p) and better(results, fg_s, sp_s) and memory <= 2
        lines.append(f"- {recommended} against {spsa_name}: {fg_p:.3f} vs {sp_p:.3f} at {passes:g} forward passes, "
                     f"{fg_s:.3f} vs {sp_s:.3f} at {seconds:.1f} s, memory {memory:.2f}x: "
                     f"**{'met' if met else 'missed'}**")
    if "backprop" in methods:
        bp = list(methods["backprop"]["seeds"].values())
        bp_final = statistics.mean(r["final"] for r in bp)
        threshold = start + 0.9 * (bp_final - start)
        higher = results["higher_is_better"]
        t_bp = statistics.mean(first_reaching(r["curve"], threshold, higher) for r in bp)
        t_fg = statistics.mean(first_reaching(r["curve"], threshold, higher) for r in rec)
        share = (statistics.mean(r["final"] for r in rec) - start) / (bp_final - start)
        ratio = t_fg / t_bp if t_bp > 0 else float("inf")
        reached = f"in {t_fg:.1f} s, {ratio:.1f}x" if t_fg < float("inf") else "not within its budget"
        lines.append(f"- 90 % of backprop's improvement ({start:.3f} -> {threshold:.3f}; backprop ends at {bp_final:.3f}): "
                     f"backprop reaches it in {t_bp:.1f} s, {recommended} {reached} "
                     f"({share:.0%} of backprop's improvement at its last evaluation): "
                     f"**{'met' if ratio <= 30 else 'missed'}**")
        if results["task"] == "prompt-classification":
            gap = bp_final - statistics.mean(r["final"] for r in rec)
            lines.append(f"- final accuracy {bp_final - gap:.2f} against backprop's {bp_final:.2f} ({gap:.2f} points "
                         f"behind): **{'met' if gap <= 3 else 'missed'}** for 'within 3 points'")
    return lines


def kept_share(fp32: dict, bf16: dict, method: str) -> float:
    """bfloat16's improvement over float32's, for ``method`` (mean of seeds)."""
    gains = []
    for results in (fp32, bf16):
        runs = list(results["methods"][method]["seeds"].values())
        gains.append(statistics.mean(r["final"] - r["curve"][0][2] for r in runs))
    return gains[1] / gains[0]


def merged(parts: list[dict]) -> dict:
    """One results.json from runs of the same task, --params and --dtype that ran different
    methods side by side (in separate processes, at the same time): the methods of each, in
    order, and the commands of all."""
    keys = {(r["task"], r["params"], r["dtype"]) for r in parts}
    if len(keys) != 1:
        raise ValueError(f"can only merge runs of one task, --params and --dtype, got {sorted(keys)}")
    out = {**parts[0], "methods": {}, "command": " ; ".join(r["command"] for r in parts)}
    for r in parts:
        clash = set(r["methods"]) & set(out["methods"])
        if clash:
            raise ValueError(f"method(s) {sorted(clash)} in more than one of the runs")
        out["methods"].update(r["methods"])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", help="results.json files of recipes/finetune.py")
    parser.add_argument("--merge", metavar="OUT", help="write the runs' methods into one results.json OUT "
                        "(runs of one task that ran methods in separate processes), then report it")
    args = parser.parse_args(argv)
    loaded = [json.loads(Path(path).read_text()) for path in args.results]
    if args.merge:
        loaded = [merged(loaded)]
        Path(args.merge).write_text(json.dumps(loaded[0], indent=1))
        plot(loaded[0], Path(args.merge).with_suffix(".png"))
    from finetune import RECOMMENDED  # the name "recommended" stands for, where a run named it

    for results in loaded:
        print(markdown(results) + "\n")
        name = "recommended" if "recommended" in results["methods"] else RECOMMENDED.get((results["task"], results["params"]))
        print("\n".join(targets(results, name)) + "\n")
    for bf16 in (r for r in loaded if r["dtype"] == "bfloat16"):
        same = ("task", "params", "budget_forward_passes", "budget_seconds")  # a float32 run of the same budget
        for fp32 in (r for r in loaded if r["dtype"] == "float32" and all(r.get(k) == bf16.get(k) for k in same)):
            for method in bf16["methods"]:
                if method in fp32["methods"]:  # the recommended one by its name, and SPSA
                    share = kept_share(fp32, bf16, method)
                    print(f"- bfloat16 {bf16['task']} ({bf16['params']}), {method}: keeps {share:.0%} of its float32 "
                          f"improvement" + (f": **{'met' if share >= 0.95 else 'missed'}**" if not method.startswith("spsa") else ""))


if __name__ == "__main__":
    main()
