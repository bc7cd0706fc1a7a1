# The MNIST comparison of Baydin et al. 2022: forward gradient against backprop, same loop.
#
#   accelerate launch recipes/mnist.py --data-dir /path/to/data     # the default run: 1 epoch
#   accelerate launch --multi_gpu --num_processes 2 recipes/mnist.py --data-dir /path/to/data   # CPU (gloo) or GPUs
#   accelerate launch recipes/mnist.py --epochs 1 --lr-sweep fwdgrad:1e-4,3e-4,5e-4 \
#       --lr-sweep backprop:0.03,0.1,0.3   # each method at its own best lr
#
# The default run is the paper's setting for one epoch: MLP 784-1024-1024-10, global batch 64,
# SGD lr 2e-4 decayed as lr·exp(-1e-4·step), one Gaussian tangent, both methods from identical
# initial weights. It prints its plan, the one-off tangent-kernel build (kept out of every
# timing), a time estimate per run, a table per method and their ratio, and writes
# results.json and titled PNG plots to --output-dir. Without --data-dir and FWDGRAD_DATA_DIR,
# torchvision downloads MNIST into ./data (online only; offline it stops with the fix).
"""Forward gradient vs backprop on MNIST, through fwdgrad_plugins.integrations.accelerate_loop."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

import fwdgrad_plugins
import mnist_data as data  # recipes/mnist_data.py, beside this script
import paper_models as models  # recipes/paper_models.py
from fwdgrad_plugins import ForwardGradientEstimator
from fwdgrad_plugins.estimators import local_losses
from fwdgrad_plugins.tangents import counter_rng
from fwdgrad_plugins.integrations.accelerate_loop import TrainingOptions, train
from fwdgrad_plugins.integrations.accelerate_trackers import file_trackers

MODELS = {"mlp": models.paper_mlp, "cnn": models.paper_cnn}
# Estimators that train a model of their own shape: the wrapper builds it from the plain model
# (after the shared initial weights are loaded); backprop always trains the plain model.
MODEL_WRAPPERS = {
    "local-activity": lambda model: local_losses.with_local_losses(model, 10, torch.zeros(1, 1, 28, 28)),
}
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Without an accelerator, Accelerate needs cpu=True to form a multi-process (gloo) group.
ON_CPU = not (torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available())
METHODS = {"both": ("fwdgrad", "backprop"), "fwdgrad": ("fwdgrad",), "backprop": ("backprop",)}


def _number(kind, minimum):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value >= minimum:  # also rejects nan
            raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
        return value
    return parse


positive_int, positive_float = _number(int, 1), _number(float, 1e-300)


def learning_rates(text):
    """'1e-4,2e-4' -> (None, [1e-4, 2e-4]); 'fwdgrad:1e-4' -> ('fwdgrad', [1e-4])."""
    method, _, values = text.rpartition(":")
    if method and method not in METHODS["both"]:
        raise argparse.ArgumentTypeError(f"{method!r} is not a method; prefix with one of {METHODS['both']}")
    return method or None, [positive_float(part) for part in values.split(",") if part.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--method", choices=list(METHODS), default="both", help="which method(s) to train")
    add("--model", choices=list(MODELS), default="mlp", help="the paper's MLP or CNN")
    add("--epochs", type=positive_int, default=1, help="passes over the training set")
    add("--max-steps", type=positive_int, default=None, help="stop after this many updates")
    add("--batch-size", type=positive_int, default=64, help="global batch, split across processes")
    add("--lr", type=positive_float, default=2e-4, help="initial learning rate")
    add("--lr-decay", type=_number(float, 0.0), default=1e-4, help="lr·exp(-decay·step)")
    add("--lr-sweep", type=learning_rates, action="append", default=None, metavar="[METHOD:]LR,LR,...",
        help="learning rates to run each method at (or only METHOD, e.g. fwdgrad:1e-4,2e-4; "
             "repeatable), same budget each; reports each method's best")
    add("--optimizer", choices=list(OPTIMIZERS), default="sgd", help="inner torch optimizer")
    add("--num-directions", type=positive_int, default=1, help="tangents averaged per step (K)")
    add("--tangents", choices=fwdgrad_plugins.registered("tangent_samplers"), default="gaussian",
        help="tangent sampler")
    add("--estimator", choices=fwdgrad_plugins.registered("estimators"), default="weight",
        help="gradient estimator")
    add("--seed", type=int, default=0, help="seed of the initial weights, data order and tangents")
    add("--data-dir", default=None,
        help="folder with MNIST/raw (default: $FWDGRAD_DATA_DIR, else ./data, downloading there)")
    add("--train-limit", type=positive_int, default=None, help="use the first N training images")
    add("--test-limit", type=positive_int, default=None, help="use the first N test images")
    add("--eval-every", type=positive_int, default=200, help="steps between test evaluations")
    add("--checkpoint-every", type=positive_int, default=None,
        help="steps between checkpoints (the last step is always saved)")
    add("--output-dir", default="runs/mnist", help="results.json, plots, logs and checkpoints")
    add("--resume-from", default=None,
        help="an earlier --output-dir: each run continues from its newest checkpoint there")
    args = parser.parse_args(argv)
    if args.resume_from is not None and not Path(args.resume_from).is_dir():
        parser.error(f"--resume-from {args.resume_from}: no such folder; pass an earlier --output-dir.")
    args.grid = {m: [args.lr] for m in METHODS[args.method]}  # the learning rates of each method
    for method, rates in args.lr_sweep or []:
        if method is not None and method not in args.grid:
            parser.error(f"--lr-sweep {method}:... but --method {args.method} does not train {method}.")
        if not rates:
            parser.error("--lr-sweep needs at least one learning rate, e.g. --lr-sweep 1e-4,2e-4.")
        for m in [method] if method else args.grid:
            args.grid[m] = rates
    args.download = args.data_dir is None and not os.environ.get("FWDGRAD_DATA_DIR")
    args.data_dir = data.data_dir(args.data_dir)
    try:
        data.check_mnist(args.data_dir, download=args.download)
    except FileNotFoundError as error:  # one line, as every data error: the usage would not help here
        parser.exit(2, f"error: {error} Or omit both to let torchvision download it into ./data (online).\n")
    return args


def run_folder(args, method, lr) -> str:
    return method if args.lr_sweep is None else f"sweep/{method}-lr{lr:g}"


def newest_checkpoint(folder: Path):
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(checkpoints[-1]) if checkpoints else None


def run(args, method, lr, datasets, initial_weights) -> dict:
    """Train one method at one learning rate; returns its results (histories included)."""
    folder = run_folder(args, method, lr)
    logs = Path(args.output_dir) / folder
    accelerator = Accelerator(
        cpu=ON_CPU,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True,
                                                  data_seed=args.seed),
        log_with=file_trackers(logs), project_dir=str(logs),
    )
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(folder.replace("/", "-"), config={**config, "method": method, "lr": lr,
                                                                 "data_dir": str(args.data_dir)})
    model = MODELS[args.model]()
    model.load_state_dict(initial_weights)
    if method == "fwdgrad" and args.estimator in MODEL_WRAPPERS:
        torch.manual_seed(args.seed)  # the added modules start alike on every process
        model = MODEL_WRAPPERS[args.estimator](model)
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-args.lr_decay))
    estimator = None
    if method == "fwdgrad":
        estimator = ForwardGradientEstimator(estimator=args.estimator, tangents=args.tangents,
                                             num_directions=args.num_directions, seed=args.seed)
    built = 0.0
    if method == "fwdgrad":
        built = counter_rng.build_kernels()  # once per process, before the clock starts
        if built > 0.1 and accelerator.is_main_process:  # not again for a sweep's later runs
            print(f"built the tangent kernel in {built:.1f} s (once per process; not counted "
                  "in steps per second or in the loss-against-time plot)")
    train_set, test_set = datasets
    resume = newest_checkpoint(Path(args.resume_from) / folder / "checkpoints") if args.resume_from else None
    if args.resume_from and accelerator.is_main_process:
        print(f"{folder}: " + (f"resuming from {resume}" if resume else "no checkpoint, starting afresh"))
    result = train(
        accelerator, model, optimizer,
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True),
        DataLoader(test_set, batch_size=500 * accelerator.num_processes),
        torch.nn.functional.cross_entropy, method=method, estimator=estimator, scheduler=scheduler,
        options=TrainingOptions(epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every,
                                checkpoint_dir=str(logs / "checkpoints"),
                                checkpoint_every=args.checkpoint_every, resume_from=resume, run_name=folder),
    )
    for tracker in accelerator.trackers:  # end_training() would also end the process group
        tracker.finish()
    return {"lr": lr, "folder": folder, "device": describe_device(accelerator),
            "kernel_build_seconds": built, **vars(result)}


def describe_device(accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads/process"


def best_by(items, group, run=lambda item: item) -> dict:
    """Per ``group(item)``, the item whose ``run(item)`` has the highest final test accuracy
    among those that did not diverge (the first one if all diverged). The one rule for picking
    the best run, used by this recipe (per method) and ``mnist_estimators.py`` (per estimator).

    >>> runs = [{"method": "a", "diverged": False, "test_accuracy": 0.5},
    ...         {"method": "a", "diverged": True, "test_accuracy": float("nan")},
    ...         {"method": "a", "diverged": False, "test_accuracy": 0.7}]
    >>> best_by(runs, group=lambda r: r["method"])["a"]["test_accuracy"]
    0.7
    """
    best: dict = {}
    for item in items:
        key, candidate = group(item), run(item)
        current = None if key not in best else run(best[key])
        if current is None or (current["diverged"] and not candidate["diverged"]) or (
                not candidate["diverged"] and candidate["test_accuracy"] > current["test_accuracy"]):
            best[key] = item
    return best


def best_runs(runs) -> dict:
    """Per method, its best run (:func:`best_by`): the only run when there was no sweep."""
    return best_by(runs, group=lambda r: r["method"])


# ---- reporting: table, results.json, plots -------------------------------------------------

ROWS = [  # (label, key, format)
    ("learning rate", "lr", "{:g}"),
    ("steps", "steps", "{}"),
    ("final train loss (mean of last 50 steps)", "final_train_loss", "{:.4f}"),
    ("test accuracy (%)", "test_accuracy", "{:.2%}"),
    ("median time per step (ms)", "median_step_seconds", "{:.2f}"),
    ("steps per second", "steps_per_second", "{:.1f}"),
    ("peak memory of a step (MiB, CUDA only)", "peak_step_memory_bytes", "{:.2f}"),
    ("bytes all-reduced per step", "bytes_per_step", "{:,}"),
]


def cell(run, key, fmt) -> str:
    value = run[key]
    if run["diverged"] and key in ("final_train_loss", "test_accuracy"):
        return f"diverged (step {run['diverged_at'] or '?'})"
    if key == "test_accuracy":
        return fmt.format(value).rstrip("%")
    if key == "median_step_seconds":
        value *= 1000
    if key == "peak_step_memory_bytes":
        value = math.nan if value is None else value / 2**20
    return fmt.format(value)


def ratio(a, b, key, run_a, run_b) -> str:
    if key in ("lr", "steps") or (key in ("final_train_loss", "test_accuracy") and (run_a["diverged"] or run_b["diverged"])):
        return ""
    if not b or a is None or b is None:
        return "n/a"
    return f"{a / b:.2f}x"


def table(best) -> str:
    methods = [m for m in ("fwdgrad", "backprop") if m in best]
    header = ["", *methods] + (["fwdgrad / backprop"] if len(methods) == 2 else [])
    lines = [header]
    for label, key, fmt in ROWS:
        if key == "peak_step_memory_bytes" and all(best[m][key] is None for m in methods):
            continue  # measured on CUDA only
        line = [label, *(cell(best[m], key, fmt) for m in methods)]
        if len(methods) == 2:
            line.append(ratio(best["fwdgrad"][key], best["backprop"][key], key, best["fwdgrad"], best["backprop"]))
        lines.append(line)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    text = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def finite_or_none(value):
    """JSON has no NaN: a diverged or missing number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def write_results(args, runs, best, folder: Path) -> None:
    summary = []
    for r in runs:
        entry = {k: v for k, v in r.items() if k not in ("losses", "evaluations")}
        if r["diverged"]:
            entry.update(final_train_loss="diverged", test_accuracy="diverged")
        summary.append(entry)
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "best_lr": {m: r["lr"] for m, r in best.items()},
        "runs": summary,
        "histories": {r["folder"]: {"losses": r["losses"], "evaluations": r["evaluations"]} for r in runs},
    }
    (folder / "results.json").write_text(json.dumps(finite_or_none(results), indent=1, allow_nan=False))


