"""Writing at indices, and padding: `scatter_`, `index_add_`, `index_fill_` (and their
out-of-place forms) with a replicated index, `F.pad`. What generate's logits processors do to
vocab-sharded scores (min-p keeps its top tokens with `scatter_`, sequence bias adds with
`index_add_`, the repetition penalty pads the vocabulary by one).

Along the sharded dim each rank applies the entries that fall in its shard: the index is
mapped to local positions and the others to one scratch slot past the shard, which is dropped
afterwards (no communication). Along another dim the index (and the source) are taken on this
rank's part of the sharded dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import trace as _trace
from ..collectives import copy_to_region
from ..dispatch import UnsupportedOpError
from ._util import (REPLICA, ST, check_index, group_of, local_index, materialize, rule, to_layout,
                    wrap)

T = torch.Tensor

# the in-place ops; their out-of-place forms map to them
_SCATTER = (T.scatter_, T.scatter_add_, T.index_add_, T.index_fill_)
_OUT_OF_PLACE = {torch.scatter_add: T.scatter_add_, T.scatter_add: T.scatter_add_,
                 torch.index_add: T.index_add_, T.index_add: T.index_add_,
                 torch.index_fill: T.index_fill_, T.index_fill: T.index_fill_}
# out-of-place scatter: its rule (ops/inference.py) hands sharded destinations here
_SCATTER_COPY = {torch.scatter: T.scatter_, T.scatter: T.scatter_}
_NAMES = {T.scatter_: ("dim", "index", "src"), T.scatter_add_: ("dim", "index", "src"),
          T.index_add_: ("dim", "index", "source"), T.index_fill_: ("dim", "index", "value")}


@rule(*_SCATTER, *_OUT_OF_PLACE)
def scatter_inplace(func, args, kwargs):
    """x.scatter_(dim, index, src|value), x.scatter_add_, x.index_add_(dim, index, source,
    alpha=), x.index_fill_(dim, index, value) and their out-of-place forms, x sharded or
    replicated, the index replicated."""
    op = _OUT_OF_PLACE.get(func) or _SCATTER_COPY.get(func, func)
    names = _NAMES[op]
    b = dict(zip(names, args[1:]))
    rest = {k: v for k, v in kwargs.items() if k not in names}
    b.update({k: v for k, v in kwargs.items() if k in names})
    if op is T.scatter_ and "src" not in b and "value" in kwargs:
        b["src"] = rest.pop("value")
    x, dim, idx, src = args[0], b["dim"], b["index"], b[names[2]]
    pg = group_of(func, x, idx, src)
    if type(idx) is ST and idx._spec.is_shard:
        raise UnsupportedOpError(f"{_trace.func_name(func)} with a sharded index ({idx._spec!r}) "
                                 f"is not supported; the index must be replicated")
    il = to_layout(idx, REPLICA, pg, func) if type(idx) is ST else idx
    # the whole source where a rank needs all of it (a sharded one is gathered)
    whole = (lambda: to_layout(src, REPLICA, pg, func)) if type(src) is ST else (lambda: src)
    if type(x) is not ST:   # a plain destination: replicated values, computed locally
        out = x if op is func else x.clone()
        return op(out, dim, il, whole(), **rest)
    if op is not func:
        x = wrap(materialize(x, func).clone(), REPLICA if x._spec.is_partial else x._spec, pg,
                 x._gshape, x._compute_spec)
    spec = x._spec
    if spec.is_partial:     # writes and adds of replicated values into a pending sum
        materialize(x, func)
        spec = x._spec
    g = x._gshape
    d = dim % len(g)
    loc = x._local
    if not spec.is_shard:
        op(loc, d, il, whole(), **rest)
        return x
    tensor_src = isinstance(src, torch.Tensor)
    if spec.dim != d:
        # along another dim: the index (scatter) or source (index ops) on this rank's part
        if op in (T.scatter_, T.scatter_add_):
            if tuple(il.shape)[spec.dim] != g[spec.dim] or (
                    tensor_src and tuple(src.shape)[spec.dim] != g[spec.dim]):
                raise UnsupportedOpError(
                    f"{_trace.func_name(func)}: an index of shape {tuple(il.shape)} covering "
                    f"part of the sharded dim {spec.dim} of {tuple(g)} is not supported")
            il = to_layout(il, spec, pg, func)
        if op is T.index_fill_:   # a 0-d value, read by every rank: its gradient is summed
            if tensor_src:
                src = copy_to_region(whole(), pg, func)
        elif tensor_src:
            src = to_layout(src, spec, pg, func)
        op(loc, d, il, src, **rest)
        return x
    # along the sharded dim: this rank's entries; the others go to a scratch slot
    n = loc.shape[d]
    # an index no rank holds raises as serial, before anything is written (each rank drops the
    # ones it does not hold); index_fill_ alone counts -n..-1 from the end
    if op is T.index_fill_:
        check_index(il, g[d], func, d, negative=True)
        il = torch.where(il < 0, il + g[d], il)
    else:
        check_index(il, g[d], func, d)
    lid, mask = local_index(il, g[d], spec, pg.tp_local_rank())
    lid = torch.where(mask, lid, torch.full_like(lid, n))
    if tensor_src:   # every rank reads the whole source: its gradient is summed (Megatron's f)
        src = copy_to_region(whole(), pg, func)
    pad = list(loc.shape)
    pad[d] = 1
    work = torch.cat([loc, loc.new_zeros(pad)], d)
    op(work, d, lid, src, **rest)
    loc.copy_(work.narrow(d, 0, n))
    return x


@rule(F.pad, torch.constant_pad_nd)
def pad(func, args, kwargs):
    """F.pad: padding dims other than the sharded one keeps the layout (local pad); padding the
    sharded dim changes every rank's part, so the value is gathered first (a replicated result:
    the repetition penalty pads the vocabulary by one slot it drops again)."""
    names = ("input", "pad", "mode", "value")
    b = dict(zip(names, args))
    b.update(kwargs)
    x, widths = b.pop("input"), tuple(b.pop("pad"))
    mode = b.get("mode", "constant")
    value = b.get("value", None)
    if type(x) is not ST:
        return func(x, widths, **b) if func is F.pad else func(x, widths, *args[2:], **kwargs)
    pg = x._pg
    g = x._gshape
    spec = x._spec
    padded = {len(g) - 1 - i // 2 for i, w in enumerate(widths) if w}
    linear = mode == "constant" and not value
    if spec.is_partial and not linear:
        loc, spec = materialize(x, func), REPLICA
    elif spec.is_shard and spec.dim in padded:
        loc, spec = to_layout(x, REPLICA, pg, func), REPLICA
    else:
        loc = x._local
    empty = spec.is_shard and loc.shape[spec.dim] == 0 and mode != "constant"
    if empty:   # a rank holding none of an uneven dim: reflect/replicate/circular refuse an empty
        pad1 = list(loc.shape)   # dim, so they pad one zero slice, dropped again (the same
        pad1[spec.dim] = 1       # checks as the other ranks', and autograd still reaches loc)
        loc = torch.cat([loc, loc.new_zeros(pad1)], spec.dim)
    out = F.pad(loc, widths, **b) if func is F.pad else func(loc, widths, *args[2:], **kwargs)
    if empty:
        out = out.narrow(spec.dim, 0, 0)
    shape = list(g)
    for i in range(0, len(widths), 2):
        k = len(g) - 1 - i // 2
        shape[k] += widths[i] + widths[i + 1]
    return wrap(out, spec, pg, shape)
