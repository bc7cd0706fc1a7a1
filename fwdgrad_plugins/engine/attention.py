"""A forward-mode rule for scaled-dot-product attention whose memory grows with seq × block.

torch's math kernel materialises the (batch, heads, L, S) score matrix, its softmax and the
tangents of both, and computes the softmax's tangent in several passes over them.
``attention_jvp`` takes the queries a block of rows at a time; for each block, with
S = q kᵀ·scale its scores, P = softmax(S) and dS = (q_t kᵀ + q k_tᵀ)·scale their tangent,

    out = P V,   out_t = (P ∘ dS) V + P V_t − c · out,   c = (P ∘ dS) 1,

since dP = P ∘ (dS − c). Each block holds its rows' scores, softmax and P ∘ dS; with
``is_causal`` a block sees only the keys up to its last query, so the blocks above the
diagonal are never computed. One softmax kernel, one product and one sum over the scores,
and four matrix products (dS in one, over the stacked [q_t q] and [k k_t]).

``F.scaled_dot_product_attention`` calls that carry a tangent take this rule (``forward_mode``
routes them here), with dropout too (D(X) = X ∘ M / (1 − p) applied to P and P ∘ dS, c taken
before it); with a mask that has a tangent they take the math kernel. On
CUDA, with the optional ``jvp-flash-attention`` package installed, one direction
(``forward_ad`` duals) uses its Triton forward + jvp kernel instead (untested in this
project's CI, which has no GPU).

>>> import torch
>>> q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
>>> q_t, k_t, v_t = (torch.randn_like(q) for _ in range(3))
>>> out, out_t = attention_jvp(q, k, v, q_t, k_t, v_t, is_causal=True, block_size=2)
>>> causal = torch.ones(5, 5, dtype=torch.bool).tril()
>>> math_kernel = lambda q, k, v: (q @ k.mT / 2).masked_fill(~causal, -torch.inf).softmax(-1) @ v
>>> expected = torch.func.jvp(math_kernel, (q, k, v), (q_t, k_t, v_t))
>>> all(torch.allclose(a, b) for a, b in zip((out, out_t), expected))
True
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

BLOCK_SIZE = 64  # queries per block


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, q_t: Optional[Tensor], k_t: Optional[Tensor],
                  v_t: Optional[Tensor], attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                  scale: Optional[float] = None, enable_gqa: bool = False,
                  block_size: int = BLOCK_SIZE, dropout_p: float = 0.0) -> tuple[Tensor, Optional[Tensor]]:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` and its tangent along (q_t, k_t,
    v_t), any of which may be None; queries in blocks of ``block_size``.

    Shapes as torch's: q (..., H, L, E), k (..., H_kv, S, E), v (..., H_kv, S, E_v);
    ``attn_mask`` boolean (True: attend) or additive, broadcastable to (..., H, L, S).
    Rows whose keys are all masked give 0, as the math kernel does. With ``dropout_p`` each
    block draws its mask from torch's generator as torch's dropout does (on a CPU and with
    one block, the math kernel's mask)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v, k_t, v_t = (None if t is None else t.repeat_interleave(groups, dim=-3) for t in (k, v, k_t, v_t))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    length, keys = q.shape[-2], k.shape[-2]
    if attn_mask is not None and attn_mask.dim() < 2:
        attn_mask = attn_mask.expand(length, keys)
    blocks = [_block(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale, dropout_p, start, min(start + block_size, length))
              for start in range(0, length, block_size)]
    out = blocks[0][0] if len(blocks) == 1 else torch.cat([b[0] for b in blocks], -2)
    if blocks[0][1] is None:
        return out, None
    return out, blocks[0][1] if len(blocks) == 1 else torch.cat([b[1] for b in blocks], -2)


def _block(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale, dropout_p, start, stop):
    """The rule for queries [start, stop): their output and its tangent (or None)."""
    keys = min(k.shape[-2], stop) if is_causal else k.shape[-2]  # top-left aligned, as torch's is_causal
    rows, seen = slice(start, stop), slice(0, keys)
    q, q_t = q[..., rows, :], None if q_t is None else q_t[..., rows, :]
    k, v = k[..., seen, :], v[..., seen, :]
    k_t, v_t = (None if t is None else t[..., seen, :] for t in (k_t, v_t))
    mask = None if attn_mask is None else attn_mask[..., rows if attn_mask.shape[-2] != 1 else slice(None), seen]
    if is_causal and start < keys:  # the keys after a query's own position
        causal = torch.ones(stop - start, keys, dtype=torch.bool, device=q.device).tril(start)
        mask = causal if mask is None else _combine_masks(mask, causal, q.dtype)
    q_scaled = q * scale
    scores = q_scaled @ k.mT
    if mask is not None:
        scores = scores.masked_fill_(~mask, -math.inf) if mask.dtype == torch.bool else scores.add_(mask)
    weights = torch.softmax(scores, -1)  # P
    del scores
    if mask is not None:  # a row with every key masked gives 0, not softmax's NaN
        empty = ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1, keepdim=True)
        if empty.any():
            weights = weights.masked_fill(empty, 0.0)
    if q_t is not None and k_t is not None:  # dS = [q_t q] [k k_t]ᵀ · scale
        scores_t = torch.cat([q_t * scale, q_scaled], -1) @ torch.cat([k, k_t], -1).mT
    elif q_t is not None:
        scores_t = (q_t * scale) @ k.mT
    elif k_t is not None:
        scores_t = q_scaled @ k_t.mT
    else:
        scores_t = None
    weighted_t = None if scores_t is None else scores_t.mul_(weights)  # P ∘ dS
    derivative_total = None if weighted_t is None else weighted_t.sum(-1, keepdim=True)  # c, before dropout
    if dropout_p > 0:  # D(X) = X ∘ M / (1 − p) on P and P ∘ dS: one mask, drawn as torch's dropout draws it
        keep = torch.empty_like(weights).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
        weights = weights.mul_(keep)
        weighted_t = None if weighted_t is None else weighted_t.mul_(keep)
    out = weights @ v
    out_t = None if v_t is None else weights @ v_t
    if weighted_t is not None:
        out_t = _sum(out_t, weighted_t @ v)
        out_t = out_t - derivative_total * out
    return out, out_t


def _sum(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _combine_masks(mask: Tensor, causal: Tensor, dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return mask & causal
    return mask + torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~causal, -math.inf)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, single_direction=False):
    """``F.scaled_dot_product_attention`` on dual tensors (``forward_ad`` duals when
    ``single_direction``, else torch.func's jvp under vmap): the rule above when a tangent is
    present, else torch's own (math) kernel."""
    (q, q_t), (k, k_t), (v, v_t) = (fwAD.unpack_dual(t) for t in (query, key, value))
    plain = (query, key, value, attn_mask, dropout_p, is_causal)
    options = {"scale": scale, "enable_gqa": enable_gqa}
    mask_has_tangent = attn_mask is not None and fwAD.unpack_dual(attn_mask).tangent is not None
    if (q_t is None and k_t is None and v_t is None) or mask_has_tangent:
        return F.scaled_dot_product_attention(*plain, **options)
    flash = _jvp_flash_attention()
    if flash is not None and single_direction and dropout_p == 0 and q.is_cuda and q.shape == k.shape == v.shape and not enable_gqa:
        mask = None if attn_mask is None else attn_mask.expand(*q.shape[:-1], k.shape[-2])
        return flash(query, key, value, attn_mask=mask, causal=is_causal, sm_scale=scale)
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # scores and softmax in float32, as flash kernels keep them
        q, k, v, q_t, k_t, v_t = (None if t is None else t.float() for t in (q, k, v, q_t, k_t, v_t))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
    out, out_t = attention_jvp(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale, enable_gqa, BLOCK_SIZE, dropout_p)
    out, out_t = out.to(dtype), None if out_t is None else out_t.to(dtype)
    return out if out_t is None else fwAD.make_dual(out, out_t)


@functools.cache
def _jvp_flash_attention():
    """``jvp_flash_attention``'s dual-tensor Triton kernel (CUDA), or None when it is not
    installed. Untested here: this project's CI has no GPU."""
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn
    except ImportError:
        return None
    return JVPAttn.fwd_dual
