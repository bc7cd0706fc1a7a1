# Fine-tuning a pretrained model without backprop: backprop, backprop with activation
# checkpointing, SPSA (MeZO) and forward-gradient configurations, from the same pretrained
# weights, on the same batches, stopped at the same budget of forward passes or seconds.
#
#   python recipes/finetune.py --task mnist-transfer --methods recommended,backprop,spsa \
#       --seeds 0,1,2 --budget-forward-passes 2000 --output-dir runs/finetune/mnist
#   python recipes/finetune.py --task lm-domain --params lora --methods recommended,backprop,spsa
#   python recipes/finetune.py --task prompt-classification --methods recommended,backprop,spsa
#
# The first run pretrains each task's model with backprop and caches it in --cache-dir (the LM
# with save_pretrained, so stock HF scripts load it). Writes results.json, results.md and
# plots (metric against forward passes and against seconds) in --output-dir.
"""Fine-tune a pretrained model: forward gradients against backprop and SPSA (MeZO)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tasks module beside this file
from finetune_report import markdown, plot  # noqa: E402
from finetune_tasks import TASKS, MnistTransfer  # noqa: E402

from fwdgrad_plugins import ForwardGradient  # noqa: E402

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class Method:
    """One fine-tuning configuration. ``estimator`` None: backprop."""

    estimator: str | None = None
    num_directions: int = 1
    tangents: str = "gaussian"
    optimizer: str = "adamw"  # or "sgd" (MeZO's)
    lr: float = 1e-3
    params: str | None = None  # "full", "lora", "head"; None: --params
    checkpointing: bool = False
    options: dict = field(default_factory=dict, hash=False)
    micro_batches: int = 1  # >1: the batch's estimate is the sum of this many micro-batches' (each its own tangents)


# Learning rates: on mnist-transfer, spsa, fg-mb2 and the per-example ones are the best of a
# seed-0 sweep (docs/finetuning.md lists the sweeps; fg takes SPSA's); the same for full
# fine-tuning and LoRA unless TASK_LRS names a task's apart.
METHODS = {
    "backprop": Method(lr=1e-3),
    "backprop-ckpt": Method(lr=1e-3, checkpointing=True),
    "spsa": Method("spsa", optimizer="sgd", lr=5e-4, options={"epsilon": 1e-3}),  # MeZO
    "spsa-adam": Method("spsa", lr=1e-4, options={"epsilon": 1e-3}),
    "fg": Method("weight", optimizer="sgd", lr=5e-4),  # the paper's FG-W, plain SGD, at SPSA's lr
    "fg-adam": Method("weight", lr=1e-4),
    "fg-k16": Method("weight", num_directions=16, lr=1e-4),
    # K directions in one jvp (one primal pass), plain SGD; their lrs are the LM tasks' (TASK_LRS), not swept on the CNN
    "fg-sgd-k2": Method("weight", optimizer="sgd", num_directions=2, lr=1e-3),
    "fg-sgd-k4": Method("weight", optimizer="sgd", num_directions=4, lr=2e-3),
    "fg-k64": Method("weight", num_directions=64, lr=3e-4),
    "blockwise-k8": Method("blockwise-parameter", num_directions=8, lr=3e-4),
    "blockwise-adam": Method("blockwise-parameter", lr=1e-3),  # one direction per tensor, one pass each
    "per-example-span": Method("weight-per-example-span-blockwise", lr=3e-3, options={"blocks": "parameter"}),
    "per-example-span-1": Method("weight-per-example-span", lr=3e-3),  # one pass per step
    "activity": Method("activity", lr=3e-4),
    # FG-W with SGD over 2 (4) micro-batches, each its own direction: half (a quarter) of the activations
    "fg-mb2": Method("weight", optimizer="sgd", lr=7e-4, micro_batches=2),
    "fg-mb4": Method("weight", optimizer="sgd", lr=1e-3, micro_batches=4),
    "fg-adam-mb2": Method("weight", lr=1e-4, micro_batches=2),  # two directions, each on half the batch
    "per-example-span-mb4": Method("weight-per-example-span-blockwise", lr=3e-3, options={"blocks": "parameter"}, micro_batches=4),
    # one pass per step over 4 micro-batches of a quarter of the batch: a quarter of the activations
    "per-example-span-1-mb4": Method("weight-per-example-span", lr=1e-3, micro_batches=4),
    "backprop-head": Method(lr=1e-3, params="head"),
    "spsa-head": Method("spsa", optimizer="sgd", lr=1e-2, params="head", options={"epsilon": 1e-3}),
    "fg-head-k16": Method("weight", num_directions=16, lr=1e-3, params="head"),
}
RECOMMENDED = {  # (task, --params): the configuration docs/finetuning.md recommends
    ("mnist-transfer", "full"): "fg-mb2", ("mnist-transfer", "head"): "fg-head-k16",
    ("lm-domain", "full"): "fg-k16", ("lm-domain", "lora"): "fg-sgd-k2",
    ("prompt-classification", "full"): "fg-k16", ("prompt-classification", "lora"): "fg",
}
TASK_LRS = {  # (task, method): lr where a task's differs from METHODS' (LoRA adapters take larger steps)
    **{(task, "backprop" + suffix): 3e-3 for task in ("lm-domain", "prompt-classification") for suffix in ("", "-ckpt")},
    # lm-domain with LoRA, seed 0, 256 passes: SPSA of 1e-3 / 1e-2 / 3e-2, the others of 1e-3 / 3e-3 / 1e-2
    **{(task, "spsa"): 1e-2 for task in ("lm-domain", "prompt-classification")},
    **{(task, "spsa-adam"): 3e-3 for task in ("lm-domain", "prompt-classification")},
    **{(task, "fg-adam"): 3e-3 for task in ("lm-domain", "prompt-classification")},
    **{(task, "per-example-span-1-mb4"): 3e-3 for task in ("lm-domain", "prompt-classification")},
    **{(task, "blockwise-k8"): 3e-3 for task in ("lm-domain", "prompt-classification")},
    **{(task, "blockwise-adam"): 1e-2 for task in ("lm-domain", "prompt-classification")},
    **{(task, "fg-adam-mb2"): 3e-3 for task in ("lm-domain", "prompt-classification")},  # fg-adam's, not swept
    # lm-domain with LoRA, seed 0, 1000 passes: fg of 5e-3 / 1e-2 / 2e-2 (diverged), fg-sgd-k2 of 2e-2 / 3e-2 (diverged)
    **{(task, "fg"): 1e-2 for task in ("lm-domain", "prompt-classification")},
    **{(task, "fg-sgd-k2"): 2e-2 for task in ("lm-domain", "prompt-classification")},
    **{(task, "fg-sgd-k4"): 4e-2 for task in ("lm-domain", "prompt-classification")},
}


def method_config(name: str, task: str, params: str, lr_overrides: dict) -> Method:
    resolved = RECOMMENDED.get((task, params), "fg-k16") if name == "recommended" else name
    method = METHODS[resolved]
    lr = lr_overrides.get(name, TASK_LRS.get((task, resolved), method.lr))
    return replace(method, lr=lr, params=method.params or params)


# ---- model and parameters -------------------------------------------------------------------------


def trainable_model(task, pretrained: torch.nn.Module, method: Method, seed: int, dtype: torch.dtype):
    """A copy of the pretrained model with ``method.params`` trainable (LoRA through peft)."""
    import copy

    model = copy.deepcopy(pretrained).to(dtype)
    model.train()
    if method.params == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        targets = ["c_attn"] if not isinstance(task, MnistTransfer) else ["7", "9"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                 fan_in_fan_out=not isinstance(task, MnistTransfer)))
        model.to(dtype)
    elif method.params == "head":
        head = set(task.head(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name in head)
    if method.checkpointing:
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model = checkpointed(model)
    return model


def checkpointed(model: torch.nn.Sequential) -> torch.nn.Module:
    """A Sequential CNN with its two convolution stages recomputed in the backward pass."""
    from torch.utils.checkpoint import checkpoint_sequential

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint_sequential(self.inner, 3, x, use_reentrant=False)

    return Checkpointed(model)


# ---- memory: the peak resident set above resting (Linux), or CUDA's allocator ------------------


def _rss(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """The peak memory of the training steps above the resting memory before them; the
    evaluations in between are left out (``pause``/``resume`` around them)."""

    def __init__(self):
        self.linux = Path("/proc/self/clear_refs").exists()
        self.peak = 0

    def resume(self):
        if self.linux:
            self.resting = _rss("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current resident set

    def pause(self):
        if self.linux:
            self.peak = max(self.peak, _rss("VmHWM") - self.resting)


def keep_small_blocks_mapped() -> None:
    """glibc: map blocks above 64 KiB on their own, so freed memory leaves the resident set
    and the next method's resting memory is its own (as ``benchmarks/memory.py`` does)."""
    from fwdgrad_plugins import cpu_memory

    libc = cpu_memory._glibc()
    if libc is not None:
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD


