"""A forward-mode rule for scaled-dot-product attention whose memory grows with seq × block.

torch's math kernel materialises the (batch, heads, L, S) score matrix, its softmax and the
tangents of both, so forward-mode memory grows with L·S. ``attention_jvp`` processes the keys
in blocks with the flash-attention recurrence (an online softmax), carrying the tangents:
with S_j = q k_jᵀ·scale the block's scores, dS_j = (q_t k_jᵀ + q k_tjᵀ)·scale their tangent,
m the running row maximum and e_j = exp(S_j − m), it accumulates

    l = Σ e_j,   O = Σ e_j V_j,   c = Σ (e_j ∘ dS_j) 1,   T = Σ (e_j ∘ dS_j) V_j + e_j V_tj,

rescaling all four by exp(m_old − m_new) when the maximum grows. With P = softmax(S),
dP = P ∘ (dS − (P ∘ dS) 1), so out = O / l and out_t = T / l − (c / l) · out. The running
maximum needs no tangent: softmax does not depend on it.

``F.scaled_dot_product_attention`` calls that carry a tangent and see more than
``BLOCK_SIZE`` keys take this rule (``forward_mode`` routes them here); with dropout, a mask
that has a tangent, or few keys they take the math kernel. On CUDA, with the optional
``jvp-flash-attention`` package installed, one direction (``forward_ad`` duals) uses its
Triton forward + jvp kernel instead (untested in this project's CI, which has no GPU).

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

BLOCK_SIZE = 256  # keys per block; attention over at most this many keys takes the math kernel


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, q_t: Optional[Tensor], k_t: Optional[Tensor],
                  v_t: Optional[Tensor], attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                  scale: Optional[float] = None, enable_gqa: bool = False,
                  block_size: int = BLOCK_SIZE) -> tuple[Tensor, Optional[Tensor]]:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` (no dropout) and its tangent along
    (q_t, k_t, v_t), any of which may be None; keys in blocks of ``block_size``.

    Shapes as torch's: q (..., H, L, E), k (..., H_kv, S, E), v (..., H_kv, S, E_v);
    ``attn_mask`` boolean (True: attend) or additive, broadcastable to (..., H, L, S).
    Rows whose keys are all masked give 0, as the math kernel does."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v, k_t, v_t = (None if t is None else t.repeat_interleave(groups, dim=-3) for t in (k, v, k_t, v_t))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    length, keys = q.shape[-2], k.shape[-2]
    if is_causal:  # top-left aligned, as torch's is_causal
        causal = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()
        attn_mask = causal if attn_mask is None else _combine_masks(attn_mask, causal, q.dtype)
    q_scaled = q * scale
    q_t_scaled = None if q_t is None else q_t * scale
    row = (*torch.broadcast_shapes(q.shape[:-1], k.shape[:-2] + (length,)), 1)
    maximum = q.new_full(row, -math.inf)
    total = q.new_zeros(row)  # l
    out = q.new_zeros(row[:-1] + (v.shape[-1],))  # O
    derivative_total = None  # c
    out_t = None  # T
    for start in range(0, keys, block_size):
        block = slice(start, start + block_size)
        k_j, v_j = k[..., block, :], v[..., block, :]
        scores = q_scaled @ k_j.transpose(-2, -1)  # (..., H, L, block)
        scores_t = _sum(None if q_t_scaled is None else q_t_scaled @ k_j.transpose(-2, -1),
                        None if k_t is None else q_scaled @ k_t[..., block, :].transpose(-2, -1))
        if attn_mask is not None:
            mask = attn_mask[..., block] if attn_mask.shape[-1] != 1 else attn_mask
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        new_maximum = torch.maximum(maximum, scores.amax(-1, keepdim=True))
        safe = new_maximum.masked_fill(new_maximum == -math.inf, 0)  # rows with every key masked
        rescale = torch.exp(maximum - safe)
        weights = torch.exp(scores - safe)  # e_j
        total = total * rescale + weights.sum(-1, keepdim=True)
        out = out * rescale + weights @ v_j
        maximum = new_maximum
        if scores_t is not None:
            weighted_t = weights * scores_t  # e_j ∘ dS_j
            term = weighted_t.sum(-1, keepdim=True)
            derivative_total = term if derivative_total is None else derivative_total * rescale + term
            block_t = weighted_t @ v_j
        else:
            block_t = None
        if v_t is not None:
            block_t = _sum(block_t, weights @ v_t[..., block, :])
        if block_t is not None:
            out_t = block_t if out_t is None else out_t * rescale + block_t
        elif out_t is not None:
            out_t = out_t * rescale
    total = total.masked_fill(total == 0, 1)
    out = out / total
    if out_t is None:
        return out, None
    out_t = out_t / total
    if derivative_total is not None:
        out_t = out_t - (derivative_total / total) * out
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
    ``single_direction``, else torch.func's jvp under vmap): the blocked rule when a tangent
    is present and there are more than ``BLOCK_SIZE`` keys, else torch's own (math) kernel."""
    (q, q_t), (k, k_t), (v, v_t) = (fwAD.unpack_dual(t) for t in (query, key, value))
    plain = (query, key, value, attn_mask, dropout_p, is_causal)
    options = {"scale": scale, "enable_gqa": enable_gqa}
    mask_has_tangent = attn_mask is not None and fwAD.unpack_dual(attn_mask).tangent is not None
    if (q_t is None and k_t is None and v_t is None) or dropout_p > 0 or mask_has_tangent:
        return F.scaled_dot_product_attention(*plain, **options)
    if k.shape[-2] <= BLOCK_SIZE:
        return F.scaled_dot_product_attention(*plain, **options)
    flash = _jvp_flash_attention()
    if flash is not None and single_direction and q.is_cuda and q.shape == k.shape == v.shape and not enable_gqa:
        mask = None if attn_mask is None else attn_mask.expand(*q.shape[:-1], k.shape[-2])
        return flash(query, key, value, attn_mask=mask, causal=is_causal, sm_scale=scale)
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the running sums in float32, as flash kernels keep them
        q, k, v, q_t, k_t, v_t = (None if t is None else t.float() for t in (q, k, v, q_t, k_t, v_t))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
    out, out_t = attention_jvp(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale, enable_gqa)
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
