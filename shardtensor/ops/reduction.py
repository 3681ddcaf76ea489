"""Reductions and softmax: local over non-sharded dims (the shard's dim index shifts when the
dim is dropped), communicating over the sharded dim.

Over the sharded dim: sum/mean leave a PartialSpec value (the all-reduce is deferred to whoever
needs the value); amax/amin/max/min/argmax/norm/logsumexp/var/std/all/any all-reduce to a
replicated value; softmax/log_softmax keep the shard (Megatron style: an all-reduce of the row
max, one of the row sum). Partial inputs: sum/mean stay partial (they are linear), every other
reduction materialises the value first.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from ..collectives import (all_reduce_max_, all_reduce_min_, max_from_region,
                           min_from_region, reduce_from_region)
from ..dispatch import RULES, UnsupportedOpError
from ..spec import shard_ranges
from ._util import (PARTIAL, REPLICA, ST, allreduce_for_shards, materialize, remember, rule,
                    shard_spec, wrap)

T = torch.Tensor


# --- argument helpers ---------------------------------------------------------------------------

_NUMPY_NAMES = {"axis": "dim", "keepdims": "keepdim"}


def _bind(func, args, kwargs, names, defaults):
    out = dict(defaults)
    for name, v in zip(names, args[1:]):
        out[name] = v
    for k, v in kwargs.items():
        k = _NUMPY_NAMES.get(k, k)   # torch accepts numpy's axis= / keepdims= too
        if k == "out" and v is None:  # torch.norm forwards its default out=None
            continue
        if k not in out:
            raise UnsupportedOpError(f"{getattr(func, '__name__', func)}: argument {k}= is not "
                                     f"supported with sharded inputs")
        out[k] = v
    return out


def _dims(dim, nd: int) -> Tuple[int, ...]:
    """Normalised reduced dims; None or () means every dim."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return tuple(range(nd))
    if isinstance(dim, int):
        return (dim % nd,) if nd else ()
    return tuple(sorted({int(k) % nd for k in dim}))


def _shape(g, dims, keepdim):
    return tuple(1 if k in dims else v for k, v in enumerate(g)) if keepdim else \
        tuple(v for k, v in enumerate(g) if k not in dims)


def _kept_spec(spec, dims, keepdim):
    """The layout of a reduction over `dims` not touching the sharded dim."""
    if spec.is_shard and not keepdim:
        return shard_spec(spec.dim - sum(k < spec.dim for k in dims), spec.degree, spec.stride)
    return spec


def _over_shard(x, dims) -> bool:
    return type(x) is ST and x._spec.is_shard and x._spec.dim in dims


def _squeeze(t, dims, keepdim):
    return t if keepdim or not dims else t.squeeze(dims)


def _local_extremum(local, dims, largest: bool):
    """amax/amin over `dims` (keepdim) of a shard that may be empty (then -inf/+inf, still in the
    autograd graph so that every rank runs the same backward)."""
    if local.numel():
        return local.amax(dims, keepdim=True) if largest else local.amin(dims, keepdim=True)
    if local.is_floating_point():
        fill = -math.inf if largest else math.inf
    else:
        info = torch.iinfo(local.dtype) if local.dtype != torch.bool else None
        fill = (info.min if largest else info.max) if info else (not largest)
    return local.sum(dims, keepdim=True, dtype=local.dtype) + fill


def _positions(x) -> torch.Tensor:
    """The global index along the sharded dim of every local position."""
    s = x._spec
    ranges = shard_ranges(x._gshape[s.dim], s.degree, s.stride, x._pg.tp_local_rank())
    return torch.cat([torch.arange(a, a + l, device=x._local.device) for a, l in ranges])


# --- sum and mean -------------------------------------------------------------------------------

_MEANS = {torch.mean, T.mean}


def _fast_keep_shape(g, d: int, keepdim: bool, spec):
    """(output shape, output spec) of a reduction over the one dim `d` off the sharded dim,
    cached on (shape, dim, keepdim, spec)."""
    key = (g, d, keepdim, spec)
    r = _FAST_SHAPES.get(key)
    if r is None:
        r = remember(_FAST_SHAPES, key, (torch.Size(_shape(g, (d,), keepdim)),
                                         _kept_spec(spec, (d,), keepdim)))
    return r


_FAST_SHAPES: dict = {}


