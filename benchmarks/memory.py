"""Peak memory of a training step, side by side: backprop, backprop with activation
checkpointing, ForwardGradient(SGD), ForwardSGD (no ``.grad``) and SPSA / MeZO.

Every (case, method) runs in a fresh Python process: the model is built from a config (no
download), one warm-up step runs (one-time costs such as the compiled tangent kernel count as
resting), the gradients are released, and then ``--steps`` steps run on a fixed stream of
batches. Reported per method:

- peak memory above resting: on the CPU the peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus the resident set before the timed steps, with glibc's mmap
  threshold fixed at 64 KiB so that freed blocks go back to the system
  (``MALLOC_MMAP_THRESHOLD_``); on CUDA ``max_memory_allocated`` minus ``memory_allocated``;
- the median step time, and its ratio to backprop's (all methods from one command, one after
  the other: on a shared machine the ratios drift with the load);
- the training loss at each step, and the loss on a held-out batch after the steps.

The batch stream is learnable: each sequence counts through the vocabulary with its own
start and stride, ``token[i] = (start + stride * i) mod vocab``.

    python benchmarks/memory.py --json docs/benchmarks/memory_cpu.json \\
        --markdown docs/benchmarks/memory_cpu.md --plot docs/benchmarks/memory_cpu.png
    python benchmarks/memory.py --quick --methods forward-sgd,spsa   # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from step import _rss_bytes  # (step.py's resident-memory reading, beside this file)

# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    family: str  # "gpt2" or "llama"
    layers: int
    width: int
    heads: int
    vocab: int
    batch: int
    length: int
    lora: bool = False
    activation: str = "gelu_new"  # GPT-2's MLP activation (GPT2Config's default)
    lr_backprop: float = 0.1
    lr_forward: float = 1e-6  # forward gradient and SPSA: their estimates' norm grows as √(parameters)

    def build(self) -> torch.nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        if self.family == "gpt2":
            config = GPT2Config(vocab_size=self.vocab, n_embd=self.width, n_layer=self.layers, n_head=self.heads,
                                n_positions=self.length, activation_function=self.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = GPT2LMHeadModel(config)
            targets = ["c_attn", "c_proj", "c_fc"]
        else:
            config = LlamaConfig(vocab_size=self.vocab, hidden_size=self.width, intermediate_size=8 * self.width // 3,
                                 num_hidden_layers=self.layers, num_attention_heads=self.heads,
                                 num_key_value_heads=self.heads, max_position_embeddings=self.length,
                                 tie_word_embeddings=False)
            model = LlamaForCausalLM(config)
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if self.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                     fan_in_fan_out=self.family == "gpt2"))
        return model


CASES = {
    "gpt2": Case("gpt2", layers=12, width=768, heads=12, vocab=8192, batch=2, length=256),
    "gpt2-lora": Case("gpt2", layers=12, width=768, heads=12, vocab=8192, batch=2, length=256, lora=True,
                      lr_backprop=1e-2, lr_forward=1e-4),
    "llama": Case("llama", layers=12, width=768, heads=12, vocab=8192, batch=2, length=256),
    # a 32 k vocabulary over 1 k tokens: the LM head's logits outweigh a layer's activations
    "llama-32k": Case("llama", layers=4, width=768, heads=12, vocab=32000, batch=1, length=1024),
    "quick": Case("gpt2", layers=2, width=64, heads=4, vocab=512, batch=2, length=32, lr_forward=1e-4),
}
# GPT-2 with HF's one-op form of its activation (the same function): gelu_new is eight
# elementwise ops, whose intermediates (and, in forward mode, their tangents) all coexist.
for _name in ("gpt2", "gpt2-lora"):
    CASES[f"{_name}-tanh"] = dataclasses.replace(CASES[_name], activation="gelu_pytorch_tanh")
FULL_CASES = ["gpt2", "gpt2-lora", "llama", "gpt2-tanh", "gpt2-lora-tanh"]


def batches(case: Case, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` (batch, length) token batches: sequences counting with a start and a stride."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(case.vocab, (case.batch, 1), generator=generator)
        stride = torch.randint(1, 8, (case.batch, 1), generator=generator)
        out.append((start + stride * torch.arange(case.length)) % case.vocab)
    return out


# --------------------------------------------------------------------------- methods


CLOSURES = {
    # what a user writes: the model's own loss, its KV cache and logits as the model makes them
    "plain": lambda model: lambda ids: model(input_ids=ids, labels=ids).loss,
    # the same loss without a KV cache (training needs none)
    "no-cache": lambda model: lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss,
    # the same value with the head's logits a block at a time (fwdgrad_plugins.engine.lm_loss)
    "blocked": lambda model: lambda ids: _blocked_loss(model, ids),
}


def _blocked_loss(model, ids):
    from fwdgrad_plugins.engine.lm_loss import blocked_causal_lm_loss

    return blocked_causal_lm_loss(model, ids)


def make_step(method: str, model: torch.nn.Module, case: Case, closure: str = "plain") -> Callable[[torch.Tensor], float]:
    """One training step on a batch of token ids, returning the loss; every method computes
    the loss as ``CLOSURES[closure]`` does."""
    from fwdgrad_plugins import ForwardGradient, ForwardSGD

    params = [p for p in model.parameters() if p.requires_grad]
    loss_of = CLOSURES[closure](model)

    if method in ("backprop", "backprop-checkpointing"):
        if method == "backprop-checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.SGD(params, lr=case.lr_backprop)

        def backprop(ids):
            loss = loss_of(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return backprop
    forward = {
        "fg-gaussian": ("wrap", dict(tangents="gaussian")),
        "fg-rank1": ("wrap", dict(tangents="rank1-gaussian")),
        "forward-sgd": ("sgd", dict(tangents="gaussian")),
        "forward-sgd-rank1": ("sgd", dict(tangents="rank1-gaussian")),
        "forward-sgd-k4": ("sgd", dict(tangents="gaussian", num_directions=4)),
        "spsa": ("sgd", dict(tangents="gaussian", estimator="spsa")),
    }
    kind, options = forward[method]
    if kind == "wrap":
        opt = ForwardGradient(torch.optim.SGD(params, lr=case.lr_forward), seed=0, **options)
    else:
        # tangents always streamed, the leanest setting (by default ForwardSGD draws fewer than
        # 32 MiB of trainable parameters' tangents whole: +4.5 MiB on the LoRA cases)
        streamed = {"estimator_options": {"streamed": True}} if options.get("estimator") != "spsa" else {}
        opt = ForwardSGD(params, lr=case.lr_forward, seed=0, **options, **streamed)

    def forward_step(ids):
        loss = opt.step(lambda: loss_of(ids))
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return forward_step


METHODS = ["backprop", "backprop-checkpointing", "fg-gaussian", "fg-rank1", "forward-sgd", "forward-sgd-rank1",
           "forward-sgd-k4", "spsa", "trainer-forward-sgd"]
# trainer-forward-sgd: FwdGradTrainer (--optim fwdgrad --fwdgrad_inner_optim forward_sgd), its own
# compute_loss (the model's loss from {"input_ids", "labels"}), whatever --closure says


# --------------------------------------------------------------------------- one method, in this process


def _release_and_start_peak(model, device) -> int:
    """Free what the warm-up left, reset the peak, and return the resting memory."""
    from fwdgrad_plugins import cpu_memory

    for p in model.parameters():
        p.grad = None
    gc.collect()
    cpu_memory.empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM, the peak resident set, to the current one
    return _rss_bytes("VmRSS")


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes("VmHWM")


class HeadSplit:
    """The peak before the LM head starts in a step, and from then to the step's end (the
    head, the loss, the update and, for backprop, the backward pass), on the CPU: when the
    model's body (the transformer to its last hidden states) first returns in a step, the
    peak resident set so far is read and reset. (A hook on the body rather than the head:
    ``blocked_causal_lm_loss`` applies the head's weight a block at a time, not the module.)"""

    def __init__(self, model: torch.nn.Module):
        self.active, self.seen = False, False
        self.before, self.start, self.after = [], [], []
        model.base_model.register_forward_hook(self._head)

    def _head(self, module, args, output):
        if self.active and not self.seen:
            self.seen = True
            self.before.append(_rss_bytes("VmHWM"))
            self.start.append(_rss_bytes("VmRSS"))
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")

    def step(self, run):
        self.active, self.seen = True, False
        try:
            return run()
        finally:
            self.active = False
            if self.seen:
                self.after.append(_rss_bytes("VmHWM"))

    def report(self, resting: int) -> dict:
        if not self.after:
            return {}
        return {"before_head_peak_above_resting_bytes": max(self.before) - resting,
                "head_peak_above_resting_bytes": max(self.after) - resting,
                "head_peak_above_its_start_bytes": max(a - s for a, s in zip(self.after, self.start))}


def _train_with_trainer(model, case: Case, stream, device) -> tuple[list[float], list[float], int, int]:
    """FwdGradTrainer with ForwardSGD on the batch stream, one step per batch; the first step
    is the warm-up. Returns (losses, timed step seconds, resting, peak)."""
    import tempfile

    from transformers import TrainerCallback

    from fwdgrad_plugins.integrations.transformers_trainer import FwdGradTrainer, FwdGradTrainingArguments

    rows = [{"input_ids": ids[i], "labels": ids[i]} for ids in stream for i in range(ids.shape[0])]
    measured: dict = {"times": []}

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                measured["resting"] = _release_and_start_peak(model, device)
            measured["started"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if state.global_step > 1:
                measured["times"].append(time.perf_counter() - measured["started"])

    with tempfile.TemporaryDirectory() as output_dir:
        args = FwdGradTrainingArguments(
            output_dir=output_dir, optim="fwdgrad", fwdgrad_inner_optim="forward_sgd", learning_rate=case.lr_forward,
            max_steps=len(stream), per_device_train_batch_size=case.batch, max_grad_norm=0.0, fwdgrad_seed=0,
            use_cpu=device.type == "cpu", report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
            dataloader_drop_last=True, seed=0)
        trainer = FwdGradTrainer(model=model, args=args, train_dataset=rows, callbacks=[Measure()])
        trainer.train()
    peak = _peak(device)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, measured["times"], measured["resting"], peak


def measure_here(case_name: str, method: str, steps: int, device: torch.device, closure: str = "plain") -> dict:
    case = CASES[case_name]
    torch.manual_seed(0)
    model = case.build().to(device)
    model.train()
    stream = [ids.to(device) for ids in batches(case, steps + 1)]
    held_out = batches(case, 1, seed=1)[0].to(device)
    split = {}
    if method == "trainer-forward-sgd":
        losses, times, resting, peak = _train_with_trainer(model, case, stream, device)
    else:
        step = make_step(method, model, case, closure)
        losses = [step(stream[0])]  # warm-up: one-time costs count as resting
        head = HeadSplit(model) if device.type == "cpu" else None
        resting = _release_and_start_peak(model, device)
        times = []
        for ids in stream[1:]:
            started = time.perf_counter()
            losses.append(head.step(lambda: step(ids)) if head else step(ids))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        peak = _peak(device)
        if head is not None and head.after:
            split = head.report(resting)
            peak = resting + max(split["before_head_peak_above_resting_bytes"], split["head_peak_above_resting_bytes"])
    with torch.no_grad():
        held_out_loss = model(input_ids=held_out, labels=held_out).loss.item()
    params = list(model.parameters())
    return {
        "case": case_name, "method": method, "steps": steps,
        "closure": "trainer's compute_loss" if method == "trainer-forward-sgd" else closure,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "resting_bytes": resting, "peak_above_resting_bytes": peak - resting,
        "step_seconds": times, "median_step_seconds": statistics.median(times),
        "losses": losses, "held_out_loss": held_out_loss, **split,
    }


def measure(case: str, method: str, steps: int, device: torch.device, threads: int, closure: str) -> dict:
    """``measure_here`` in a fresh process, so that no other method's memory counts."""
    command = [sys.executable, os.path.abspath(__file__), "--child", case, method, "--steps", str(steps),
               "--device", str(device), "--threads", str(threads), "--closure", closure]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"{case} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def add_ratios(results: list[dict]) -> None:
    """Each result's peak and time over its case's backprop and checkpointed backprop."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["method"]] = r
    for r in results:
        others = by_case[r["case"]]
        for name, key in (("backprop", "vs_backprop"), ("backprop-checkpointing", "vs_checkpointing"),
                          ("spsa", "vs_spsa")):
            if name in others:
                r[f"peak_{key}"] = r["peak_above_resting_bytes"] / max(others[name]["peak_above_resting_bytes"], 1)
                r[f"time_{key}"] = r["median_step_seconds"] / others[name]["median_step_seconds"]


TARGETS = [
    # (case, method, ratio key, bound, what); checked on the case and on its "-tanh" variant.
    # Step-time targets are benchmarks/lm_step.py's (interleaved in one process).
    ("gpt2", "forward-sgd", "peak_vs_checkpointing", 0.25, "ForwardSGD peak ≤ 0.25 × checkpointing"),
    ("gpt2", "fg-gaussian", "peak_vs_checkpointing", 0.8, "ForwardGradient(SGD) peak ≤ 0.8 × checkpointing"),
    ("gpt2-lora", "fg-gaussian", "peak_vs_checkpointing", 0.9, "LoRA: ForwardGradient(SGD) peak ≤ 0.9 × checkpointing"),
    ("gpt2-lora", "fg-gaussian", "peak_vs_spsa", 2.2, "LoRA: ForwardGradient(SGD) peak ≤ 2.2 × SPSA"),
]
PAIRS = [
    # (case, method, reference method, bound, what): a peak over another method's in the same case
    ("gpt2", "trainer-forward-sgd", "forward-sgd", 1.2, "HF trainer (forward_sgd) peak ≤ 1.2 × the plain loop's"),
    ("gpt2", "forward-sgd-k4", "forward-sgd", 1.5, "K = 4 peak ≤ 1.5 × K = 1 (ForwardSGD)"),
]


def targets(results: list[dict]) -> list[dict]:
    found = {(r["case"], r["method"]): r for r in results}
    rows = []
    for suffix in ("", "-tanh"):
        for case, method, key, bound, what in TARGETS:
            r = found.get((case + suffix, method))
            if r is not None and key in r:
                rows.append({"case": case + suffix, "target": what, "measured": r[key], "bound": bound,
                             "met": r[key] <= bound})
        for case, method, reference, bound, what in PAIRS:
            r, ref = found.get((case + suffix, method)), found.get((case + suffix, reference))
            if r and ref:
                ratio = r["peak_above_resting_bytes"] / max(ref["peak_above_resting_bytes"], 1)
                rows.append({"case": case + suffix, "target": what, "measured": ratio, "bound": bound,
                             "met": ratio <= bound})
    return rows


HEAD_SPLIT_CASES = {"llama-32k", "quick"}  # the cases whose table splits the peak at the LM head


def markdown(results: list[dict], target_rows: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:.0f}"
    ratio = lambda r, k: f"{r[k]:.2f}" if k in r else ""
    lines = ["| case | method | peak above resting (MB) | × backprop | × checkpointing | step (s) | time × backprop "
             "| loss after steps (held out) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['case']} | {r['method']} | {mb(r['peak_above_resting_bytes'])} | "
                     f"{ratio(r, 'peak_vs_backprop')} | {ratio(r, 'peak_vs_checkpointing')} | "
                     f"{r['median_step_seconds']:.2f} | {ratio(r, 'time_vs_backprop')} | {r['held_out_loss']:.4f} |")
    split = [r for r in results if r["case"] in HEAD_SPLIT_CASES and "head_peak_above_its_start_bytes" in r]
    if split:
        lines += ["", "| case | method | peak before the LM head (MB) | peak from the head on (MB) "
                  "| the head and loss's own (MB) | share of the step's peak |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['case']} | {r['method']} | {mb(r['before_head_peak_above_resting_bytes'])} | "
                  f"{mb(r['head_peak_above_resting_bytes'])} | {mb(r['head_peak_above_its_start_bytes'])} | "
                  f"{r['head_peak_above_its_start_bytes'] / max(r['peak_above_resting_bytes'], 1):.2f} |" for r in split]
    if target_rows:
        lines += ["", "| case | target | measured | met |", "| --- | --- | ---: | --- |"]
        lines += [f"| {t['case']} | {t['target']} | {t['measured']:.2f} | {'yes' if t['met'] else 'no'} |"
                  for t in target_rows]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = [r for r in results if r["case"] == case]
        ax.barh([r["method"] for r in rows], [r["peak_above_resting_bytes"] / 2**20 for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set_title(f"{case} ({rows[0]['parameters'] / 1e6:.0f} M parameters)")
        ax.set_xlabel("peak memory above resting (MB)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine(device: torch.device, threads: int) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------- command line


def _names(text: str, known: list[str], what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(FULL_CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="the small 'quick' case only (a smoke test)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--closure", choices=list(CLOSURES), default="plain",
                        help="every method's loss: 'plain' is model(input_ids=ids, labels=ids).loss, as a user "
                        "writes it; 'no-cache' adds use_cache=False; 'blocked' is "
                        "fwdgrad_plugins.engine.lm_loss.blocked_causal_lm_loss (head in blocks of 64 tokens)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="combine the results of earlier runs' --json files into one report (a later "
                        "file's results replace an earlier one's; with --cases/--methods: rerun those too)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(measure_here(*args.child, args.steps, device, args.closure)))
        return []
    cases = ["quick"] if args.quick else _names(args.cases, list(CASES), "case")
    methods = _names(args.methods, METHODS, "method")
    this = ["python", "benchmarks/memory.py", *(argv if argv is not None else sys.argv[1:])]
    results, commands = [], []
    if args.merge:
        cases = cases if "--cases" in this else []
        for path in args.merge:
            with open(path) as file:
                earlier = json.load(file)
            replaced = {(r["case"], r["method"]) for r in earlier["results"]}  # a later file replaces
            results = [r for r in results if (r["case"], r["method"]) not in replaced] + earlier["results"]
            commands += earlier["commands"]
    if cases:
        commands.append(this)  # the commands that measured the results
    for case in cases:
        for method in methods:
            results = [r for r in results if (r["case"], r["method"]) != (case, method)]  # a rerun replaces
            results.append(measure(case, method, args.steps, device, args.threads, args.closure))
            r = results[-1]
            print(f"{case:10} {method:24} {r['peak_above_resting_bytes'] / 2**20:8.0f} MB "
                  f"{r['median_step_seconds']:8.2f} s  loss {r['held_out_loss']:.4f}", flush=True)
    order = {name: i for i, name in enumerate([*CASES, *METHODS])}
    results.sort(key=lambda r: (order[r["case"]], order[r["method"]]))
    add_ratios(results)
    target_rows = targets(results)
    table = markdown(results, target_rows)
    print(table)
    info = machine(device, args.threads)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": info, "commands": commands, "results": results, "targets": target_rows},
                      file, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(table)
    if args.plot:
        plot(results, args.plot, f"Peak memory of a training step above resting, {device.type} "
                                 f"({info['torch_threads']} threads, {args.steps} steps)")
    return results


if __name__ == "__main__":
    main()