def smooth(values, window=25):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs, best, folder: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {"fwdgrad": "C0", "backprop": "C1"}

    def label(r):
        return f"{r['method']} (lr {r['lr']:g})"

    def curves(filename, what, x_label, y_label, series, marker=None):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, xs, ys in series:
            ax.plot(xs, ys, label=label(run), color=colour[run["method"]], marker=marker)
        ax.set_title(f"{what}\n{title}", fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=90)
        plt.close(fig)

    shown = list(best.values())

    def before(r):
        """(updates, training seconds) before each logged loss: a step's loss is that of the
        weights it starts from, so the first is at step 0 and second 0 (losses logged every step)."""
        return [s - 1 for s, _, _ in r["losses"]], [0.0] + [t for _, _, t in r["losses"][:-1]]

    curves("loss_vs_step.png", "Train loss against updates", "updates", "train loss (moving average of 25)",
           [(r, before(r)[0], smooth([l for _, l, _ in r["losses"]])) for r in shown])
    curves("loss_vs_time.png", "Train loss against training time",
           "training seconds (kernel build and evaluation excluded)", "train loss (moving average of 25)",
           [(r, before(r)[1], smooth([l for _, l, _ in r["losses"]])) for r in shown])
    curves("accuracy_vs_step.png", "Test accuracy against updates", "updates", "test accuracy (%)",
           [(r, [s for s, _, _ in r["evaluations"]], [100 * a for _, a, _ in r["evaluations"]]) for r in shown],
           marker="o")
    if len({r["lr"] for r in runs}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in [m for m in colour if any(r["method"] == m for r in runs)]:
            mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["lr"])
            ok = [r for r in mine if not r["diverged"]]
            ax.plot([r["lr"] for r in ok], [100 * r["test_accuracy"] for r in ok], "o-", label=method,
                    color=colour[method])
            bad = [r["lr"] for r in mine if r["diverged"]]
            if bad:
                ax.plot(bad, [0.0] * len(bad), "x", color=colour[method], markersize=10,
                        label=f"{method}: diverged")
        ax.set_xscale("log")
        ax.set_title(f"Final test accuracy against learning rate\n{title}", fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "lr_sweep.png", dpi=90)
        plt.close(fig)


