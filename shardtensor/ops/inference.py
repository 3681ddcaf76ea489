"""Inference: what `model.generate(...)` needs beyond the training rules.

Choosing the next token from vocab-sharded logits never gathers them:
- greedy: `argmax` (ops/reduction.py) is a (value, index) all-reduce pair over the vocab shards;
- `topk` over the sharded vocab: each rank takes its local top-k, then the k candidates of every
  rank (k values + k indices per rank, never the logits) are all-gathered and the global top-k
  is picked from them (ties: the lower global index first);
- sampling, `torch.multinomial` on vocab-sharded probabilities, equals serial draw for draw:
  torch samples as argmax(p / q), q ~ Exp(1) of p's shape from the generator, so every rank
  draws q for the GLOBAL shape (same seed: same q on every rank and in the serial model), keeps
  its shard, and the winner is the same (value, index) reduction. Trade-off: each rank spends
  the compute (not communication) of drawing the full-vocabulary q; nothing vocab-sized moves.
- top-p sorts the whole vocabulary (`torch.sort` over the sharded dim): that rule gathers the
  row, ONE all-gather of batch x vocab per step, counted in CommTrace. Greedy, top-k,
  temperature and plain sampling never gather the logits.

KV caches stay head-sharded: `cat` along the sequence (DynamicCache) is local; `index_copy_` /
`index_put_` (StaticCache) write on the shards; a plain cache buffer allocated at the global
shape (StaticCache's lazy `torch.zeros`) is converted in place to the layout of the first
sharded value written into it (the full-size buffer is freed right away). Beam reordering
(`index_select` / `take_along_dim` on the batch dim) is local on the shards.

Python values (`bool(t)`, `t.item()`, `int(t)`, `t.tolist()`): a replicated value answers from
the local copy, a partial one is reduced, a sharded one gathered. A scalar that steers control
flow is checked to agree across ranks (one 16-byte all-reduce) and raises ShardingError on every
rank if it does not: ranks that branch differently would otherwise hang.
"""
from __future__ import annotations

import torch

from ..collectives import all_reduce_, empty_in_dim_order, gather_from_region
from ..dispatch import UnsupportedOpError
from .. import trace as _trace
from ._util import (PARTIAL, REPLICA, ST, check_index, shard_spec, group_of, materialize, rule,
                    to_layout, unwrap, wrap)

T = torch.Tensor


def _name(func) -> str:
    return _trace.func_name(func)


def _wrap_out(out, pg):
    """Wrap every tensor in `out` (a tensor or a tuple of them) as a replicated value."""
    if isinstance(out, T):
        return wrap(out, REPLICA, pg, out.shape)
    if isinstance(out, tuple):
        return type(out)([_wrap_out(o, pg) for o in out])
    return out


def _all_replicated(func, args, kwargs):
    """Local arguments of an op whose ShardedTensor inputs are all replicated values (partial
    ones are reduced first); None when some input is sharded (the caller decides)."""
    xs = [a for a in list(args) + list(kwargs.values()) if type(a) is ST]
    pg = group_of(func, *xs)
    if any(x._spec.is_shard for x in xs):
        return None
    loc = lambda a: materialize(a, func) if type(a) is ST else a
    return pg, [loc(a) for a in args], {k: loc(v) for k, v in kwargs.items()}


# --- membership -------------------------------------------------------------------------------

@rule(torch.isin)
def isin(func, args, kwargs):
    """Elementwise in the elements (their layout is kept); the test set is needed whole on every
    rank (a sharded test set is gathered: it is a short list of token ids in practice)."""
    kw = dict(kwargs)
    a = list(args)
    names = ("elements", "test_elements")
    for i, n in enumerate(names):
        if n in kw:
            a.insert(i, kw.pop(n))
    elements, test = a[0], a[1]
    pg = group_of(func, elements, test)
    tl = to_layout(test, REPLICA, pg, func) if type(test) is ST else test
    if type(elements) is not ST:
        return wrap(torch.isin(elements, tl, *a[2:], **kw), REPLICA, pg, elements.shape)
    el = materialize(elements, func)
    spec = REPLICA if elements._spec.is_partial else elements._spec
    return wrap(torch.isin(el, tl, *a[2:], **kw), spec, pg, elements._gshape)