# ---- one run ------------------------------------------------------------------------------------------


def make_step(task, pretrained, method: Method, seed: int, dtype: torch.dtype):
    """The model, and ``step(batch) -> (loss, forward passes)`` for ``method``."""
    model = trainable_model(task, pretrained, method, seed, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    inner = (torch.optim.SGD(params, lr=method.lr) if method.optimizer == "sgd"
             else torch.optim.AdamW(params, lr=method.lr, weight_decay=0.0))
    if method.estimator is None:
        def step(batch):
            inner.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            inner.step()
            return loss, 1  # its backward pass is not a forward pass
        return model, step
    optimizer = ForwardGradient(inner, estimator=method.estimator, num_directions=method.num_directions,
                                tangents=method.tangents, seed=seed, estimator_options=method.options)
    # A jvp that carries K tangents counts as K forward passes; SPSA's closure runs twice per
    # direction; a pass over one of m micro-batches counts as 1/m of a pass.
    per_call = method.num_directions if method.estimator != "spsa" else 1
    m = method.micro_batches

    def step(batch):
        calls = [0]

        def closure_of(part, scale):
            def closure():
                calls[0] += 1
                return task.loss(model, part) * scale
            return closure

        optimizer.zero_grad()
        if m == 1:
            loss = optimizer.step(closure_of(batch, 1.0))
            return loss, calls[0] * per_call
        # Gradient accumulation: each micro-batch's estimate (its own tangents) adds to .grad,
        # the loss of each scaled by 1/m so that the sum estimates the batch's mean loss.
        parts = zip(*(b.chunk(m) if b is not None else [None] * m for b in batch))
        estimates = [optimizer.estimator.backward(closure_of(part, 1.0 / m), params) for part in parts]
        if not any(e.skipped for e in estimates):
            inner.step()
        return sum(e.loss for e in estimates), calls[0] * per_call / m
    return model, step


def fine_tune(task, pretrained, name: str, method: Method, seed: int, args) -> dict:
    """Fine-tune a copy of ``pretrained`` with ``method`` until a budget is spent; the curve is
    evaluated every ``args.eval_every`` forward passes (evaluations not timed). One step on a
    throwaway copy first pays the one-off costs (the tangent kernel's build), untimed."""
    dtype = getattr(torch, args.dtype)
    batches = task.batches(seed)

    def cast(batch):
        return tuple(b.to(dtype) if b is not None and b.is_floating_point() else b for b in batch)

    make_step(task, pretrained, method, seed, dtype)[1](cast(next(task.batches(seed))))  # warm-up
    model, step_fn = make_step(task, pretrained, method, seed, dtype)
    passes, seconds, steps, diverged = 0, 0.0, 0, False
    curve = [[0, 0.0, task.evaluate(model)]]
    memory, next_eval = PeakMemory(), args.eval_every
    memory.resume()
    while passes < args.budget_forward_passes and seconds < args.budget_seconds:
        batch = cast(next(batches))
        started = time.perf_counter()
        loss, used = step_fn(batch)
        seconds += time.perf_counter() - started
        passes, steps = passes + used, steps + 1
        diverged = not math.isfinite(loss.item())
        if diverged or passes >= next_eval or passes >= args.budget_forward_passes or seconds >= args.budget_seconds:
            memory.pause()
            curve.append([passes, seconds, task.evaluate(model)])
            next_eval = passes + args.eval_every
            memory.resume()
        if diverged:
            log.warning("%s seed %d diverged at step %d (loss %s): lower its lr", name, seed, steps, loss.item())
            break
    memory.pause()
    return {"final": curve[-1][2], "forward_passes": passes, "seconds": seconds, "peak_mb": memory.peak / 2**20,
            "curve": curve, "steps": steps, "diverged": diverged}


def describe(method: Method) -> str:
    if method.estimator is None:
        return f"backprop{' + checkpointing' if method.checkpointing else ''}, {method.optimizer} lr {method.lr:g}, {method.params}"
    options = "".join(f", {k}={v}" for k, v in method.options.items())
    options += f", {method.micro_batches} micro-batches" if method.micro_batches > 1 else ""
    return (f"{method.estimator} K={method.num_directions} {method.tangents}{options}, "
            f"{method.optimizer} lr {method.lr:g}, {method.params}")



# ---- command line -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=list(TASKS), default="mnist-transfer")
    parser.add_argument("--methods", default="recommended,backprop,spsa",
                        help=f"comma-separated: recommended, {', '.join(METHODS)}")
    parser.add_argument("--params", choices=["full", "lora", "head"], default="full",
                        help="what the methods train unless their configuration says: every weight, "
                             "LoRA adapters (peft, r = 8), or the classification head / last block")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget-forward-passes", type=int, default=2000)
    parser.add_argument("--budget-seconds", type=float, default=float("inf"))
    parser.add_argument("--eval-every", type=int, default=100, help="forward passes between evaluations")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's lr")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="parameters and activations (the loss is taken in float32)")
    parser.add_argument("--pretrain-classes", default="0-4", help="mnist-transfer: e.g. 0-4 or 0,2,4,6,8")
    parser.add_argument("--finetune-classes", default="5-9")
    parser.add_argument("--data-dir", default=None, help="MNIST (default $FWDGRAD_DATA_DIR)")
    parser.add_argument("--cache-dir", default="runs/finetune/pretrained")
    parser.add_argument("--output-dir", default="runs/finetune")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-csv", metavar="DIR", help="prompt-classification: write its docstrings and labels "
                        "as DIR/train.csv and DIR/validation.csv (for HF's stock run_classification.py) and exit")
    parser.add_argument("--toy", action="store_true", help="tiny models and data (seconds): a smoke test")
    args = parser.parse_args(argv)
    args.lr_overrides = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        args.lr_overrides[name] = float(value)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m != "recommended" and m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from recommended, {', '.join(METHODS)}")
    args.method_names = names
    return args


