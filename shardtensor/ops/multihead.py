"""F.multi_head_attention_forward: what nn.MultiheadAttention (and so nn.TransformerEncoderLayer,
nn.TransformerDecoderLayer, nn.Transformer) runs.

torch's implementation folds batch and heads into one dim (`view(L, bsz * heads, head_dim)`),
which no layout of sharded heads can follow. This rule computes the same function with batch and
heads kept apart, (batch, heads, seq, head_dim), from torch functions that have rules, so every
layout the parameters may have is handled by those rules. With Megatron's plan (`in_proj_weight`
and `in_proj_bias` "row" with stride 3, or `q/k/v_proj_weight` "row"; `out_proj.weight` "col")
q, k and v come out of the column-parallel projection sharded on whole heads, attention runs on
each rank's heads with no communication, and the row-parallel out_proj is reduced once.
The averaged attention weights (need_weights=True) are a mean over the heads: one all-reduce.

A projection whose shard cuts a head (heads not divisible by the tensor-parallel degree) raises
ShardingError; replicate in_proj (or choose a degree dividing the heads).

nn.TransformerEncoder in eval mode asks `torch._nested_tensor_from_mask_left_aligned` whether its
padding mask suits the nested-tensor fast path before it looks at the parameters (which then
decline it: the fast path runs no rules). The answer depends on the mask and the input's shape
only, and is given without moving the input.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import trace as _trace
from ..spec import shard_ranges
from ._util import REPLICA, ST, ShardingError, config, group_of, rule, spec_of, to_layout

_NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
          "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
          "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
          "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
          "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = dict(training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                 v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                 is_causal=False)


@rule(F.multi_head_attention_forward)
def multi_head_attention_forward(func, args, kwargs):
    a = dict(_DEFAULTS)
    a.update(zip(_NAMES, args))
    a.update(kwargs)
    return _mha(func, **a)


@lru_cache(maxsize=1024)
def _cut(n: int, spec, head_dim: int):
    """(rank, start, length) of the first shard of a dim of n features that cuts a head."""
    for r in range(spec.degree):
        for start, length in shard_ranges(n, spec.degree, spec.stride, r):
            if start % head_dim or length % head_dim:
                return r, start, length
    return None


def _check_heads(func, t, heads: int, head_dim: int, what: str, params):
    """t: a projection's output (..., heads * head_dim). Its shard must hold whole heads."""
    s = spec_of(t)
    if not s.is_shard or s.dim != len(t.shape) - 1:
        return
    cut = _cut(heads * head_dim, s, head_dim)
    if cut is not None:
        r, start, length = cut
        raise ShardingError(
            f"{_trace.func_name(func)}: the {what} projection is sharded as {s} over {heads} "
            f"heads of size {head_dim}, which cuts a head (rank {r} holds features [{start}, "
            f"{start + length})); parameter layouts "
            f"{tuple(spec_of(p) for p in params if p is not None)}. Shard q/k/v only when the "
            f"heads divide by the tensor-parallel degree ({s.degree}); otherwise replicate "
            f"in_proj_weight / in_proj_bias (or q/k/v_proj_weight)")


def _heads(t, seq: int, bsz: int, heads: int, head_dim: int):
    """(seq, bsz, heads * head_dim) -> (bsz, heads, seq, head_dim)."""
    return t.view(seq, bsz, heads, head_dim).permute(1, 2, 0, 3)