@rule(torch.sum, T.sum, torch.nansum, T.nansum, torch.mean, T.mean)
def sum_mean(func, args, kwargs):
    x = args[0]
    # fast path (RMSNorm's `h.pow(2).mean(-1, keepdim=True)`): one int dim that is not the
    # sharded one, a floating input; local, the layout kept (a partial sum stays partial)
    if len(args) == 2 and type(args[1]) is int and (not kwargs or (
            len(kwargs) == 1 and "keepdim" in kwargs)) and x._local.is_floating_point():
        g = x._gshape
        if g:
            d = args[1] % len(g)
            spec = x._spec
            if not (spec.is_shard and spec.dim == d):
                keepdim = bool(kwargs.get("keepdim", False))
                shape, ospec = _fast_keep_shape(g, d, keepdim, spec)
                base = torch.mean if func in _MEANS else (
                    torch.nansum if func in (torch.nansum, T.nansum) else torch.sum)
                return wrap(base(x._local, d, keepdim), ospec, x._pg, shape)
    if len(args) > 1 and isinstance(args[1], torch.dtype):
        args, kwargs = (x,), dict(kwargs, dtype=args[1])
    b = _bind(func, args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False, "dtype": None})
    g = x._gshape
    dims, keepdim, dtype = _dims(b["dim"], len(g)), b["keepdim"], b["dtype"]
    local, spec = x._local, x._spec
    name = "nansum" if func in (torch.nansum, T.nansum) else "sum"
    if func in _MEANS and dtype is None and not (local.is_floating_point() or local.is_complex()):
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either a "
                           f"floating point or complex dtype. Got: {local.dtype}")
    shape = _shape(g, dims, keepdim)
    if not spec.is_shard or spec.dim not in dims:
        op = torch.mean if func in _MEANS else getattr(torch, name)
        out = op(local, dims, keepdim, dtype=dtype) if dims or not g else op(local, dtype=dtype)
        return wrap(out, _kept_spec(spec, dims, keepdim), x._pg, shape)
    # over the sharded dim: every rank's sum of its shard is a summand of the result
    out = getattr(torch, name)(local, dims, keepdim, dtype=dtype)
    if func in _MEANS:
        out = out / math.prod(g[k] for k in dims)
    return wrap(out, PARTIAL, x._pg, shape)


# --- max and min ----------------------------------------------------------------------------------

@rule(torch.amax, T.amax, torch.amin, T.amin)
def amax(func, args, kwargs):
    x = args[0]
    b = _bind(func, args, kwargs, ("dim", "keepdim"), {"dim": (), "keepdim": False})
    return _extremum(x, _dims(b["dim"], len(x._gshape)), b["keepdim"],
                     func in (torch.amax, T.amax), func)


def _operand(x, func):
    """The local tensor and layout of a reduction's input; a pending sum is reduced first
    (`materialize` rebinds it, so its layout reads replicated afterwards)."""
    return materialize(x, func), x._spec

def _extremum(x, dims, keepdim, largest, func):
    local, spec = _operand(x, func)
    shape = _shape(x._gshape, dims, keepdim)
    if not (spec.is_shard and spec.dim in dims):
        op = torch.amax if largest else torch.amin
        return wrap(op(local, dims, keepdim), _kept_spec(spec, dims, keepdim), x._pg, shape)
    m = _local_extremum(local, dims, largest)
    m = (max_from_region if largest else min_from_region)(m, x._pg, func)
    return wrap(_squeeze(m, dims, keepdim), REPLICA, x._pg, shape)


