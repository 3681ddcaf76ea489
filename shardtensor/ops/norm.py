"""Normalisation: F.layer_norm and F.rms_norm; F.batch_norm, F.group_norm, F.instance_norm;
weight normalisation's norm_except_dim and _weight_norm.

Normalised dims not sharded (the input sharded on batch or sequence): the local op, with the
weight and bias replicated (their gradients summed over the ranks). Normalised dims sharded
(Megatron's hidden-sharded norms): the statistics are summed over the group, two-pass for the
variance (mean first, then squared deviations: one more all-reduce than E[x^2]-E[x]^2, but no
cancellation), and the weight and bias are used in the input's layout (a plain one is sliced
locally). RMS norm written out in model code (`h.pow(2).mean(-1, keepdim=True)`, `rsqrt`) goes
through the elementwise rules and the mean rule instead.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from functools import lru_cache

from ..collectives import all_reduce_, copy_to_region, redistribute_local
from ..spec import shard_ranges
from ._util import (REPLICA, ST, shard_spec, allreduce_for_shards, group_of, materialize,
                    remember, rule, spec_of, to_layout, unwrap, wrap)

_LOW = (torch.float16, torch.bfloat16)


def _param(p, x_spec, nd, k, pg, func):
    """Weight or bias (shape = the normalised shape) in the layout the local op needs."""
    if p is None:
        return None
    if x_spec.is_shard and x_spec.dim >= nd - k:     # shard it like the input's normalised dims
        spec = shard_spec(x_spec.dim - (nd - k), x_spec.degree, x_spec.stride)
        return to_layout(p, spec, pg, func)
    local = to_layout(p, REPLICA, pg, func)
    # a replicated parameter applied to a sharded input: its gradient is a sum over the ranks
    return copy_to_region(local, pg, func) if x_spec.is_shard else local


def _norm_args(func, args, kwargs, names):
    vals = dict(zip(("input", "normalized_shape") + names, args))
    vals.update(kwargs)
    return vals


def _input(x, func):
    """(local, layout, global shape) of a norm's input; a pending sum is reduced first."""
    if type(x) is ST:
        local = materialize(x, func)      # rebinds a partial x: its layout reads replicated
        return local, x._spec, x._gshape
    return x, REPLICA, x.shape


@rule(F.layer_norm, torch.layer_norm)
def layer_norm(func, args, kwargs):
    v = _norm_args(func, args, kwargs, ("weight", "bias", "eps"))
    x, shape = v["input"], tuple(v["normalized_shape"])
    w, b, eps = v.get("weight"), v.get("bias"), v.get("eps", 1e-5)
    pg = group_of(func, x, w, b)
    local, xs, g = _input(x, func)
    nd, k = len(g), len(shape)
    wl, bl = _param(w, xs, nd, k, pg, func), _param(b, xs, nd, k, pg, func)
    if not (xs.is_shard and xs.dim >= nd - k):
        return wrap(F.layer_norm(local, shape, wl, bl, eps), xs, pg, g)
    dims = tuple(range(nd - k, nd))
    count = math.prod(shape)
    h = local.float() if local.dtype in _LOW else local
    mean = allreduce_for_shards(h.sum(dims, keepdim=True), pg, func) / count
    c = h - mean
    var = allreduce_for_shards((c * c).sum(dims, keepdim=True), pg, func) / count
    y = c * torch.rsqrt(var + eps)
    if wl is not None:
        y = y * wl
    if bl is not None:
        y = y + bl
    # the affine in the statistics' precision, cast once: torch's dtype (the input's, also
    # with float32 weights on a bfloat16 input) and its rounding
    return wrap(y.to(local.dtype), xs, pg, g)