# --- Python values ------------------------------------------------------------------------------

def _whole(x, func):
    """The global value of `x` as a plain local tensor: a replicated value as is, a partial one
    reduced, a sharded one gathered (the caller asked for all of it)."""
    if x._spec.is_shard:
        return to_layout(x, REPLICA, x._pg, func)
    return materialize(x, func)


def _check_agrees(local, x, func):
    """A Python scalar that steers control flow must be the same on every rank, or the ranks
    take different branches and hang in their next collectives: one 16-byte all-reduce checks
    it and raises on every rank at once."""
    if x._pg.tp_world_size() == 1 or local.is_complex():
        return
    v = local.detach().reshape(()).to(torch.float64)
    t = torch.stack([v, -v])
    all_reduce_(t, x._pg, func, reduce_op="max")
    if t[0] != -t[1]:
        from ..dispatch import ShardingError
        raise ShardingError(
            f"{_name(func)}: this replicated value differs across the tensor-parallel ranks "
            f"(from {(-t[1]).item()} to {t[0].item()}); a Python value taken from it would send "
            f"the ranks down different paths. It was computed from per-rank data (a per-rank "
            f"random draw, or a shard treated as the whole): compute it from sharded values "
            f"through shardtensor's rules")


_SCALARS = [T.__bool__, T.item, T.__int__, T.__float__, T.__index__, T.__complex__]


@rule(*_SCALARS)
def scalar(func, args, kwargs):
    """`bool(t)`, `t.item()`, `int(t)`, ...: the global value, checked to agree across ranks."""
    x = args[0]
    local = _whole(x, func)
    if x._spec.is_replicate:
        _check_agrees(local, x, func)
    return func(local, *args[1:], **kwargs)


@rule(T.tolist, T.numpy)
def to_python(func, args, kwargs):
    """`t.tolist()` / `t.numpy()`: the global value (a sharded one is gathered)."""
    x = args[0]
    return func(_whole(x, func).detach() if func is T.numpy else _whole(x, func), *args[1:],
                **kwargs)


# --- top-k over the sharded vocabulary -----------------------------------------------------------

def _positions(x) -> torch.Tensor:
    """The global index along the sharded dim of every local position (strided shards too)."""
    from ..spec import shard_ranges
    s = x._spec
    ranges = shard_ranges(x._gshape[s.dim], s.degree, s.stride, x._pg.tp_local_rank())
    return torch.cat([torch.arange(a, a + n, device=x._local.device) for a, n in ranges])


def _fill(dtype, largest: bool):
    """A value that loses to every real value (padding for short shards)."""
    if dtype.is_floating_point:
        return -float("inf") if largest else float("inf")
    info = torch.iinfo(dtype)
    return info.min if largest else info.max


