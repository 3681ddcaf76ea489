"""torch._grouped_mm (F.grouped_mm): the mixture-of-experts kernel HuggingFace runs by default
(`experts_implementation="grouped_mm"`: Mixtral, Qwen2/3-MoE, OLMoE, ...).

The forward form `out = a @ b[g]` for the rows of group g, `a` (tokens, K) 2-D with rows grouped
by `offs`, `b` (experts, K, N) 3-D, is split Megatron-style per expert, as a linear layer is:
- b sharded on N (its last dim, every expert's output features: gate|up with stride 2), a
  replicated: column parallel, the output sharded on its last dim like b, no forward
  communication (Megatron's f on a: its gradient all-reduced once in backward);
- a and b sharded alike on K: row parallel, the output a pending partial sum (reduced once
  after the routing weights, where the MoE output meets the residual stream);
- a partial and b replicated: partial output (the product is linear in a).
The token rows and the experts cannot be split (the offsets index them globally): other layouts
are refused with a ShardingError naming them (expert parallelism is not a layout of this op).
"""
from __future__ import annotations

import torch

from .. import trace as _trace
from ._util import (PARTIAL, REPLICA, ST, ShardingError, copy_once, group_of, rule, shard_spec,
                    spec_of, unwrap, wrap)


def _gshape(x) -> torch.Size:
    return x._gshape if type(x) is ST else x.shape


_GROUPED_MM = getattr(torch, "_grouped_mm", None)   # torch >= 2.8; older torch has no such call


def grouped_mm(func, args, kwargs):
    a = args[0] if args else kwargs["mat_a"] if "mat_a" in kwargs else kwargs["self"]
    b = args[1] if len(args) > 1 else kwargs.get("mat_b", kwargs.get("mat2"))
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
    pg = group_of(func, a, b, offs, bias)
    sa, sb = spec_of(a), spec_of(b)
    ga, gb = _gshape(a), _gshape(b)
    d = pg.tp_world_size()

    def local(x, y, bias=None):
        return torch._grouped_mm(x, y, offs=unwrap(offs), bias=bias, out_dtype=out_dtype)

    if sa.is_replicate and sb.is_replicate and spec_of(bias).is_replicate:
        out = local(unwrap(a), unwrap(b), unwrap(bias))       # every rank computes it whole
        return wrap(out, REPLICA, pg, out.shape)
    refuse = bias is not None or spec_of(offs) != REPLICA or len(ga) != 2 or len(gb) != 3
    if not refuse:
        oshape = torch.Size((ga[0], gb[2]))
        if sb.is_shard and sb.dim % 3 == 2 and sa.is_replicate:          # column parallel
            al = unwrap(a)
            if al.requires_grad:
                al = copy_once(a, al, pg, func)
            return wrap(local(al, unwrap(b)), shard_spec(1, d, sb.stride), pg, oshape)
        if (sa.is_shard and sb.is_shard and sa.dim % 2 == 1 and sb.dim % 3 == 1
                and sa.stride == sb.stride):                         # row parallel
            return wrap(local(unwrap(a), unwrap(b)), PARTIAL, pg, oshape)
        if sa.is_partial and sb.is_replicate:
            return wrap(local(unwrap(a), unwrap(b)), PARTIAL, pg, oshape)
    raise ShardingError(
        f"{_trace.func_name(func)}: no sharding rule for a {tuple(ga)} laid out {sa} and b "
        f"{tuple(gb)} laid out {sb}{' with a bias' if bias is not None else ''}; supported: "
        f"2-D a grouped by offs times 3-D b (experts, K, N), b split over N with a replicated "
        f"(column parallel) or a and b split alike over K (row parallel); the experts and the "
        f"token rows cannot be split")


if _GROUPED_MM is not None:
    rule(_GROUPED_MM)(grouped_mm)