def classes(text: str) -> tuple[int, ...]:
    if "-" in text:
        low, high = map(int, text.split("-"))
        return tuple(range(low, high + 1))
    return tuple(int(c) for c in text.split(","))


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    keep_small_blocks_mapped()
    task = TASKS[args.task]
    if isinstance(task, MnistTransfer):
        task = MnistTransfer(classes(args.pretrain_classes), classes(args.finetune_classes))
    task.toy = args.toy
    pretrained = task.prepare(Path(args.cache_dir), args.data_dir)
    if args.export_csv:
        if not hasattr(task, "export_csv"):
            raise SystemExit(f"--export-csv: {args.task} has no labelled text; use --task prompt-classification")
        task.export_csv(Path(args.export_csv))
        print(f"wrote {args.export_csv}/train.csv and validation.csv; the pretrained LM is {args.cache_dir}/lm")
        return {}
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"task": args.task, "metric": task.metric, "higher_is_better": task.higher_is_better,
               "params": args.params, "dtype": args.dtype, "seeds": [str(s) for s in seeds],
               "budget_forward_passes": args.budget_forward_passes, "budget_seconds": args.budget_seconds,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
               "command": "python recipes/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "methods": {}}
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.method_names:
        method = method_config(name, args.task, args.params, args.lr_overrides)
        entry = results["methods"].setdefault(name, {"config": describe(method), "seeds": {}})
        for seed in seeds:
            run = fine_tune(task, pretrained, name, method, seed, args)
            entry["seeds"][str(seed)] = run
            log.info("%s seed %d: %s %.3f -> %.3f in %d forward passes, %.1f s, peak %.1f MB", name, seed,
                     task.metric, run["curve"][0][2], run["final"], run["forward_passes"], run["seconds"], run["peak_mb"])
            (folder / "results.json").write_text(json.dumps(results, indent=1))  # after every run
    table = markdown(results)
    (folder / "results.md").write_text(table + "\n")
    plot(results, folder / f"{args.task}.png")
    print(table)
    print(f"wrote {folder / 'results.json'}, results.md and {args.task}.png")
    return results


if __name__ == "__main__":
    main()