def _sharded_topk(x, local, k: int, d: int, largest: bool, func):
    """(values, global indices) of the top k along the sharded dim `d`: every rank's local top-k
    candidates (k values and k indices, padded where the shard is shorter) are all-gathered, and
    the best k of the d*k candidates are chosen; ties go to the lower global index."""
    pg = x._pg
    n_loc = local.shape[d]
    lk = min(k, n_loc)
    lv, li = torch.topk(local, lk, dim=d, largest=largest, sorted=True)
    gi = _positions(x)[li]
    if lk < k:   # pad: a candidate that never wins (the index sorts after every real one)
        pad = list(lv.shape)
        pad[d] = k - lk
        # (not `fill + 0 * lv.sum()`: scores holding -inf, a top-k after another filter, made
        # that pad NaN, which sorts above every value and took the top places)
        lv = torch.cat([lv, lv.new_full(pad, _fill(lv.dtype, largest))], d)
        gi = torch.cat([gi, torch.full(pad, torch.iinfo(torch.long).max, dtype=torch.long,
                                       device=gi.device)], d)
    world = pg.tp_world_size()
    spec = shard_spec(d, world)
    cv = gather_from_region(lv, spec, world * k, pg, func)          # (..., world*k, ...)
    ci = gather_from_region(gi, spec, world * k, pg, func)
    # order by (value, then the lower index): a stable sort by index, then by value
    by_index = torch.argsort(ci, dim=d, stable=True)
    v2 = torch.gather(cv.detach(), d, by_index)
    order = torch.sort(v2, dim=d, descending=largest, stable=True).indices.narrow(d, 0, k)
    pick = torch.gather(by_index, d, order)
    return torch.gather(cv, d, pick), torch.gather(ci, d, pick)


@rule(torch.topk, T.topk)
def topk(func, args, kwargs):
    """Over a non-sharded dim: local. Over the sharded dim: a (value, index) reduction that
    moves world*k candidates, never the whole dim (see _sharded_topk)."""
    b = dict(zip(("k", "dim", "largest", "sorted"), args[1:]))
    b.update(kwargs)
    if "out" in b:
        raise UnsupportedOpError("torch.topk(out=...) with sharded inputs is not supported")
    x, k = args[0], int(b["k"])
    dim, largest, srt = b.get("dim", -1), b.get("largest", True), b.get("sorted", True)
    g = x._gshape
    d = dim % max(len(g), 1)
    local = materialize(x, func)
    spec = REPLICA if x._spec.is_partial else x._spec
    shape = list(g)
    if len(g):
        shape[d] = k
    if not (spec.is_shard and spec.dim == d):
        v, i = torch.topk(local, k, dim=dim, largest=largest, sorted=srt)
        return torch.return_types.topk((wrap(v, spec, x._pg, shape), wrap(i, spec, x._pg, shape)))
    if k > g[d]:
        raise RuntimeError(f"selected index k out of range (k={k}, size {g[d]} of dim {d})")
    v, i = _sharded_topk(x, local, k, d, largest, func)
    return torch.return_types.topk((wrap(v, REPLICA, x._pg, shape),
                                    wrap(i, REPLICA, x._pg, shape)))


# --- gathering by index (beam bookkeeping, cache reorder, picking scores) -----------------------

def _bind_index(func, args, kwargs):
    """(input, dim, index) of gather / take_along_dim / index_select, and any other kwargs."""
    kw = dict(kwargs)
    if func in (torch.take_along_dim, T.take_along_dim):
        names = ("input", "indices", "dim")
    else:
        names = ("input", "dim", "index")
    b = dict(zip(names, args))
    b.update(kw)
    x, dim = b.pop("input"), b.pop("dim", None)
    idx = b.pop("indices", None) if "indices" in b else b.pop("index")
    if "out" in b:
        raise UnsupportedOpError(f"{_name(func)}(out=...) with sharded inputs is not supported")
    return x, dim, idx, b


_GATHER = (torch.gather, T.gather, torch.take_along_dim, T.take_along_dim)


def _take(index) -> bool:
    """Whether this torch's take_along_dim along a dim (not flattened) takes `index` into
    arange(2) as entry 1: torch 2.4 refuses out-of-range and negative indices, as gather does;
    newer torch takes every index modulo the size (its reference: `indices % dim_size`)."""
    try:
        return torch.take_along_dim(torch.arange(2.0), torch.tensor([index]), 0).item() == 1.0
    except (RuntimeError, IndexError):
        return False


_NEGATIVE_TAKE = _take(-1)     # -n..-1 count from the end
_MODULO_TAKE = _take(3)        # every index modulo the size