def plan(args, train_images: int) -> str:
    """The steps each run takes and the share of the data they cover.

    >>> plan(argparse.Namespace(epochs=1, max_steps=100, batch_size=64), 60000)
    '100 steps each (--max-steps 100: 0.11 of an epoch of 60000 images at batch 64)'
    >>> plan(argparse.Namespace(epochs=2, max_steps=None, batch_size=64), 60000)
    '1874 steps each (2 epochs of 60000 images at batch 64)'
    """
    per_epoch = train_images // args.batch_size
    steps = min(args.max_steps or math.inf, args.epochs * per_epoch)
    data = f"of {train_images} images at batch {args.batch_size}"
    if steps < args.epochs * per_epoch:
        epochs = steps / per_epoch
        share = f"{epochs:.2g} of an epoch" if epochs < 1 else f"{epochs:.3g} epochs"
        return f"{steps} steps each (--max-steps {args.max_steps}: {share} {data})"
    return f"{steps} steps each ({args.epochs} epoch{'s' if args.epochs > 1 else ''} {data})"


def main(argv=None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    state = PartialState(cpu=ON_CPU)
    if args.batch_size % state.num_processes:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the "
                         f"{state.num_processes} processes: pass a multiple of {state.num_processes}.")
    # The first process downloads when needed, the others then read the files.
    try:
        with state.main_process_first():
            datasets = (data.mnist(args.data_dir, train=True, limit=args.train_limit, download=args.download),
                        data.mnist(args.data_dir, train=False, limit=args.test_limit, download=args.download))
    except (ConnectionError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if state.is_main_process:
        runs = sum(len(rates) for rates in args.grid.values())
        print(f"{runs} run(s) ({', '.join(f'{m} at lr {r:g}' for m, rates in args.grid.items() for r in rates)}), "
              f"{plan(args, len(datasets[0]))}, testing on {len(datasets[1])} images every {args.eval_every} "
              "steps; each run says how long it has left after 20 steps.")
    torch.manual_seed(args.seed)
    initial_weights = {k: v.clone() for k, v in MODELS[args.model]().state_dict().items()}
    runs = [run(args, method, lr, datasets, initial_weights)
            for method, rates in args.grid.items() for lr in rates]
    state.destroy_process_group()
    if not state.is_main_process:
        return
    best = best_runs(runs)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.lr_sweep:
        for r in runs:
            status = (f"diverged at step {r['diverged_at']}" if r["diverged"]
                      else f"test accuracy {r['test_accuracy']:.2%}, final train loss {r['final_train_loss']:.4f}")
            print(f"sweep {r['method']:8s} lr {r['lr']:<8g} {status}")
    n = runs[0]["num_processes"]
    print(f"\n{args.model.upper()} on {runs[0]['device']}, {n} process(es), "
          f"global batch {args.batch_size}"
          + (": nothing is communicated on one process" if n == 1 else ""))
    print(table(best))
    write_results(args, runs, best, folder)
    epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    if args.max_steps:
        epochs += f", at most {args.max_steps} steps"
    plot(runs, best, folder, title=f"MNIST, paper {args.model.upper()}, {epochs}, seed {args.seed}, "
                                   f"batch {args.batch_size}, {args.optimizer.upper()}")
    print(f"wrote {folder / 'results.json'} and plots to {folder} "
          f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
