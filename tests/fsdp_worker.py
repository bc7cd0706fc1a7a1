"""One of N gloo processes for tests/distributed/test_fsdp.py. Trains each case twice from the
same weights, seed and batches: sharded with FSDP2's ``fully_shard``, and replicated (every
process the whole model, the K derivatives averaged over processes, as the Accelerate loop
does). Prints one JSON line per case and rank: whether every shard equals the replicated
parameters, the largest difference, the collectives the sharded steps called, and what else
the test checks.

    python tests/fsdp_worker.py RANK WORLD_SIZE PORT CASE [CASE ...]

A case ``resume:<case>`` instead trains the case 2 + 2 steps through a checkpoint
(``torch.distributed.checkpoint`` into the folder FWDGRAD_CHECKPOINT_DIR) and 4 steps
without, and reports whether the two end bit-identical.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fwdgrad_plugins import ForwardGradient, ForwardSGD
from fwdgrad_plugins.distributed.traffic import CollectiveTraffic

STEPS = 3
CASES = {  # name: (model, optimizer, options)
    "mlp-sgd": ("mlp", "sgd", {}),
    "mlp-forward-sgd": ("mlp", "forward-sgd", {}),
    "mlp-adam-k3": ("mlp", "adam", {"num_directions": 3}),
    "mlp-rank1-k2": ("mlp", "sgd", {"tangents": "rank1-gaussian", "num_directions": 2}),
    "mlp-forward-sgd-rank1-k2": ("mlp", "forward-sgd", {"tangents": "rank1-gaussian", "num_directions": 2}),
    "mlp-spsa": ("mlp", "forward-sgd", {"estimator": "spsa", "num_directions": 2}),
    "gpt2-sgd": ("gpt2", "sgd", {}),
    "gpt2-forward-sgd": ("gpt2", "forward-sgd", {}),
    "gpt2-lora-adam": ("gpt2-lora", "adam", {}),
    "llama-sgd": ("llama", "sgd", {}),
    "gpt2-bf16": ("gpt2", "sgd", {"param_dtype": torch.bfloat16}),
}


def build(kind):
    torch.manual_seed(0)  # the same initial weights on every process and in both runs
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))  # 5 and 3 rows: uneven shards
    if kind.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))  # lm_head tied to wte; no dropout: the
        # checkpoint holds no RNG state
        if kind == "gpt2-lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=0))


def shard(model, param_dtype=None):
    """Each block (each Linear of the MLP), then the root, as FSDP2's examples do."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype) if param_dtype else MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ in ("GPT2Block", "LlamaDecoderLayer")]
    for module in blocks or [m for m in model if isinstance(m, nn.Linear)]:
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def batches(kind, rank):
    generator = torch.Generator().manual_seed(100 + rank)  # each process its own data
    for _ in range(STEPS):
        if kind == "mlp":
            yield torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        else:
            yield torch.randint(0, 50, (2, 8), generator=generator), None


def closure_for(kind, model, x, y):
    if kind == "mlp":
        return lambda: nn.functional.cross_entropy(model(x), y)
    return lambda: model(input_ids=x, labels=x).loss


def mean_over_processes(derivatives):
    total = derivatives.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def optimizer(name, model, options):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "forward-sgd":
        return ForwardSGD(params, lr=0.05, seed=7, **options)
    inner = torch.optim.SGD(params, lr=0.05) if name == "sgd" else torch.optim.Adam(params, lr=1e-2)
    return ForwardGradient(inner, seed=7, **options)