@rule(*_GATHER, torch.index_select, T.index_select)
def gather(func, args, kwargs):
    """Picking along a dim. Replicated values: local. A tensor sharded on another dim: local on
    the shards (the index is sliced to the shard where it spans that dim). Along the sharded dim
    with a replicated index: each rank picks the entries it holds and zeros elsewhere, a
    PartialSpec result (the sum is the serial one; no gather of the input)."""
    x, dim, idx, rest = _bind_index(func, args, kwargs)
    base = torch.index_select if func in (torch.index_select, T.index_select) else \
        (torch.take_along_dim if func in (torch.take_along_dim, T.take_along_dim) else torch.gather)
    pg = group_of(func, x, idx)
    if type(x) is not ST or not x._spec.is_shard:
        xl = materialize(x, func)
        il = to_layout(idx, REPLICA, pg, func) if type(idx) is ST else idx
        out = base(xl, dim, il, **rest) if base is not torch.take_along_dim else \
            base(xl, il, dim, **rest)
        return wrap(out, REPLICA, pg, out.shape)
    if dim is None:
        raise UnsupportedOpError(f"{_name(func)} without dim (flattened) over a sharded tensor "
                                 f"is not supported")
    g = x._gshape
    d = dim % len(g)
    spec = x._spec
    il = to_layout(idx, REPLICA, pg, func) if type(idx) is ST and not idx._spec.is_shard else idx
    if spec.dim != d:
        if base is torch.index_select:
            out = torch.index_select(x._local, d, unwrap(il))
            shape = list(g)
            shape[d] = il.shape[0] if not type(il) is ST else il._gshape[0]
            return wrap(out, spec, pg, shape)
        ishape = tuple(il._gshape) if type(il) is ST else tuple(il.shape)
        if ishape[spec.dim] == g[spec.dim]:
            li = to_layout(il, spec, pg, func)
        elif ishape[spec.dim] == 1 and base is torch.take_along_dim:
            li = unwrap(il)
        else:
            raise UnsupportedOpError(f"{_name(func)}: an index of shape {ishape} that covers part "
                                     f"of the sharded dim {spec.dim} of {tuple(g)} is not "
                                     f"supported")
        out = base(x._local, li, d) if base is torch.take_along_dim else base(x._local, d, li, **rest)
        shape = list(torch.broadcast_shapes(tuple(g[:d]) + (1,) + tuple(g[d + 1:]),
                                            ishape[:d] + (1,) + ishape[d + 1:])) \
            if base is torch.take_along_dim else list(ishape)
        shape[d] = ishape[d]
        return wrap(out, spec, pg, shape)
    # along the sharded dim: pick what this rank holds, zeros elsewhere -> partial
    if type(il) is ST:
        il = to_layout(il, REPLICA, pg, func)
    if base is torch.take_along_dim and _MODULO_TAKE:
        il = il.remainder(g[d])
    elif base is torch.take_along_dim and _NEGATIVE_TAKE:   # -n..-1 count from the end
        il = torch.where(il < 0, il + g[d], il)
    # an index no rank holds raises as serial (each rank masks the ones it does not hold)
    check_index(il, g[d], func, d)
    from ._util import local_index
    lid, mask = local_index(il, g[d], spec, x._pg.tp_local_rank())
    lid = torch.where(mask, lid, torch.zeros_like(lid))
    xl = x._local
    if xl.shape[d] == 0:   # an empty shard still takes part: pick from a zero pad
        pad = list(xl.shape)
        pad[d] = 1
        xl = torch.cat([xl, xl.new_zeros(pad)], d)
    if base is torch.index_select:
        out = torch.index_select(xl, d, lid)
        m = mask.reshape([-1 if k == d else 1 for k in range(len(g))])
    else:
        out = base(xl, lid, d) if base is torch.take_along_dim else base(xl, d, lid, **rest)
        m = mask
    out = torch.where(m, out, torch.zeros_like(out))
    return wrap(out, PARTIAL, pg, out.shape)