def _arg_extremum(x, dim, keepdim, largest, func, values: bool):
    """(values, indices) of max/min over `dim` (None: all dims, flat index), the first
    occurrence on ties like torch; over the sharded dim: the per-rank winners are combined by an
    all-reduce max of the values and an all-reduce min of the indices that attain it."""
    g = x._gshape
    nd = len(g)
    local, spec = _operand(x, func)
    dims = _dims(dim, nd)
    shape = _shape(g, dims, keepdim) if dim is not None or keepdim else ()
    if dim is None and not keepdim:
        shape = ()
    pg = x._pg
    whole = not (spec.is_shard and spec.dim in dims)
    if whole or pg.tp_world_size() == 1:   # one rank holds the whole reduced dim: local
        if dim is None:
            v = (local.max() if largest else local.min()) if values else None
            i = local.argmax() if largest else local.argmin()
            if keepdim:
                i = i.reshape((1,) * nd)
                v = None if v is None else v.reshape((1,) * nd)
            return (None if v is None else wrap(v, REPLICA, pg, shape)), wrap(i, REPLICA, pg, shape)
        ospec = _kept_spec(spec, dims, keepdim) if whole else REPLICA
        if not values:      # argmax / argmin: one op
            i = (local.argmax if largest else local.argmin)(dims[0], keepdim=keepdim)
            return None, wrap(i, ospec, pg, shape)
        out = (local.max if largest else local.min)(dims[0], keepdim=True)
        v, i = _squeeze(out.values, dims, keepdim), _squeeze(out.indices, dims, keepdim)
        return wrap(v, ospec, pg, shape) if values else None, wrap(i, ospec, pg, shape)
    d = spec.dim
    ranges = shard_ranges(g[d], spec.degree, spec.stride, pg.tp_local_rank())
    pos = _positions(x) if dim is None or len(ranges) > 1 else None
    if dim is None:      # flat index: the local flat winner, mapped to the global flat index
        flat = local.reshape(-1)
        lv = _local_extremum(flat, (0,), largest)
        if flat.numel():
            li = (flat.argmax() if largest else flat.argmin()).reshape(1)
            coords = list(torch.unravel_index(li, local.shape))
            coords[d] = pos[coords[d]]
            gi = sum(c * math.prod(g[k + 1:]) for k, c in enumerate(coords))
        else:
            gi = torch.zeros(1, dtype=torch.long, device=local.device)
    else:
        lv = _local_extremum(local, dims, largest)
        if local.shape[d]:
            li = (local.argmax if largest else local.argmin)(d, keepdim=True)
            gi = pos[li] if pos is not None else li + ranges[0][0]
        else:
            gi = torch.zeros(lv.shape, dtype=torch.long, device=local.device)
    best = (all_reduce_max_ if largest else all_reduce_min_)(lv.detach().clone(), pg, func)
    cand = torch.where(lv.detach() == best, gi, torch.full_like(gi, torch.iinfo(torch.long).max))
    gi = all_reduce_min_(cand.clone(), pg, func)
    v = None
    if values:   # the winner's value, as a summand of the other ranks' zeros: exact gradient
        v = reduce_from_region(torch.where(cand == gi, lv, torch.zeros_like(lv)), pg, func)
    if dim is None:
        gi = gi.reshape((1,) * nd if keepdim else ())
        v = None if v is None else v.reshape((1,) * nd if keepdim else ())
    else:
        gi, v = _squeeze(gi, dims, keepdim), None if v is None else _squeeze(v, dims, keepdim)
    return (None if v is None else wrap(v, REPLICA, pg, shape)), wrap(gi, REPLICA, pg, shape)