def _mha(func, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
         bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training,
         key_padding_mask, need_weights, attn_mask, use_separate_proj_weight, q_proj_weight,
         k_proj_weight, v_proj_weight, static_k, static_v, average_attn_weights, is_causal):
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    same_kv, same_qk = key is value, query is key
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if same_kv:
            value = key
            if same_qk:
                query = key
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]

    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None     # the hint alone: scaled_dot_product_attention(is_causal=True)
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, "
                             f"but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")

    # in-projection (torch's _in_projection_packed / _in_projection)
    if not use_separate_proj_weight:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        w, b = in_proj_weight, in_proj_bias
        if same_kv and same_qk:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        elif same_kv:
            w_q, w_kv = w.split([embed_dim, 2 * embed_dim])
            b_q, b_kv = b.split([embed_dim, 2 * embed_dim]) if b is not None else (None, None)
            q = F.linear(query, w_q, b_q)
            k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
        else:
            w_q, w_k, w_v = w.chunk(3)
            b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        params = (w, b)
    else:
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but q/k/v_proj_weight is None")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match "
                                 f"value's {value.shape[:2]}")
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None,) * 3
        q = F.linear(query, q_proj_weight, b_q)
        k = F.linear(key, k_proj_weight, b_k)
        v = F.linear(value, v_proj_weight, b_v)
        params = (q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias)
    for t, what in ((q, "query"), (k, "key"), (v, "value")):
        _check_heads(func, t, num_heads, head_dim, what, params + (out_proj_weight,))

    # masks as (1 or bsz, 1 or heads, tgt_len, src_len)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(bsz * num_heads, tgt_len, src_len)}.")
            attn_mask = attn_mask.view(bsz, num_heads, tgt_len, src_len)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if bias_k is not None and bias_v is not None:
        if static_k is not None or static_v is not None:
            raise AssertionError("bias cannot be added to static key / value.")
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    elif bias_k is not None or bias_v is not None:
        raise AssertionError("bias_k and bias_v must be both set or both None")

    q = _heads(q, tgt_len, bsz, num_heads, head_dim)
    k = _heads(k, k.shape[0], bsz, num_heads, head_dim) if static_k is None else \
        _static(static_k, "static_k", bsz, num_heads, head_dim)
    v = _heads(v, v.shape[0], bsz, num_heads, head_dim) if static_v is None else \
        _static(static_v, "static_v", bsz, num_heads, head_dim)

    if add_zero_attn:
        zeros = torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[2]

    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, src_len):
            raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but "
                                 f"got {key_padding_mask.shape}")
        kpm = key_padding_mask.view(bsz, 1, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    if not training:
        dropout_p = 0.0

    if need_weights and is_causal and attn_mask is None:
        raise AssertionError("FIXME: is_causal not implemented for need_weights")
    if need_weights or (dropout_p > 0.0 and config.dropout == "serial"):
        # the weights computed out here; also for serial dropout masks, which cannot be drawn
        # inside the fused kernel (ops/attention.py) but can here, as torch's math kernel does
        if is_causal and attn_mask is None:     # the hint alone: sdpa's top-left causal mask
            attn_mask = torch.zeros((tgt_len, src_len), dtype=q.dtype, device=q.device).masked_fill(
                torch.ones((tgt_len, src_len), dtype=torch.bool, device=q.device).triu(1),
                float("-inf"))
        scores = (q * math.sqrt(1.0 / float(head_dim))) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = attn_mask + scores
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights @ v
        if not need_weights:
            weights = None
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        weights = None
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    if not is_batched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights


def _static(t, name, bsz, heads, head_dim):
    """A static_k / static_v (bsz * heads, seq, head_dim) -> (bsz, heads, seq, head_dim)."""
    if t.shape[0] != bsz * heads or t.shape[2] != head_dim:
        raise AssertionError(f"expecting {name} of shape ({bsz * heads}, seq, {head_dim}), "
                             f"got {tuple(t.shape)}")
    return t.view(bsz, heads, t.shape[1], head_dim)


_LEFT_ALIGNED = getattr(torch, "_nested_tensor_from_mask_left_aligned", None)
if _LEFT_ALIGNED is not None:
    @rule(_LEFT_ALIGNED)
    def nested_tensor_from_mask_left_aligned(func, args, kwargs):
        v = dict(zip(("t", "mask"), args))
        v.update(kwargs)
        t, mask = v["t"], v["mask"]
        pg = group_of(func, t, mask)
        if type(t) is ST:    # only its shape matters: a stand-in that allocates nothing
            t = t._local.new_empty(()).expand(t._gshape)
        return func(t, to_layout(mask, REPLICA, pg, func))
