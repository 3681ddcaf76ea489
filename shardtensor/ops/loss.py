"""Losses over sharded logits: F.cross_entropy and F.nll_loss.

Logits sharded on the class dim (dim 1, or dim 0 unbatched) are never gathered. Cross entropy is
Megatron's vocab_parallel_cross_entropy: all-reduce the max (a detached shift), then one all-reduce
of the stacked per-row sums (sum-exp, the target logit, and for label smoothing the weighted sum
of the logits): 2 forward collectives, none backward. nll_loss on sharded log-probs is linear:
each rank picks the targets it holds and the loss stays a PartialSpec (no collective).
Logits sharded on another dim: per-row losses are local; a mean divides by the global
denominator, computed from the (replicated) targets. Replicated logits run serially.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

from .. import trace as _trace
from ..collectives import all_reduce_, reduce_from_region
from ..spec import take_shard
from ._util import (PARTIAL, REPLICA, shard_spec, ST, group_of, local_index, materialize, remember,
                    rule, spec_of, to_layout, wrap)

_CE = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
       "label_smoothing")
_CE_DEFAULTS = (None, None, None, None, -100, None, "mean", 0.0)


def _parse(args, kwargs, names, defaults):
    a = dict(zip(names, defaults))
    a.update(zip(names, args))
    a.update(kwargs)
    if a["size_average"] is not None or a["reduce"] is not None:
        a["reduction"] = _Reduction.legacy_get_string(a["size_average"], a["reduce"])
    if a["reduction"] not in ("none", "mean", "sum"):
        raise ValueError(f"{a['reduction']} is not a valid value for reduction")
    return a


def _shape(x):
    return x._gshape if type(x) is ST else x.shape


@rule(F.cross_entropy)
def cross_entropy(func, args, kwargs):
    a = _parse(args, kwargs, _CE, _CE_DEFAULTS)
    return _loss(func, a, nll=False)


@rule(F.nll_loss)
def nll_loss(func, args, kwargs):
    a = _parse(args, kwargs, _CE[:-1], _CE_DEFAULTS[:-1])
    a["label_smoothing"] = 0.0
    return _loss(func, a, nll=True)


def _loss(func, a, nll: bool):
    x, target, weight = a["input"], a["target"], a["weight"]
    pg = group_of(func, x, target, weight)
    xs, gx = spec_of(x), _shape(x)
    c = 1 if len(gx) > 1 else 0                         # the class dim
    prob = target.is_floating_point() and _shape(target) == gx
    serial_kw = dict(ignore_index=a["ignore_index"])
    if not nll:
        serial_kw["label_smoothing"] = a["label_smoothing"]
    wfull = None if weight is None else to_layout(weight, REPLICA, pg, func)

    if xs.is_partial and nll:                            # linear in the input: stay partial
        out = func(x._local, to_layout(target, REPLICA, pg, func), wfull,
                   reduction=a["reduction"], **serial_kw)
        return wrap(out, PARTIAL, pg, out.shape)
    if not xs.is_shard:                                  # replicated (or partial) logits
        out = func(materialize(x, func), to_layout(target, REPLICA, pg, func), wfull,
                   reduction=a["reduction"], **serial_kw)
        return wrap(out, REPLICA, pg, out.shape)
    if xs.dim != c:
        return _row_sharded(func, a, x, target, wfull, c, prob, serial_kw, pg)
    if nll:
        return _vocab_parallel_nll(func, a, x, target, wfull, c, pg)
    return _vocab_parallel_ce(func, a, x, target, wfull, c, prob, pg)


def _oshape(gx, c):
    return torch.Size(tuple(gx[:c]) + tuple(gx[c + 1:]))


def _reduce(per, reduction, denom):
    if reduction == "none":
        return per
    s = per.sum()
    return s if reduction == "sum" else s / denom


def _targets(func, target, C, ignore_index, wfull, pg, dtype):
    """Replicated class targets -> (targets, ignore mask, per-row class weight (0 if ignored))."""
    y = to_layout(target, REPLICA, pg, func)
    ignore = y == ignore_index
    bad = ~ignore & ((y < 0) | (y >= C))
    # checked without reading the value on the host (a device sync that would break CUDA-graph
    # capture): on GPU a device-side assert, as serial cross_entropy does; on CPU it raises here
    try:
        torch._assert_async(~bad.any(), f"{_trace.func_name(func)}: a target is out of bounds "
                                        f"for {C} classes")
    except RuntimeError:
        raise IndexError(f"{_trace.func_name(func)}: target {int(y[bad][0])} is out of bounds "
                         f"for {C} classes") from None
    ysafe = y.masked_fill(ignore, 0)
    if wfull is None:
        wy = (~ignore).to(dtype)
    else:
        wy = wfull.gather(0, ysafe.flatten()).view(ysafe.shape).masked_fill(ignore, 0)
    return y, ignore, ysafe, wy


def _picked(xl, lid, valid, c):
    """xl[..., lid, ...] along the class dim where `valid`, else 0 (connected to the graph even
    when this rank holds no classes)."""
    if xl.shape[c] == 0:
        return xl.sum(c)
    lid = lid.masked_fill(~valid, 0)
    return xl.gather(c, lid.unsqueeze(c)).squeeze(c).masked_fill(~valid, 0)


def _bcast_class(v, ndim, c):
    shape = [1] * ndim
    shape[c] = -1
    return v.view(shape)


def _vocab_parallel_nll(func, a, x, target, wfull, c, pg):
    xl, spec, gx = x._local, x._spec, x._gshape
    C = gx[c]
    y, ignore, ysafe, wy = _targets(func, target, C, a["ignore_index"], wfull, pg, xl.dtype)
    lid, mine = local_index(ysafe, C, spec, pg.tp_local_rank())
    per = -_picked(xl, lid, mine & ~ignore, c) * wy
    out = _reduce(per, a["reduction"], wy.sum())
    return wrap(out, PARTIAL, pg, out.shape)


def _vocab_parallel_ce(func, a, x, target, wfull, c, prob, pg):
    xl, spec, gx = x._local, x._spec, x._gshape
    C, eps, rank = gx[c], float(a["label_smoothing"]), pg.tp_local_rank()
    wl = None if wfull is None else take_shard(wfull, shard_spec(0, spec.degree, spec.stride),
                                               rank)
    # the shift: a detached global max per row (it cancels out of the loss and its gradient)
    with torch.no_grad():
        if xl.shape[c]:
            m = xl.amax(dim=c, keepdim=True)
        else:
            m = xl.new_full(tuple(1 if i == c else n for i, n in enumerate(xl.shape)), -torch.inf)
        all_reduce_(m, pg, func, "forward", reduce_op="max")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = xl - m
    parts = [z.exp().sum(c)]
    if prob:
        t = to_layout(target, spec, pg, func)
        t = t * (1 - eps) + eps / C if eps else t
        if wl is not None:
            t = t * _bcast_class(wl, t.dim(), c)
        parts += [(t * z).sum(c), t.sum(c)]
    else:
        y, ignore, ysafe, wy = _targets(func, target, C, a["ignore_index"], wfull, pg, xl.dtype)
        lid, mine = local_index(ysafe, C, spec, rank)
        parts.append(_picked(z, lid, mine & ~ignore, c))
        if eps:
            parts.append((z if wl is None else z * _bcast_class(wl, z.dim(), c)).sum(c))
    sums = reduce_from_region(torch.stack(parts), pg, func)   # the one differentiable all-reduce
    lse = sums[0].log()                                    # log-sum-exp of the shifted logits
    oshape = _oshape(gx, c)
    if prob:
        per = sums[2] * lse - sums[1]                      # -sum_c w_c t_c log p_c
        out = _reduce(per, a["reduction"], oshape.numel())   # torch: mean over the rows
        return wrap(out, REPLICA, pg, out.shape)
    zero = lse.new_zeros(())
    per = torch.where(ignore, zero, (lse - sums[1]) * wy)
    if eps:
        wsum = C if wfull is None else wfull.sum()
        smooth = torch.where(ignore, zero, wsum * lse - sums[2])
        per = (1 - eps) * per + (eps / C) * smooth
    out = _reduce(per, a["reduction"], wy.sum())
    return wrap(out, REPLICA, pg, out.shape)


def _row_sharded(func, a, x, target, wfull, c, prob, serial_kw, pg):
    """Logits sharded on a non-class dim: every row's loss is local."""
    xs, gx = x._spec, x._gshape
    tdim = xs.dim if (prob or xs.dim < c) else xs.dim - 1
    tspec = shard_spec(tdim, xs.degree, xs.stride)
    per = func(x._local, to_layout(target, tspec, pg, func), wfull, reduction="none",
               **serial_kw)
    oshape = _oshape(gx, c)
    if a["reduction"] == "none":   # the output has no class dim (probability targets do)
        odim = xs.dim if xs.dim < c else xs.dim - 1
        return wrap(per, shard_spec(odim, xs.degree, xs.stride), pg, oshape)
    if a["reduction"] == "sum":
        return wrap(per.sum(), PARTIAL, pg, torch.Size(()))
    if prob:
        denom = oshape.numel()
    else:
        denom = _targets(func, target, gx[c], a["ignore_index"], wfull, pg, per.dtype)[3].sum()
    return wrap(per.sum() / denom, PARTIAL, pg, torch.Size(()))