def train(case, rank, sharded):
    """The case's model after STEPS steps, its losses, and (sharded) what the steps checked."""
    kind, name, options = CASES[case]
    options = dict(options)
    param_dtype = options.pop("param_dtype", None)
    model = build(kind)
    if sharded:
        model = shard(model, param_dtype)
    opt = optimizer(name, model, options)
    if not sharded:  # replicated: average the K derivatives explicitly, as the Accelerate loop does
        estimator = opt if name == "forward-sgd" else opt.estimator
        step = estimator.step if name == "forward-sgd" else estimator.backward
        if name == "forward-sgd":
            estimator.step = lambda closure: step(closure, reduce=mean_over_processes)
        else:
            estimator.backward = lambda closure, params, **kw: step(closure, params, reduce=mean_over_processes, **kw)
    losses, grads_are_shards, traffic = [], True, CollectiveTraffic()
    for x, y in batches(kind, rank):
        opt.zero_grad()
        with traffic:
            losses.append(float(opt.step(closure_for(kind, model, x, y))))
        if sharded and name != "forward-sgd":
            grads_are_shards &= all(
                isinstance(p.grad, DTensor) and p.grad.placements == p.placements
                and p.grad.to_local().shape == p.to_local().shape for p in opt.param_groups[0]["params"])
    return model, losses, {"grads_are_shards": grads_are_shards, "calls": dict(traffic.calls),
                           "sent": dict(traffic.sent)}


def resumed_run(case, rank, checkpoint, stop_after=None):
    """The case trained sharded for 2 × STEPS steps; with ``stop_after``, saved after that many
    steps and returned; with ``checkpoint`` alone, loaded from it and trained to the end."""
    import torch.distributed.checkpoint as dcp

    from fwdgrad_plugins.distributed.checkpoint import TrainingState

    kind, name, options = CASES[case]
    model = shard(build(kind))
    opt = optimizer(name, model, options)
    data = list(batches(kind, rank)) * 2
    start = 0
    if checkpoint is not None and stop_after is None:
        dcp.load({"train": TrainingState(model, opt)}, checkpoint_id=checkpoint)
        start = STEPS
    for step in range(start, len(data)):
        opt.zero_grad()
        opt.step(closure_for(kind, model, *data[step]))
        if stop_after == step + 1:
            dcp.save({"train": TrainingState(model, opt)}, checkpoint_id=checkpoint)
            break
    return model


def resume(case, rank):
    checkpoint = os.path.join(os.environ["FWDGRAD_CHECKPOINT_DIR"], case)
    uninterrupted = resumed_run(case, rank, None)
    resumed_run(case, rank, checkpoint, stop_after=STEPS)
    resumed = resumed_run(case, rank, checkpoint)
    equal = all(torch.equal(a.full_tensor(), b.full_tensor())
                for a, b in zip(uninterrupted.parameters(), resumed.parameters()))
    print(json.dumps({"case": f"resume:{case}", "rank": rank, "equal": equal}), flush=True)


def main(rank, world, port, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for case in cases:
        if case.startswith("resume:"):
            resume(case.removeprefix("resume:"), rank)
            continue
        kind, name, options = CASES[case]
        replicated, replicated_losses, _ = train(case, rank, sharded=False)
        sharded, losses, checks = train(case, rank, sharded=True)
        initial = build(kind)
        pairs = [(s.full_tensor(), r, i) for s, r, i in
                 zip(sharded.parameters(), replicated.parameters(), initial.parameters())]
        # the update's error relative to the update, for the bf16 case
        moved = max((r - i).abs().max().item() for _, r, i in pairs)
        print(json.dumps({
            "case": case, "rank": rank,
            "equal": all(torch.equal(s, r) for s, r, _ in pairs),
            "max_diff": max((s.float() - r).abs().max().item() for s, r, _ in pairs),
            "moved": moved,
            "changed": [not torch.equal(s, i) for s, _, i in pairs],
            "resharded": all(isinstance(p, DTensor) for m in sharded.modules()
                             for p in m.parameters(recurse=False)),
            "losses": losses, "replicated_losses": replicated_losses,
            "num_directions": options.get("num_directions", 1), "steps": STEPS, **checks,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from processes import exit_without_teardown

    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    exit_without_teardown()
