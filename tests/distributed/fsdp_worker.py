"""One of N gloo processes for tests/distributed: trains each case twice from the same
weights, seed and batches, once sharded with FSDP2's ``fully_shard`` and once replicated
(each process the whole model, the K derivatives averaged over processes), and prints one
JSON line per case: whether every shard equals the replicated parameters, the largest
difference, and what else the case checks.

    python tests/distributed/fsdp_worker.py RANK WORLD_SIZE PORT [CASE ...]
"""

import contextlib
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fwdgrad_plugins import ForwardGradient, ForwardSGD


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))  # 5 and 3 rows: uneven shards


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)  # lm_head tied to the token embedding


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(config)


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))


def shard(model, mp_policy=None):
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    blocks = getattr(getattr(getattr(model, "base_model", model), "model", model), "transformer", None)
    layers = list(blocks.h) if blocks is not None else None
    if layers is None and hasattr(model, "model"):
        layers = list(model.model.layers)
    for module in layers or [m for m in model if isinstance(m, nn.Linear)]:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def batches(kind, rank, steps):
    generator = torch.Generator().manual_seed(100 + rank)  # each process its own data
    for _ in range(steps):
        if kind == "mlp":
            yield torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        else:
            yield torch.randint(0, 50, (2, 8), generator=generator), None


def loss_fn(kind, model, x, y):
    if kind == "mlp":
        return nn.functional.cross_entropy(model(x), y)
    return model(input_ids=x, labels=x).loss


def mean_over_processes(derivatives):
    total = derivatives.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


CASES = {  # name: (model, optimizer, options)
    "mlp-sgd": ("mlp", "sgd", {}),
    "mlp-forward-sgd": ("mlp", "forward-sgd", {}),
    "mlp-adam-k3": ("mlp", "adam", {"num_directions": 3}),
    "mlp-rank1-k2": ("mlp", "sgd", {"tangents": "rank1-gaussian", "num_directions": 2}),
    "mlp-spsa": ("mlp", "forward-sgd", {"estimator": "spsa", "num_directions": 2}),
    "mlp-forward-sgd-rank1": ("mlp", "forward-sgd", {"tangents": "rank1-gaussian", "num_directions": 2}),
    "gpt2-sgd": ("gpt2", "sgd", {}),
    "gpt2-forward-sgd": ("gpt2", "forward-sgd", {}),
    "gpt2-lora-adam": ("gpt2-lora", "adam", {}),
    "llama-sgd": ("llama", "sgd", {}),
    "gpt2-bf16": ("gpt2", "sgd", {"mp": True}),
}
STEPS = 3


def build(kind):
    torch.manual_seed(0)  # the same initial weights on every process and in both runs
    if kind == "mlp":
        return mlp()
    if kind == "gpt2-lora":
        return lora(gpt2())
    return gpt2() if kind == "gpt2" else llama()


def optimizer(name, model, options):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "forward-sgd":
        return ForwardSGD(params, lr=0.05, seed=7, **options)
    inner = torch.optim.SGD(params, lr=0.05) if name == "sgd" else torch.optim.Adam(params, lr=1e-2)
    return ForwardGradient(inner, seed=7, **options)


def train(case, sharded, rank, counter=None):
    kind, name, options = CASES[case]
    options = dict(options)
    mp = options.pop("mp", False)
    model = build(kind.replace("-lora", "-lora") if kind != "gpt2-lora" else kind)
    if sharded:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mp else None
        model = shard(model, policy)
    opt = optimizer(name, model, options)
    losses, grads_ok = [], True
    for x, y in batches("mlp" if kind == "mlp" else "lm", rank, STEPS):
        opt.zero_grad()
        closure = lambda: loss_fn("mlp" if kind == "mlp" else "lm", model, x, y)
        with counter() if counter is not None else contextlib.nullcontext():
            loss = opt.step(closure) if sharded else opt.step(closure, **({"reduce": mean_over_processes} if name == "forward-sgd" else {}))
        losses.append(float(loss))
        if sharded and name != "forward-sgd":
            grads_ok &= all(p.grad is None or (isinstance(p.grad, DTensor) and p.grad.placements == p.placements)
                            for p in model.parameters())
    return model, losses, grads_ok


def main(rank, world, port, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for case in cases:
        kind, name, options = CASES[case]
        if name != "forward-sgd":  # the replicated ForwardGradient averages through its estimator
            pass
        replicated, rep_losses, _ = train_replicated(case, rank)
        sharded, losses, grads_ok = train(case, True, rank)
        resharded = all(isinstance(getattr(m, n), DTensor) for m in sharded.modules()
                        for n, _ in m.named_parameters(recurse=False))
        diffs = [(s.full_tensor().float() - r.float()).abs().max().item()
                 for (_, s), (_, r) in zip(sharded.named_parameters(), replicated.named_parameters())]
        equal = all(torch.equal(s.full_tensor(), r) for s, r in zip(sharded.parameters(), replicated.parameters()))
        changed = any(not torch.equal(s.full_tensor(), b) for s, b in zip(sharded.parameters(), build(kind).parameters()))
        print(json.dumps({"case": case, "rank": rank, "equal": equal, "max_diff": max(diffs), "changed": changed,
                          "resharded": resharded, "grads_are_shards": grads_ok,
                          "losses": losses, "replicated_losses": rep_losses}), flush=True)
    dist.destroy_process_group()


def train_replicated(case, rank):
    """The reference: every process the whole model; the K derivatives averaged over processes."""
    kind, name, options = CASES[case]
    options = {k: v for k, v in options.items() if k != "mp"}
    model = build(kind)
    opt = optimizer(name, model, options)
    if name != "forward-sgd":
        opt.estimator.backward = _with_reduce(opt.estimator.backward)
    losses = []
    for x, y in batches("mlp" if kind == "mlp" else "lm", rank, STEPS):
        opt.zero_grad()
        closure = lambda: loss_fn("mlp" if kind == "mlp" else "lm", model, x, y)
        loss = opt.step(closure, reduce=mean_over_processes) if name == "forward-sgd" else opt.step(closure)
        losses.append(float(loss))
    return model, losses, True


def _with_reduce(backward):
    return lambda closure, params, reduce=None: backward(closure, params, reduce=mean_over_processes)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:] or list(CASES))