if hasattr(F, "rms_norm"):
    @rule(F.rms_norm, *([torch.rms_norm] if hasattr(torch, "rms_norm") else []))
    def rms_norm(func, args, kwargs):
        v = _norm_args(func, args, kwargs, ("weight", "eps"))
        x, shape = v["input"], tuple(v["normalized_shape"])
        w, eps = v.get("weight"), v.get("eps")
        pg = group_of(func, x, w)
        local, xs, g = _input(x, func)
        nd, k = len(g), len(shape)
        wl = _param(w, xs, nd, k, pg, func)
        if not (xs.is_shard and xs.dim >= nd - k):
            return wrap(F.rms_norm(local, shape, wl, eps), xs, pg, g)
        if eps is None:
            eps = _rms_norm_eps(local.dtype)
        dims = tuple(range(nd - k, nd))
        if local.dtype in _LOW and _rms_norm_composite():
            # torch 2.4's composite, in the input's dtype: pow(x, 2), a mean summed in float32
            # and rounded, eps rounded, rsqrt, x * it (then the weight, promoting): its rounding
            sq = (local * local).float().sum(dims, keepdim=True)
            ms = (allreduce_for_shards(sq, pg, func) / math.prod(shape)).to(local.dtype)
            y = local * torch.rsqrt(ms + float(torch.tensor(eps, dtype=local.dtype)))
            return wrap(y if wl is None else y * wl, xs, pg, g)
        h = local.float() if local.dtype in _LOW else local
        ms = allreduce_for_shards((h * h).sum(dims, keepdim=True), pg, func) / math.prod(shape)
        y = h * torch.rsqrt(ms + eps)
        if wl is None:
            return wrap(y.to(local.dtype), xs, pg, g)
        out = _rms_norm_dtype(local.dtype, wl.dtype)
        if out == local.dtype:      # torch >= 2.5's kernel: weight applied upcast, cast once
            return wrap((y * wl).to(out), xs, pg, g)
        return wrap(y.to(local.dtype) * wl, xs, pg, g)   # torch 2.4's composite: promoted


@lru_cache(maxsize=1)
def _rms_norm_composite() -> bool:
    """Whether serial F.rms_norm is torch 2.4's composite, computing in the input's dtype (it
    promotes a bfloat16 input times a float32 weight; later kernels compute in float32)."""
    return _rms_norm_dtype(torch.bfloat16, torch.float32) == torch.float32


@lru_cache(maxsize=16)
def _rms_norm_eps(dtype: torch.dtype) -> float:
    """The eps serial F.rms_norm adds when given none: torch 2.4 takes the input dtype's
    epsilon, later kernels their compute dtype's (float32's for a bfloat16/float16 input)."""
    x = torch.full((1, 1), 0.01, dtype=dtype)
    ref = F.rms_norm(x, (1,))
    for eps in (torch.finfo(dtype).eps, torch.finfo(torch.float32).eps):
        if torch.equal(F.rms_norm(x, (1,), None, eps), ref):
            return eps
    return torch.finfo(dtype).eps


@lru_cache(maxsize=64)
def _rms_norm_dtype(x: torch.dtype, w: torch.dtype) -> torch.dtype:
    """The dtype serial F.rms_norm returns for an input and weight of these dtypes (torch 2.4
    promotes a bfloat16 input times a float32 weight to float32; later kernels keep bfloat16)."""
    with warnings.catch_warnings():   # (torch >= 2.5: 'Mismatch dtype between input and weight')
        warnings.simplefilter("ignore")
        return F.rms_norm(torch.ones(1, 2, dtype=x), (2,), torch.ones(2, dtype=w)).dtype


# --- batch norm ----------------------------------------------------------------------------------

def _affine(y, wl, bl):
    """y * weight + bias per channel (dim 1), either absent. Callers cast the result to the
    input's dtype, as torch's norms return it (a bfloat16 input with float32 weights: bfloat16,
    the affine computed in float32 as torch computes it)."""
    shape = (-1,) + (1,) * (y.dim() - 2)
    y = y if wl is None else y * wl.reshape(shape)
    return y if bl is None else y + bl.reshape(shape)


def _no_channel(local, wl, bl):
    """A rank holding no channel (uneven shards; torch refuses or misreads): keep the weight and
    bias in the graph, whose backward collectives every rank joins."""
    out = local.clone()
    for p in (wl, bl):
        out = out if p is None else out + p.sum()
    return out


