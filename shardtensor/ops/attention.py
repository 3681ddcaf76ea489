"""F.scaled_dot_product_attention.

Attention is independent per (batch, head): q, k, v sharded on the heads dim (dim -3, Megatron's
column-parallel q/k/v projections viewed as heads) or on a batch dim run locally, the output
sharded the same way, with no communication. A plain attn_mask is sliced on its heads (or batch)
dim where it spans it, and broadcast otherwise. With enable_gqa (fewer kv heads) it is local
when every rank's query heads use exactly its own kv heads; a rank whose query heads straddle
kv heads (fewer kv heads than ranks, say) gathers k and v and keeps the kv heads it uses. Any
other layout (a sharded sequence or head_dim, a partial value) is gathered first: exact, and
visible in CommTrace.

Dropout: with sharded heads each rank draws its heads' mask from its own generator (the same
per-rank stream the dropout rule uses, see ops/dropout.py); replicated attention draws from the
default generator, identically on every rank. Masks therefore do not equal the serial model's
(`config.dropout = "serial"` cannot be honoured inside the fused kernel).
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..collectives import copy_to_region
from ..spec import shard_ranges
from ._util import (REPLICA, ST, ShardSpec, config, group_of, rule, shard_spec, spec_of,
                    to_layout, wrap)

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@lru_cache(maxsize=1024)
def _kv_spec(hq: int, hkv: int, spec: ShardSpec):
    """The layout of the kv heads that serves `spec` on hq query heads, or None."""
    g = hq // hkv
    s = spec.stride
    if hq % hkv or hkv % s:
        return None
    kv = shard_spec(spec.dim, spec.degree, s)
    ok = all(tuple((a * g, l * g) for a, l in shard_ranges(hkv, spec.degree, s, r))
             == shard_ranges(hq, spec.degree, s, r) for r in range(spec.degree))
    return kv if ok else None


def _mask_local(mask, spec, nd, pg, func):
    """The attn_mask for this rank's heads/batches: sliced where it spans the sharded dim."""
    if mask is None or not spec.is_shard:
        return to_layout(mask, REPLICA, pg, func) if type(mask) is ST else mask
    shape = mask._gshape if type(mask) is ST else mask.shape
    md = spec.dim - (nd - len(shape))
    if md < 0 or shape[md] == 1:
        return to_layout(mask, REPLICA, pg, func) if type(mask) is ST else mask
    return to_layout(mask, shard_spec(md, spec.degree, spec.stride), pg, func)


_FAST_KW = frozenset(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))


def _same_layout(func, args, kwargs):
    """The common case, local with no planning: q, k, v ShardedTensors of one layout sharded
    on the heads (or a batch) dim whose kv heads serve this rank's query heads, a plain (or no)
    mask, no dropout. None otherwise (the general rule decides)."""
    q, k, val = args
    if type(k) is not ST or type(val) is not ST:
        return None
    s = q._spec
    if not s.is_shard or (k._spec is not s and k._spec != s) or \
            (val._spec is not s and val._spec != s):
        return None
    pg = q._pg
    if k._pg is not pg or val._pg is not pg or not kwargs.keys() <= _FAST_KW or \
            kwargs.get("dropout_p"):
        return None
    qg, kg = q._gshape, k._gshape
    nd = len(qg)
    if nd < 3 or s.dim > nd - 3 or len(kg) != nd:
        return None
    if s.dim == nd - 3 and qg[-3] != kg[-3] and _kv_spec(qg[-3], kg[-3], s) != s:
        return None
    mask = kwargs.get("attn_mask")
    if mask is not None:
        if type(mask) is ST:
            return None
        kwargs = dict(kwargs)
        kwargs["attn_mask"] = _mask_local(mask, s, nd, pg, func)
    out = F.scaled_dot_product_attention(q._local, k._local, val._local, **kwargs)
    return wrap(out, s, pg, qg[:-1] + val._gshape[-1:])


@rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(func, args, kwargs):
    if len(args) == 3 and type(args[0]) is ST:
        out = _same_layout(func, args, kwargs)
        if out is not None:
            return out
    v = dict(zip(_NAMES, args))
    v.update(kwargs)
    q, k, val = v["query"], v["key"], v["value"]
    mask = v.get("attn_mask")
    pg = group_of(func, q, k, val, mask)
    qg = q._gshape if type(q) is ST else q.shape
    kg = k._gshape if type(k) is ST else k.shape
    nd = len(qg)
    hq, hkv = (qg[-3], kg[-3]) if nd >= 3 else (1, 1)
    spec = _target(q, k, val, nd, hq == hkv)
    ql = to_layout(q, spec, pg, func)
    kv_spec = spec
    if spec.is_shard and spec.dim == nd - 3 and hq != hkv:
        kv_spec = _kv_spec(hq, hkv, spec)
    if kv_spec is not None:
        kl, vl = to_layout(k, kv_spec, pg, func), to_layout(val, kv_spec, pg, func)
    else:   # this rank's query heads straddle kv heads: gather k, v and pick the heads it uses
        heads = torch.cat([torch.arange(a, a + l) for a, l in
                           shard_ranges(hq, spec.degree, spec.stride, pg.tp_local_rank())])
        pick = (heads // (hq // hkv)).to(ql.device)
        # every rank's heads feed the gathered k, v: their gradients are summed (copy_to_region)
        kl, vl = (copy_to_region(to_layout(t, REPLICA, pg, func), pg, func).index_select(nd - 3, pick)
                  for t in (k, val))
    rest = {n: v[n] for n in _NAMES[4:] if n in v}
    if kv_spec is None and "enable_gqa" in rest:   # k, v now carry q's heads one to one
        rest["enable_gqa"] = False                   # (torch < 2.5 has no such argument)
    rest["attn_mask"] = _mask_local(mask, spec, nd, pg, func)
    if rest.get("dropout_p", 0.0) and spec.is_shard and pg.tp_world_size() > 1:
        if config.dropout == "serial" and not _WARNED_SERIAL:
            _WARNED_SERIAL.append(True)
            warnings.warn("shardtensor: config.dropout = 'serial' cannot give scaled_dot_product"
                          "_attention's dropout_p the serial masks (they are drawn inside the "
                          "fused kernel); each rank draws its heads' masks from its own stream. "
                          "Use attn_implementation='eager' for serial-equal attention dropout",
                          stacklevel=3)
        out = _with_rank_rng(ql.device, pg,
                             lambda: F.scaled_dot_product_attention(ql, kl, vl, **rest))
    else:
        out = F.scaled_dot_product_attention(ql, kl, vl, **rest)
    oshape = tuple(qg[:-1]) + ((val._gshape if type(val) is ST else val.shape)[-1],)
    return wrap(out, spec, pg, oshape)


_WARNED_SERIAL: list = []


def _target(q, k, val, nd, same_heads: bool):
    """The layout attention runs in: q's shard on a batch or the heads dim; else k's or v's
    where it applies to q too (a batch dim, or heads when q has as many); else replicated."""
    sq = spec_of(q)
    if sq.is_shard and sq.dim <= nd - 3:
        return sq
    for t in (k, val):
        s = spec_of(t)
        if s.is_shard and (s.dim < nd - 3 or (s.dim == nd - 3 and same_heads)):
            return s
    return REPLICA


def _with_rank_rng(device, pg, fn):
    """Run `fn` drawing from this rank's dropout stream, leaving the default generator as it was."""
    from .dropout import rank_generator   # the one per-rank stream (lazy: rule modules are peers)
    gen = rank_generator(device, pg)
    default = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" \
        else torch.default_generator
    saved = default.get_state()
    default.set_state(gen.get_state())
    try:
        return fn()
    finally:
        gen.set_state(default.get_state())
        default.set_state(saved)