@rule(torch.scatter, T.scatter)
def scatter(func, args, kwargs):
    """Out-of-place scatter of replicated values (top-p's mask back to vocabulary order): local.
    A sharded destination: as `scatter_` on a copy (ops/scatter.py)."""
    got = _all_replicated(func, args, kwargs)
    if got is None:   # a sharded destination (repetition penalty on vocab-sharded scores)
        from .scatter import scatter_inplace
        return scatter_inplace(func, args, kwargs)
    pg, a, kw = got
    return _wrap_out(func(*a, **kw), pg)


# --- sampling ------------------------------------------------------------------------------------

@rule(torch.multinomial, T.multinomial)
def multinomial(func, args, kwargs):
    """Drawing from vocab-sharded probabilities, equal to serial `torch.multinomial` draw for draw.

    torch draws one sample (or several without replacement) as argmax (top-k) of p / q with
    q ~ Exp(1) of p's shape, from the generator. Every rank draws that same q for the *global*
    shape from its generator (seeded alike, they stay in step with each other and with the
    serial model), keeps its shard of it, and the winner is a (value, index) reduction over the
    shards: per rank k values and k indices move, never the probabilities. The price is drawing
    the full-vocabulary q on every rank (compute, no communication). One small all-reduce checks
    the distribution like torch does (no inf/nan/negative entry, positive row sums)."""
    b = dict(zip(("num_samples", "replacement"), args[1:]))
    b.update(kwargs)
    x = args[0]
    n, replacement, gen = int(b["num_samples"]), b.get("replacement", False), b.get("generator")
    if "out" in b:
        raise UnsupportedOpError("torch.multinomial(out=...) with sharded inputs is not supported")
    nd = len(x._gshape)
    d = nd - 1
    if not (x._spec.is_shard and x._spec.dim == d):   # the categories are whole on every rank
        got = _all_replicated(func, args, {})
        if got is None:       # sharded over the batch dim: each rank draws its rows
            raise UnsupportedOpError("torch.multinomial over a batch-sharded input is not "
                                     "supported (the serial draw order spans the batch)")
        pg, a, _ = got
        out = torch.multinomial(a[0], n, replacement, generator=gen)
        return wrap(out, REPLICA, pg, out.shape)
    if replacement and n > 1:
        raise UnsupportedOpError("torch.multinomial(replacement=True, num_samples>1) over a "
                                 "vocab-sharded input is not supported (only num_samples=1 or "
                                 "draws without replacement, which is what generate() uses)")
    if n > x._gshape[d]:
        raise RuntimeError("cannot sample n_sample > prob_dist.size(-1) samples without "
                           "replacement")
    local = x._local.detach()
    pg = x._pg
    bad = ~((local < float("inf")) & (local >= 0))
    stats = torch.cat([local.sum(-1).reshape(-1).double(),
                       bad.any().reshape(1).double()])
    all_reduce_(stats, pg, func)
    if stats[-1] > 0:
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    if (stats[:-1] <= 0).any():
        raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
    q = _empty_in_order_of(x._gshape, local).exponential_(1, generator=gen)
    from ..spec import take_shard
    ratio = local / take_shard(q, x._spec, pg.tp_local_rank())
    _, idx = _sharded_topk(x, ratio, n, d, True, func)
    shape = list(x._gshape)
    shape[d] = n
    return wrap(idx, REPLICA, pg, shape)


def _empty_in_order_of(shape, local: torch.Tensor) -> torch.Tensor:
    """An empty tensor of the global `shape` laid out in memory in the dim order of the shard
    `local`, as serial's `empty_like(p)` follows p's: a random fill visits the entries in memory
    order, so only then does every rank draw serial's numbers for the same entries."""
    kw = dict(dtype=local.dtype, device=local.device)
    if local.is_contiguous():
        return torch.empty(shape, **kw)
    perm = sorted(range(local.dim()), key=lambda k: -local.stride(k))
    if not local.permute(perm).is_contiguous():   # not dense: torch allocates contiguous
        return torch.empty(shape, **kw)
    return empty_in_dim_order(shape, local, **kw)


