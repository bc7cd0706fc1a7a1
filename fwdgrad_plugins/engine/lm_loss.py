"""A causal language model's loss with the head's logits computed a block at a time.

A HuggingFace causal LM computes the logits of every token at once, (batch × tokens ×
vocabulary) values, and its loss then makes the log-softmax, as large. In forward mode each
also has a tangent. In a forward-gradient closure the engine computes any such
cross-entropy a block of rows at a time (:mod:`fwdgrad_plugins.engine.cross_entropy`), but the
model's head still makes the whole logits and their tangent: 2 × 128 MB for 1024 tokens over a
vocabulary of 32 000. ``blocked_causal_lm_loss`` runs the model's body to its last hidden
states, then the head and the cross-entropy a block at a time, so only one block's logits
exist at a time. With a linear head (``nn.Linear``: GPT-2, Llama, tied or not) the blocks are
``block_vocab`` rows of the head's weight: each block's log-sum-exp is folded into a running
one (``logaddexp``) and the target's logit picked out of its block, and under a streamed
tangent (``ForwardSGD``, a large model) only that block's rows of the weight's tangent are
drawn (see :mod:`fwdgrad_plugins.tangents.streaming`), so the head never holds its whole
tangent either. Another head runs whole over ``block_tokens`` tokens at a time. The value is
the model's own mean next-token cross-entropy (labels shifted by one, ``-100`` ignored), to
float rounding.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
>>> ids = torch.randint(0, 50, (2, 16))
>>> loss = blocked_causal_lm_loss(model, ids, ids, block_vocab=8)
>>> torch.allclose(loss, model(input_ids=ids, labels=ids).loss)
True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _body_and_head(model: torch.nn.Module):
    """The transformer body (to the last hidden states) and the output layer of a HF causal
    LM, or of a peft model wrapping one."""
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        raise TypeError(
            f"{type(model).__name__} is not a HuggingFace causal language model with an output layer "
            "(get_output_embeddings() and a base_model): pass e.g. a GPT2LMHeadModel or LlamaForCausalLM."
        )
    return body, head


LOGITS_PER_BLOCK = 1 << 20  # logits in one block (4 MiB in float32), with as many in its tangent


def blocked_causal_lm_loss(model: torch.nn.Module, input_ids: Tensor, labels: Optional[Tensor] = None, *,
                           block_tokens: Optional[int] = None, block_vocab: Optional[int] = None,
                           num_items_in_batch=None, **model_kwargs) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on ``input_ids`` (labels default to the
    inputs), with the head's logits computed a block at a time.

    ``block_tokens``: tokens per block (default: 4096 with a linear head, whose weight's
    tangent rows are drawn once per token block; else as many as make ``LOGITS_PER_BLOCK``
    logits). ``block_vocab``: rows of a linear head's weight per block (default: as many as
    make ``LOGITS_PER_BLOCK`` logits with the token block). ``num_items_in_batch``: divide the
    summed loss by it instead of by this batch's counted tokens (as HF's causal-LM loss does
    under gradient accumulation). ``model_kwargs`` (``attention_mask``, ...) go to the model's
    body."""
    for name, value in (("block_tokens", block_tokens), ("block_vocab", block_vocab)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer (or None for the default), got {value!r}.")
    body, head = _body_and_head(model)
    labels = input_ids if labels is None else labels
    model_kwargs.setdefault("use_cache", False)  # a KV cache is a copy of every layer's keys and values
    hidden = body(input_ids=input_ids, **model_kwargs)[0]  # (B, T, C)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T-1), C): token t predicts t + 1
    targets = labels[:, 1:].reshape(-1).to(hidden.device)  # (B·(T-1),)
    count = (targets != IGNORE_INDEX).sum()
    linear = type(head) is torch.nn.Linear
    if block_tokens is None:
        block_tokens = 4096 if linear else max(1, LOGITS_PER_BLOCK // head.weight.shape[0])
    total = None
    for start in range(0, targets.shape[0], block_tokens):
        rows, labels_of_rows = hidden[start : start + block_tokens], targets[start : start + block_tokens]
        if linear:
            vocab = block_vocab or max(128, LOGITS_PER_BLOCK // rows.shape[0])
            part = _cross_entropy_sum_by_vocabulary(rows, head.weight, head.bias, labels_of_rows, vocab)
        else:
            part = F.cross_entropy(head(rows).float(), labels_of_rows, ignore_index=IGNORE_INDEX, reduction="sum")
        total = part if total is None else total + part
    if num_items_in_batch is not None:
        return total / (num_items_in_batch.to(total.device) if isinstance(num_items_in_batch, Tensor)
                        else num_items_in_batch)
    return total / count.clamp(min=1)


def _cross_entropy_sum_by_vocabulary(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                     block_vocab: int) -> Tensor:
    """Σ over counted rows of logsumexp(z) − z[target], z = hidden Wᵀ + b, with z made
    ``block_vocab`` columns at a time (``weight.narrow``: the engine draws those rows of a
    streamed tangent alone)."""
    counted = targets != IGNORE_INDEX
    log_sum_exp, target_logit = None, None
    vocabulary = weight.shape[0]
    for start in range(0, vocabulary, block_vocab):
        size = min(block_vocab, vocabulary - start)
        logits = F.linear(hidden, weight.narrow(0, start, size),
                          None if bias is None else bias.narrow(0, start, size)).float()  # (N, size)
        block = torch.logsumexp(logits, dim=-1)
        log_sum_exp = block if log_sum_exp is None else torch.logaddexp(log_sum_exp, block)
        inside = counted & (targets >= start) & (targets < start + size)
        picked = logits.gather(1, (targets - start).clamp(0, size - 1).unsqueeze(1)).squeeze(1)
        picked = torch.where(inside, picked, 0.0)
        target_logit = picked if target_logit is None else target_logit + picked
    return torch.where(counted, log_sum_exp - target_logit, 0.0).sum()
