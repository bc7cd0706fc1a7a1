"""A causal language model's loss with the vocabulary logits computed in blocks of tokens.

A HuggingFace causal LM computes the logits of every token at once, (batch × tokens ×
vocabulary) values, and its loss then makes the log-softmax, as large. In forward mode each
also has a tangent. In a forward-gradient closure the engine computes any such
cross-entropy a block of rows at a time (:mod:`fwdgrad_plugins.engine.cross_entropy`), but the
model's head still makes the whole logits and their tangent: 2 × 128 MB for 1024 tokens over a
vocabulary of 32 000. ``blocked_causal_lm_loss`` runs the model's body to its last hidden
states, then the head and the cross-entropy on ``block_tokens`` tokens at a time, summing
the loss (and, in forward mode, its tangent) block by block: only one block's logits exist
at a time. The value is the model's own mean next-token cross-entropy (labels shifted by
one, ``-100`` ignored), to float rounding.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
>>> ids = torch.randint(0, 50, (2, 16))
>>> loss = blocked_causal_lm_loss(model, ids, ids, block_tokens=8)
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


def blocked_causal_lm_loss(model: torch.nn.Module, input_ids: Tensor, labels: Optional[Tensor] = None, *,
                           block_tokens: int = 64, **model_kwargs) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on ``input_ids`` (labels default to the
    inputs), with the head's logits computed ``block_tokens`` tokens at a time.

    ``model_kwargs`` (``attention_mask``, ...) go to the model's body."""
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"block_tokens must be a positive integer, got {block_tokens!r}.")
    body, head = _body_and_head(model)
    labels = input_ids if labels is None else labels
    model_kwargs.setdefault("use_cache", False)  # a KV cache is a copy of every layer's keys and values
    hidden = body(input_ids=input_ids, **model_kwargs)[0]  # (B, T, C)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T-1), C): token t predicts t + 1
    targets = labels[:, 1:].reshape(-1).to(hidden.device)  # (B·(T-1),)
    count = (targets != IGNORE_INDEX).sum()
    total = None
    for start in range(0, targets.shape[0], block_tokens):
        logits = head(hidden[start : start + block_tokens]).float()  # (block, vocabulary)
        part = F.cross_entropy(logits, targets[start : start + block_tokens], ignore_index=IGNORE_INDEX,
                               reduction="sum")
        total = part if total is None else total + part
    return total / count.clamp(min=1)