# --- sort (top-p) and running sums ----------------------------------------------------------------

@rule(torch.sort, T.sort, torch.argsort, T.argsort)
def sort(func, args, kwargs):
    """Over a non-sharded dim: local. Over the sharded dim (top-p sorts the whole vocabulary):
    the values are gathered, ONE all-gather of the tensor, and sorted on every rank (replicated
    result). This is the one place generate() moves a vocab-sized row; greedy, top-k and
    sampling never do."""
    b = dict(zip(("dim", "descending"), args[1:]))
    b.update(kwargs)
    if "out" in b:
        raise UnsupportedOpError(f"{_name(func)}(out=...) with sharded inputs is not supported")
    x = args[0]
    dim = b.pop("dim", -1)
    d = dim % max(len(x._gshape), 1)
    spec = REPLICA if x._spec.is_partial else x._spec
    if spec.is_shard and spec.dim == d:
        local, spec = to_layout(x, REPLICA, x._pg, func), REPLICA
    else:
        local = materialize(x, func)
    base = torch.argsort if func in (torch.argsort, T.argsort) else torch.sort
    out = base(local, dim=d, **b)
    if base is torch.argsort:
        return wrap(out, spec, x._pg, x._gshape)
    return torch.return_types.sort((wrap(out.values, spec, x._pg, x._gshape),
                                    wrap(out.indices, spec, x._pg, x._gshape)))


@rule(torch.cumsum, T.cumsum, torch.cumprod, T.cumprod)
def cumsum(func, args, kwargs):
    """Running sums/products along a non-sharded dim: local (a partial value stays partial for
    cumsum, which is linear). Along the sharded dim: not supported (raise)."""
    x = args[0]
    b = dict(zip(("dim",), args[1:]))
    b.update(kwargs)
    d = b.pop("dim") % max(len(x._gshape), 1)
    linear = func in (torch.cumsum, T.cumsum)
    spec = x._spec
    if spec.is_partial and not linear:
        local, spec = materialize(x, func), REPLICA
    else:
        local = x._local
    if spec.is_shard and spec.dim == d:
        raise UnsupportedOpError(f"{_name(func)} along the sharded dim {d} is not supported; "
                                 f"redistribute to ReplicaSpec() first")
    base = torch.cumsum if linear else torch.cumprod
    return wrap(base(local, d, **b), spec, x._pg, x._gshape)


# --- in-place cache writes -------------------------------------------------------------------------

def _adopt_layout(dst: torch.Tensor, spec, pg) -> None:
    """Turn the plain tensor `dst` into a ShardedTensor with `spec`, in place (the same Python
    object, as `parallelize` converts parameters). Its value is kept: each rank keeps its part.
    A static KV cache allocated at the global shape becomes head-sharded on its first write; the
    full-size buffer is freed right away."""
    from ..spec import take_shard
    local = take_shard(dst.detach(), spec, pg.tp_local_rank()).clone() if spec.is_shard else \
        dst.detach().clone()
    new = wrap(local, spec, pg, dst.shape)
    try:
        torch.utils.swap_tensors(dst, new)
    except RuntimeError as e:
        raise UnsupportedOpError(f"writing a sharded value into a plain tensor of shape "
                                 f"{tuple(dst.shape)}: could not convert it to {spec!r} in place "
                                 f"({e})") from e


def _target(func, dst, srcs):
    """The layout a write of `srcs` into `dst` happens in; a plain dst receiving a sharded value
    is converted to that layout first. Returns (pg, spec)."""
    pg = group_of(func, dst, *srcs)
    sharded = [s for s in srcs if type(s) is ST and s._spec.is_shard]
    if type(dst) is not ST:
        if not sharded:
            return pg, None            # replicated values into a plain tensor: plain write
        _adopt_layout(dst, sharded[0]._spec, pg)
    spec = dst._spec
    if spec.is_partial:
        raise UnsupportedOpError(f"{_name(func)} into a PartialSpec tensor is not supported")
    return pg, spec