# --- pointwise losses: elementwise on the shards, the reduction by the reduction rules --------

_POINTWISE = tuple(f for f in (F.kl_div, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
                               F.binary_cross_entropy_with_logits, F.binary_cross_entropy,
                               F.soft_margin_loss, F.poisson_nll_loss)
                   if f is not None)
_SIGNATURES: dict = {}


@rule(*_POINTWISE)
def pointwise_loss(func, args, kwargs):
    """Losses that are elementwise before their reduction (distillation's KL divergence, MSE,
    BCE with logits, ... on vocab-sharded logits): the per-element loss is computed on the
    shards in the input's layout (`reduction='none'`), then summed or averaged by the reduction
    rules (one all-reduce). Weights are broadcast to the input's shape and sliced alike."""
    sig = _SIGNATURES.get(func) or remember(_SIGNATURES, func, inspect.signature(func))
    a = sig.bind(*args, **kwargs)
    a.apply_defaults()
    a = dict(a.arguments)
    if a.get("size_average") is not None or a.get("reduce") is not None:
        a["reduction"] = _Reduction.legacy_get_string(a.pop("size_average"), a.pop("reduce"))
    a.pop("size_average", None)
    a.pop("reduce", None)
    reduction = a.pop("reduction")
    x, t = a.pop("input"), a.pop("target")
    pg = group_of(func, x, t, *(v for v in a.values() if isinstance(v, torch.Tensor)))
    gshape = tuple(_shape(x))
    spec = next((s for s in (spec_of(x), spec_of(t)) if s.is_shard), REPLICA)
    if tuple(_shape(t)) != gshape:
        spec = REPLICA   # a broadcasting target: computed on the whole value
    for v in (x, t):
        if type(v) is ST and v._spec.is_partial:
            materialize(v, func)   # a pending sum meets a non-linear loss: reduced (once)
    xl, tl = to_layout(x, spec, pg, func), to_layout(t, spec, pg, func)
    for k, v in list(a.items()):
        if isinstance(v, torch.Tensor):   # weight, pos_weight: broadcast to the input, sliced
            full = to_layout(v, REPLICA, pg, func) if type(v) is ST else v
            a[k] = to_layout(torch.broadcast_to(full, gshape), spec, pg, func) \
                if spec.is_shard else full
    per = func(xl, tl, reduction="none", **a)
    out = wrap(per, spec, pg, gshape)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    if reduction == "mean":
        return out.mean()
    if reduction == "batchmean" and func is F.kl_div:
        return out.sum() / (gshape[0] if gshape else 1)
    raise ValueError(f"{_trace.func_name(func)}: {reduction!r} is not a valid value for reduction")