@rule(torch.max, T.max, torch.min, T.min)
def max_min(func, args, kwargs):
    largest = func in (torch.max, T.max)
    other = args[1] if len(args) > 1 else kwargs.get("other")
    if isinstance(other, torch.Tensor):     # the elementwise overload
        target = torch.maximum if largest else torch.minimum
        r = RULES.get(target)
        if r is None:
            raise UnsupportedOpError(f"torch.{'max' if largest else 'min'}(a, b) needs a rule "
                                     f"for {target.__name__}")
        return r(target, (args[0], other), {})
    x = args[0]
    b = _bind(func, args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    if b["dim"] is None:
        return _extremum(x, _dims(None, len(x._gshape)), False, largest, func)
    v, i = _arg_extremum(x, b["dim"], b["keepdim"], largest, func, values=True)
    return (torch.return_types.max if largest else torch.return_types.min)((v, i))


@rule(torch.argmax, T.argmax, torch.argmin, T.argmin)
def argmax(func, args, kwargs):
    x = args[0]
    b = _bind(func, args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    return _arg_extremum(x, b["dim"], b["keepdim"], func in (torch.argmax, T.argmax), func,
                         values=False)[1]


# --- norms, logsumexp, var/std ------------------------------------------------------------------

def _root(s, p):
    """s ** (1/p) with torch's subgradient 0 at s = 0 (a zero norm, a constant row's std)."""
    zero = s == 0
    r = torch.where(zero, torch.ones_like(s), s)
    r = r.sqrt() if p == 2 else r.pow(1.0 / p)
    return torch.where(zero, torch.zeros_like(r), r)


def _vector_norm(x, ord, dims, keepdim, dtype, func):
    local, spec = _operand(x, func)
    shape = _shape(x._gshape, dims, keepdim)
    if not (spec.is_shard and spec.dim in dims):
        out = torch.linalg.vector_norm(local, ord, dims, keepdim, dtype=dtype)
        return wrap(out, _kept_spec(spec, dims, keepdim), x._pg, shape)
    pg = x._pg
    ord = float(ord)
    if math.isinf(ord):
        a = local.abs() if dtype is None else local.abs().to(dtype)
        m = (max_from_region if ord > 0 else min_from_region)(_local_extremum(a, dims, ord > 0), pg, func)
        return wrap(_squeeze(m, dims, keepdim), REPLICA, pg, shape)
    if ord == 0:   # the local counts; torch's own node gives the input no gradient, as serially
        c = torch.linalg.vector_norm(local, 0.0, dims, keepdim=True, dtype=dtype)
        return wrap(_squeeze(reduce_from_region(c, pg, func), dims, keepdim), REPLICA, pg, shape)
    # sum of |x|^p over the shards, then the p-th root (a zero norm has an undefined gradient)
    p = torch.linalg.vector_norm(local, ord, dims, keepdim=True, dtype=dtype)
    if ord == 2:
        t = p * p
    elif ord < 1:   # a zero local norm: |x|^p's derivative is infinite there; serial's is 0
        zero = p == 0
        t = torch.where(zero, torch.ones_like(p), p).pow(ord)
        t = torch.where(zero, torch.full_like(t, math.inf if ord < 0 else 0.0), t)
    else:
        t = p.pow(ord)
    s = reduce_from_region(t, pg, func)
    out = _root(s, ord)
    return wrap(_squeeze(out, dims, keepdim), REPLICA, pg, shape)


@rule(torch.linalg.vector_norm)
def vector_norm(func, args, kwargs):
    x = args[0]
    b = _bind(func, args, kwargs, ("ord", "dim", "keepdim"),
              {"ord": 2, "dim": None, "keepdim": False, "dtype": None})
    return _vector_norm(x, b["ord"], _dims(b["dim"], len(x._gshape)), b["keepdim"], b["dtype"],
                        func)


@rule(torch.norm, T.norm)
def norm(func, args, kwargs):
    x = args[0]
    b = _bind(func, args, kwargs, ("p", "dim", "keepdim", "dtype"),
              {"p": "fro", "dim": None, "keepdim": False, "dtype": None})
    p = b["p"]
    if p == "fro" or p is None:
        p = 2
    if isinstance(p, str):
        raise UnsupportedOpError(f"torch.norm(p={p!r}) with sharded inputs is not supported")
    return _vector_norm(x, p, _dims(b["dim"], len(x._gshape)), b["keepdim"], b["dtype"], func)


@rule(torch.linalg.norm)
def linalg_norm(func, args, kwargs):
    """torch.linalg.norm where it is a vector norm (an int dim, a 1-D input, ord None) or the
    Frobenius norm (the 2-norm over both dims); other matrix norms have no rule."""
    x = args[0]
    b = _bind(func, args, kwargs, ("ord", "dim", "keepdim"),
              {"ord": None, "dim": None, "keepdim": False, "dtype": None})
    ord, dim, nd = b["ord"], b["dim"], len(x._gshape)
    if ord is not None and dim is None and nd > 2:        # torch's own checks, as in serial
        raise RuntimeError(f"linalg.norm: If dim is not specified but ord is, the input must be "
                           f"1D or 2D. Got {nd}D.")
    if isinstance(ord, str) and dim is not None and (
            isinstance(dim, int) or len(dim) != 2):
        raise RuntimeError(f"linalg.matrix_norm: dim must be a 2-tuple. Got "
                           f"{1 if isinstance(dim, int) else len(dim)}")
    vector = isinstance(dim, int) or (isinstance(dim, (tuple, list)) and len(dim) == 1) or (
        dim is None and (ord is None or nd == 1))
    if not vector and ord not in (None, "fro"):
        raise UnsupportedOpError(f"torch.linalg.norm(ord={ord!r}) (a matrix norm) has no sharding "
                                 f"rule; the vector norms and ord='fro' have")
    return _vector_norm(x, 2 if ord in (None, "fro") else ord, _dims(dim, nd), b["keepdim"],
                        b["dtype"], func)


@rule(torch.logsumexp, T.logsumexp)
def logsumexp(func, args, kwargs):
    x = args[0]
    b = _bind(func, args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    dims, keepdim = _dims(b["dim"], len(x._gshape)), b["keepdim"]
    local, spec = _operand(x, func)
    shape = _shape(x._gshape, dims, keepdim)
    if not (spec.is_shard and spec.dim in dims):
        return wrap(torch.logsumexp(local, dims, keepdim), _kept_spec(spec, dims, keepdim),
                    x._pg, shape)
    m = all_reduce_max_(_local_extremum(local.detach(), dims, True).clone(), x._pg, func)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = reduce_from_region((local - m).exp().sum(dims, keepdim=True), x._pg, func)
    return wrap(_squeeze(s.log() + m, dims, keepdim), REPLICA, x._pg, shape)


_STD = {torch.std, T.std, torch.std_mean}
_WITH_MEAN = {torch.var_mean, torch.std_mean}


@rule(torch.var, T.var, torch.std, T.std, torch.var_mean, torch.std_mean)
def var_std(func, args, kwargs):
    x, rest = args[0], list(args[1:])
    dim, unbiased, keepdim = None, None, kwargs.get("keepdim", False)
    if rest and isinstance(rest[0], bool):
        unbiased = rest.pop(0)
    elif rest:
        dim = rest.pop(0)
        if rest:
            unbiased = rest.pop(0)
        if rest:
            keepdim = rest.pop(0)
    dim = kwargs.get("dim", dim)
    unbiased = kwargs.get("unbiased", unbiased)
    correction = kwargs.get("correction")
    if correction is None:
        correction = 0 if unbiased is False else 1
    g = x._gshape
    dims = _dims(dim, len(g))
    local, spec = _operand(x, func)
    shape = _shape(g, dims, keepdim)
    pg = x._pg
    std = func in _STD
    if not (spec.is_shard and spec.dim in dims):
        op = {torch.var: torch.var, T.var: torch.var, torch.std: torch.std, T.std: torch.std}.get(func, func)
        out = op(local, dims, correction=correction, keepdim=keepdim)
        ospec = _kept_spec(spec, dims, keepdim)
        if func in _WITH_MEAN:
            return tuple(wrap(o, ospec, pg, shape) for o in out)
        return wrap(out, ospec, pg, shape)
    # two passes over the shards: the global mean, then the sum of squared deviations
    count = math.prod(g[k] for k in dims)
    mean = reduce_from_region(local.sum(dims, keepdim=True), pg, func) / count
    centred = local - allreduce_for_shards(local.sum(dims, keepdim=True), pg, func) / count
    var = reduce_from_region((centred * centred).sum(dims, keepdim=True), pg, func)
    var = var / max(count - correction, 0)
    out = wrap(_squeeze(_root(var, 2) if std else var, dims, keepdim), REPLICA, pg, shape)
    if func in _WITH_MEAN:
        return out, wrap(_squeeze(mean, dims, keepdim), REPLICA, pg, shape)
    return out


# --- all / any ------------------------------------------------------------------------------------

@rule(torch.all, T.all, torch.any, T.any)
def all_any(func, args, kwargs):
    x = args[0]
    b = _bind(func, args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    dims, keepdim = _dims(b["dim"], len(x._gshape)), b["keepdim"]
    local, spec = _operand(x, func)
    shape = _shape(x._gshape, dims, keepdim)
    is_all = func in (torch.all, T.all)
    op = torch.all if is_all else torch.any
    out = op(local, dims, keepdim=True) if dims else op(local)
    if not (spec.is_shard and spec.dim in dims):
        out = out if not dims else _squeeze(out, dims, keepdim)
        return wrap(out, _kept_spec(spec, dims, keepdim), x._pg, shape)
    out = (all_reduce_min_ if is_all else all_reduce_max_)(out.to(torch.int32), x._pg, func)
    return wrap(_squeeze(out.bool(), dims, keepdim), REPLICA, x._pg, shape)


# --- softmax ----------------------------------------------------------------------------------------

_LOG = {F.log_softmax, torch.log_softmax, T.log_softmax}
_F = {F.softmax, F.log_softmax}


@rule(F.softmax, torch.softmax, T.softmax, F.log_softmax, torch.log_softmax, T.log_softmax)
def softmax(func, args, kwargs):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dtype = kwargs.get("dtype")
    if dtype is None and len(args) > (3 if func in _F else 2):
        dtype = args[3 if func in _F else 2]
    nd = len(x._gshape)
    if dim is None:   # F.softmax's legacy implicit dim
        dim = 0 if nd in (0, 1, 3) else 1
    dim %= max(nd, 1)
    local, spec = _operand(x, func)
    log = func in _LOG
    if not (spec.is_shard and spec.dim == dim):
        op = torch.log_softmax if log else torch.softmax
        return wrap(op(local, dim, dtype=dtype), spec, x._pg, x._gshape)
    xl = local if dtype is None else local.to(dtype)
    # the row max only stabilises exp (softmax does not depend on it): no gradient through it
    m = all_reduce_max_(_local_extremum(xl.detach(), (dim,), True).clone(), x._pg, func)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = xl - m
    e = z.exp()
    s = allreduce_for_shards(e.sum(dim, keepdim=True), x._pg, func)
    return wrap(z - s.log() if log else e / s, spec, x._pg, x._gshape)