@rule(T.index_copy_, T.index_copy, torch.index_copy)
def index_copy(func, args, kwargs):
    """`cache.index_copy_(seq_dim, positions, new)` (StaticCache): local on the head shards, the
    positions being a replicated index along a non-sharded dim."""
    b = dict(zip(("dim", "index", "source"), args[1:]))
    b.update(kwargs)
    dst, dim, idx, src = args[0], b["dim"], b["index"], b["source"]
    inplace = func is T.index_copy_
    if not inplace:
        dst = dst.clone()
    pg, spec = _target(func, dst, (src, idx))
    il = to_layout(idx, REPLICA, pg, func) if type(idx) is ST else idx
    if spec is None:                   # plain destination, replicated values
        dst.index_copy_(dim, il, materialize(src, func) if type(src) is ST else src)
        return dst
    d = dim % len(dst._gshape)
    if spec.is_shard and spec.dim == d:
        raise UnsupportedOpError(f"{_name(func)} along the sharded dim {d} is not supported")
    dst._local.index_copy_(d, il, to_layout(src, spec, pg, func))
    return dst


@rule(T.index_put_, T.index_put, torch.index_put)
def index_put(func, args, kwargs):
    """`t.index_put_((i, j, ...), values)` with replicated index tensors over non-sharded dims:
    local on the shards (`None` entries are full slices)."""
    b = dict(zip(("indices", "values", "accumulate"), args[1:]))
    b.update(kwargs)
    dst, indices, vals = args[0], tuple(b["indices"]), b["values"]
    acc = b.get("accumulate", False)
    if func is not T.index_put_:
        dst = dst.clone()
    pg, spec = _target(func, dst, (vals,) + tuple(i for i in indices if type(i) is ST))
    il = tuple(to_layout(i, REPLICA, pg, func) if type(i) is ST else i for i in indices)
    if spec is None:
        dst.index_put_(il, materialize(vals, func) if type(vals) is ST else vals, acc)
        return dst
    if spec.is_shard and spec.dim < len(il) and il[spec.dim] is not None:
        raise UnsupportedOpError(f"{_name(func)} with an index on the sharded dim {spec.dim} "
                                 f"is not supported")
    if spec.is_shard:
        # the value lands on the indexed positions; its sharded dim follows the kept dims
        vl = _value_for(vals, dst, il, spec, pg, func)
    else:
        vl = to_layout(vals, spec, pg, func) if isinstance(vals, torch.Tensor) else vals
    dst._local.index_put_(il, vl, acc)
    return dst


def _value_for(vals, dst, il, spec, pg, func):
    """The local part of `vals` written by index_put_ into a tensor sharded on `spec.dim` (found
    where the sharded dim lands in dst[indices] by indexing a meta tensor with a marker size)."""
    if not isinstance(vals, torch.Tensor):
        return vals
    vshape = vals._gshape if type(vals) is ST else vals.shape
    marker = list(dst._gshape)
    marker[spec.dim] = _MARKER
    idx = tuple(slice(None) if i is None else torch.zeros(i.shape, dtype=torch.long,
                                                           device="meta") for i in il)
    oshape = torch.empty(marker, device="meta")[idx].shape
    vd = list(oshape).index(_MARKER) - (len(oshape) - len(vshape))
    if vd >= 0 and vshape[vd] == dst._gshape[spec.dim]:
        return to_layout(vals, shard_spec(vd, spec.degree, spec.stride), pg, func)
    if vd >= 0 and vshape[vd] != 1:
        raise UnsupportedOpError(f"index_put_: values of shape {tuple(vshape)} do not match the "
                                 f"sharded dim of {tuple(dst._gshape)}")
    return to_layout(vals, REPLICA, pg, func)


_MARKER = 1000003   # a dim size no real tensor here has