@rule(F.batch_norm)
def batch_norm(func, args, kwargs):
    """Statistics per channel (dim 1). Channel-sharded input (after a column-parallel conv):
    local, the weight, bias and running statistics in its layout; running statistics held whole
    (an nn.BatchNorm's buffers) are updated through this rank's slice, then the slices of every
    rank are gathered back into them (one all-gather of 2 x channels per training step).
    Replicated input: local. Input sharded on another dim (the batch: data split within the
    group; uneven shards too): local with the running statistics (eval); in training the batch
    statistics are SyncBatchNorm's, over every rank's values (`_synced_batch_norm`)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
    v = dict(zip(names, args))
    v.update(kwargs)
    x, rm, rv, w, b = (v.get(k) for k in names[:5])
    training, momentum, eps = v.get("training", False), v.get("momentum", 0.1), v.get("eps", 1e-5)
    pg = group_of(func, x, rm, rv, w, b)
    local, xs, g = _input(x, func)
    synced = training and xs.is_shard and xs.dim != 1 and len(g) > 1   # 1-D: no channel dim
    if synced and math.prod(g) // g[1] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{g}")                         # torch's check, on the global shape
    ps = shard_spec(0, xs.degree, xs.stride) if xs.is_shard and xs.dim == 1 else REPLICA
    wl, bl = (None if p is None else _channel_param(p, ps, xs, pg, func) for p in (w, b))
    stats = [_running(t, ps, pg, func) for t in (rm, rv)]
    if synced:
        out = _synced_batch_norm(local, g, stats[0][0], stats[1][0], wl, bl, momentum, eps, pg,
                                 func)
    elif local.dim() < 2 or local.shape[1]:
        out = F.batch_norm(local, stats[0][0], stats[1][0], wl, bl, training, momentum, eps)
    else:
        out = _no_channel(local, wl, bl)
    if training:
        _write_back([s for s in stats if s[1] is not None], ps, pg, func)
    return wrap(out, xs, pg, g)


def _synced_batch_norm(local, g, rm, rv, wl, bl, momentum, eps, pg, func):
    """Training-mode batch norm of an input split over the ranks on a dim other than the
    channels, as SyncBatchNorm computes it: the mean and then the variance (two passes: no
    cancellation) summed over the group (one all-reduce of `channels` numbers each, and one
    each backward: the gradient's two sums), the running statistics updated with the global
    values (unbiased variance, as serial)."""
    dims = (0,) + tuple(range(2, local.dim()))
    count = math.prod(g) // g[1]
    h = local.float() if local.dtype in _LOW else local
    mean = allreduce_for_shards(h.sum(dims, keepdim=True), pg, func) / count
    c = h - mean
    var = allreduce_for_shards((c * c).sum(dims, keepdim=True), pg, func) / count
    y = _affine(c * torch.rsqrt(var + eps), wl, bl).to(local.dtype)
    with torch.no_grad():
        if rm is not None:
            rm.mul_(1 - momentum).add_(mean.reshape(-1).to(rm.dtype), alpha=momentum)
        if rv is not None:
            unbiased = var.reshape(-1) * (count / (count - 1))
            rv.mul_(1 - momentum).add_(unbiased.to(rv.dtype), alpha=momentum)
    return y


def _channel_param(p, ps, xs, pg, func):
    local = to_layout(p, ps, pg, func)
    # replicated, applied to an input sharded on another dim: its gradient is a sum over ranks
    return copy_to_region(local, pg, func) if xs.is_shard and ps.is_replicate else local


def _running(t, spec, pg, func):
    """(local tensor of running statistic `t` in layout `spec`, for F.batch_norm to update in
    place; `t` when that tensor is not `t`'s own memory, else None)."""
    if t is None or spec_of(t) == spec:
        return unwrap(t), None
    with torch.no_grad():
        return to_layout(t, spec, pg, func).clone(), t


def _write_back(stats, spec, pg, func):
    """Copy updated running statistics (local, target) from layout `spec` into their targets'
    layouts: the plain buffers of one BatchNorm in one all-gather."""
    with torch.no_grad():
        if len(stats) == 2 and all(spec_of(t) == REPLICA for _, t in stats) and spec.is_shard:
            both = torch.stack([l for l, _ in stats], 1)
            full = redistribute_local(both, spec, REPLICA, (stats[0][1].shape[0], 2), pg, func)
            for i, (_, t) in enumerate(stats):
                unwrap(t).copy_(full[:, i])
            return
        for local, t in stats:
            unwrap(t).copy_(redistribute_local(local, spec, spec_of(t), t.shape, pg, func))


# --- group norm, instance norm -------------------------------------------------------------------

_CHECKED: dict = {}


def _check_on_meta(key, call, *shapes):
    """torch's own checks (and messages) of a norm call, run once per global shapes on meta
    tensors: every rank raises before anything is computed."""
    if key not in _CHECKED:
        call(*[None if s is None else torch.empty(s, device="meta") for s in shapes])
        remember(_CHECKED, key, True)


def _shape(t):
    return None if t is None else tuple(t._gshape if type(t) is ST else t.shape)


@lru_cache(maxsize=1024)
def _whole_groups(c: int, groups: int, spec) -> bool:
    """Does every rank's share of `c` channels laid out by `spec` hold whole groups?"""
    size = c // groups
    return all(start % size == 0 and length % size == 0 for r in range(spec.degree)
               for start, length in shard_ranges(c, spec.degree, spec.stride, r))


@lru_cache(maxsize=1024)
def _channel_index(c: int, spec, rank: int, device: torch.device) -> torch.Tensor:
    """This rank's channel numbers, made once per device (a host-to-device copy per call would
    cost a GPU copy every step and cannot be captured in a CUDA graph)."""
    return torch.cat([torch.arange(s, s + n) for s, n in shard_ranges(c, spec.degree,
                                                                       spec.stride, rank)]).to(device)


def _synced_group_stats(h, xs, g, groups, eps, pg, func):
    """Group norm of `h` (this rank's piece of an input sharded on its channels, groups
    straddling the shards, or on a spatial dim) with the statistics of each (sample, group)
    summed over the ranks: the mean, then the squared deviations (one all-reduce of samples x
    channels each, one each backward) -> (normalised h, mean, biased variance), the last two
    per sample and local channel."""
    n, c = g[0], g[1]
    size = c // groups
    spatial = tuple(range(2, h.dim()))
    count = size * math.prod(g[2:])
    idx = _channel_index(c, xs, pg.tp_local_rank(), h.device) if xs.dim == 1 else None

    def per_group(part):            # this rank's per-channel sums -> its channels' group means
        full = part if idx is None else part.new_zeros(n, c).index_add(1, idx, part)
        total = allreduce_for_shards(full, pg, func).reshape(n, groups, size).sum(-1) / count
        total = total.repeat_interleave(size, 1)
        return total if idx is None else total.index_select(1, idx)

    shape = (n, -1) + (1,) * len(spatial)
    mean = per_group(h.sum(spatial) if spatial else h)
    dev = h - mean.reshape(shape)
    var = per_group((dev * dev).sum(spatial) if spatial else dev * dev)
    return dev * torch.rsqrt(var.reshape(shape) + eps), mean, var


@rule(F.group_norm)
def group_norm(func, args, kwargs):
    """Statistics per sample and group of channels. Batch-sharded or replicated input: local
    (weight and bias replicated). Channel-sharded input where every rank holds whole groups
    (uneven shards too, when the groups fall on the shard boundaries): local over this rank's
    groups, weight and bias in the channels' layout. Groups straddling the shards, or an input
    sharded on a spatial dim: the statistics are summed over the group (two all-reduces of
    samples x channels numbers forward, two backward)."""
    v = dict(zip(("input", "num_groups", "weight", "bias", "eps"), args))
    v.update(kwargs)
    x, groups, w, b = v["input"], v["num_groups"], v.get("weight"), v.get("bias")
    eps = v.get("eps", 1e-5)
    pg = group_of(func, x, w, b)
    shapes = [_shape(t) for t in (x, w, b)]
    _check_on_meta((func, groups, *shapes), lambda *t: F.group_norm(t[0], groups, *t[1:]),
                   *shapes)
    local, xs, g = _input(x, func)
    ps = shard_spec(0, xs.degree, xs.stride) if xs.is_shard and xs.dim == 1 else REPLICA
    wl, bl = (None if p is None else _channel_param(p, ps, xs, pg, func) for p in (w, b))
    # torch.group_norm: F.group_norm's size check was made on the global shape, not this piece's
    if not xs.is_shard or xs.dim == 0:
        return wrap(torch.group_norm(local, groups, wl, bl, eps), xs, pg, g)
    if xs.dim == 1 and _whole_groups(g[1], groups, xs):
        here = local.shape[1] // (g[1] // groups)
        out = torch.group_norm(local, here, wl, bl, eps) if here else _no_channel(local, wl, bl)
        return wrap(out, xs, pg, g)
    h = local.float() if local.dtype in _LOW else local
    y = _synced_group_stats(h, xs, g, groups, eps, pg, func)[0]
    return wrap(_affine(y, wl, bl).to(local.dtype), xs, pg, g)


@rule(F.instance_norm)
def instance_norm(func, args, kwargs):
    """Statistics per sample and channel. Channel-sharded, batch-sharded or replicated input:
    local, weight, bias and running statistics in the channels' layout (or replicated); whole
    running statistics (an nn.InstanceNorm's buffers) of a channel-sharded input are updated
    through this rank's slice and gathered back (one all-gather of 2 x channels), of a
    batch-sharded one averaged over the ranks' samples (one all-reduce of 2 x channels), as
    serial's mean over the batch. Sharded on a spatial dim with input statistics: summed over
    the group (two all-reduces of samples x channels numbers forward, two backward)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
             "momentum", "eps")
    v = dict(zip(names, args))
    v.update(kwargs)
    x, rm, rv, w, b = (v.get(k) for k in names[:5])
    use, momentum = v.get("use_input_stats", True), v.get("momentum", 0.1)
    eps = v.get("eps", 1e-5)
    pg = group_of(func, x, rm, rv, w, b)
    shapes = [_shape(t) for t in (x, rm, rv, w, b)]
    _check_on_meta((func, use, *shapes), lambda *t: F.instance_norm(*t, use_input_stats=use),
                   *shapes)
    local, xs, g = _input(x, func)
    ps = shard_spec(0, xs.degree, xs.stride) if xs.is_shard and xs.dim == 1 else REPLICA
    wl, bl = (None if p is None else _channel_param(p, ps, xs, pg, func) for p in (w, b))
    stats = [_running(t, ps, pg, func) for t in (rm, rv)]
    tracked = use and rm is not None
    rml, rvl = stats[0][0], stats[1][0]
    if xs.is_shard and xs.dim >= 2 and use:
        h = local.float() if local.dtype in _LOW else local
        y, mean, var = _synced_group_stats(h, xs, g, g[1], eps, pg, func)
        out = _affine(y, wl, bl).to(local.dtype)
        count = math.prod(g[2:])
        with torch.no_grad():      # serial's: per-sample statistics, averaged over the batch
            for t, new in ((rml, mean), (rvl, var * (count / (count - 1)))):
                if t is not None:
                    t.mul_(1 - momentum).add_(new.mean(0).to(t.dtype), alpha=momentum)
    elif xs.is_shard and xs.dim == 0 and tracked:
        # serial's running statistics move by the batch's mean of per-sample statistics: this
        # rank's samples' update, weighted by their share of the batch, summed over the ranks
        n = local.shape[0]
        out = (F.instance_norm(local, rml, rvl, wl, bl, use, momentum, eps) if local.numel()
               else _no_channel(local, wl, bl))
        with torch.no_grad():
            held = [t for t in (rml, rvl) if t is not None]
            both = all_reduce_(torch.stack(held) * (n / g[0]), pg, func)
            for t, new in zip(held, both):
                t.copy_(new)
    elif local.numel() or not xs.is_shard:
        out = F.instance_norm(local, rml, rvl, wl, bl, use, momentum, eps)
    else:
        out = _no_channel(local, wl, bl)   # (torch refuses a piece without samples or channels)
    if tracked:
        _write_back([s for s in stats if s[1] is not None], ps, pg, func)
    return wrap(out, xs, pg, g)


# --- weight normalisation (torch.nn.utils.parametrizations.weight_norm, nn.utils.weight_norm) ---

@rule(torch.norm_except_dim)
def norm_except_dim(func, args, kwargs):
    """The norm of every slice along `dim` (dim=-1: of the whole tensor), written with the norm
    rule: a sharded dim among those reduced costs one all-reduce, a sharded `dim` none."""
    b = dict(zip(("v", "pow", "dim"), args))
    b.update(kwargs)
    x, p, dim = b["v"], b.get("pow", 2), b.get("dim", 0)
    if dim == -1:
        return torch.linalg.vector_norm(x, p)
    nd = x.dim()
    dims = tuple(i for i in range(nd) if i != dim % nd)
    return torch.linalg.vector_norm(x, p, dims, keepdim=True) if dims else x.abs()


@rule(torch._weight_norm)
def weight_norm(func, args, kwargs):
    """w = v * (g / ||v||) per slice along `dim`, as torch's unfused _weight_norm computes it,
    through the elementwise and norm rules (g in v's layout, or replicated)."""
    b = dict(zip(("v", "g", "dim"), args))
    b.update(kwargs)
    v = b["v"]
    return v * (b["g"] / torch.norm_except_dim(v, 2, b.get("dim", 0)))


@rule(F.normalize)
def normalize(func, args, kwargs):
    """x / max(||x||_p along dim, eps), as F.normalize computes it, through the norm and
    elementwise rules (a sharded `dim` costs one all-reduce); `out=` is written with copy_."""
    b = dict(zip(("input", "p", "dim", "eps", "out"), args))
    b.update(kwargs)
    x = b["input"]
    denom = torch.linalg.vector_norm(x, b.get("p", 2.0), b.get("dim", 1), keepdim=True)
    y = x / denom.clamp_min(b.get("eps", 1e-12))
    out = b.get("out")
    return y if out is None else out.copy_(y)
