# Fine-tuning a GPT-2 sharded with FSDP2 across N processes, with forward gradients: no
# backward pass, no gradient traffic (the K directional derivatives are the only values
# all-reduced besides FSDP2's all-gathers of the parameters), each process holding 1/N of the
# parameters plus the layer in flight.
#
#   torchrun --nproc_per_node 2 recipes/sharded_finetune.py --steps 200            # CPU (gloo)
#   torchrun --nproc_per_node 8 recipes/sharded_finetune.py --optimizer adamw      # GPUs (NCCL)
#   torchrun --nproc_per_node 2 recipes/sharded_finetune.py --lora 8 --checkpoint ckpt
#   torchrun --nproc_per_node 2 recipes/sharded_finetune.py --lora 8 --checkpoint ckpt --resume
#
# The model is built from a GPT2Config (nothing is downloaded; pass --model-dir to start from
# a saved HuggingFace checkpoint instead); every block is fully_shard-ed, then the root
# (reshard_after_forward=True: it is not held gathered through the blocks). The
# task: each sequence counts through the vocabulary with its own start and stride (learnable:
# the next token follows from the two before it). --optimizer sgd (default) is ForwardSGD, which
# updates each shard in place with no .grad; adamw is ForwardGradient(AdamW), whose .grad and
# state are shards too. Each process reads its own batches; --checkpoint saves the model,
# optimizer and estimator through torch.distributed.checkpoint, and --resume continues from it
# bit-identically. The defaults show the sharded mechanics, not a tuned run: forward gradients
# learn slowly in full fine-tuning (the estimate's variance grows with the parameters); on 2 CPU
# processes 150 steps with --optimizer adamw take the mean loss from 5.587 to 5.553 (ln 256 = 5.545).
"""Sharded (FSDP2) fine-tuning of GPT-2 with forward gradients, launched by torchrun."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from fwdgrad_plugins import ForwardGradient, ForwardSGD
from fwdgrad_plugins.distributed.checkpoint import TrainingState


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every process
    if args.model_dir:
        model = GPT2LMHeadModel.from_pretrained(args.model_dir)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.length, n_embd=args.width,
                                           n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0))
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
                                                 target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    for block in model.get_submodule("transformer" if not args.lora else "base_model.model.transformer").h:
        fully_shard(block)
    # The root resharded after forward too (FSDP2 keeps it gathered by default, for the backward
    # pass that a forward-gradient step does not run): the embeddings are then gathered for their
    # lookup and again for the final norm and tied head, and not held while the blocks run.
    fully_shard(model, reshard_after_forward=True)
    return model


def build_optimizer(args, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return ForwardSGD(params, lr=args.lr, num_directions=args.directions, seed=args.seed)
    return ForwardGradient(torch.optim.AdamW(params, lr=args.lr), num_directions=args.directions, seed=args.seed)


def batch(args, step: int, rank: int) -> torch.Tensor:
    """(batch, length) token ids of this rank at this step: counting sequences."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    start = torch.randint(args.vocab, (args.batch, 1), generator=generator)
    stride = torch.randint(1, 8, (args.batch, 1), generator=generator)
    return (start + stride * torch.arange(args.length)) % args.vocab


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-4 (sgd), 1e-3 (adamw)")
    parser.add_argument("--directions", type=int, default=1, help="K, tangents per step")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank; 0: full fine-tuning")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="sequences per process")
    parser.add_argument("--model-dir", help="a saved HuggingFace GPT-2 to start from")
    parser.add_argument("--checkpoint", help="a folder: save there at the end (and resume from it with --resume)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.lr = args.lr or (1e-4 if args.optimizer == "sgd" else 1e-3)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    with device:
        model = build_model(args)
    opt = build_optimizer(args, model)
    state = {"train": TrainingState(model, opt)}
    first = 0
    if args.resume:
        dcp.load(state, checkpoint_id=args.checkpoint)
        first = (opt.forward_step if isinstance(opt, ForwardSGD) else opt.estimator.step)

    losses = []
    bar = tqdm(range(first, first + args.steps), desc="sharded fine-tuning", disable=rank != 0)
    for step in bar:
        ids = batch(args, step, rank).to(device)
        opt.zero_grad()
        loss = opt.step(lambda: model(input_ids=ids, labels=ids).loss)  # no backward
        total = loss.detach().reshape(1).clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if args.checkpoint:
        dcp.save(state, checkpoint_id=args.checkpoint)
    if rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps on {dist.get_world_size()} processes")
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
