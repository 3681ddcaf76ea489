"""`torch._foreach_*`: the optimizers' and `clip_grad_norm_`'s multi-tensor ops.

Rows (the i-th tensor of every list) whose tensors share one layout, or are all plain, run in a
single local `_foreach` call over the unwrapped shards: no communication, one kernel launch as
serially. Any other row (mixed layouts, a partial value meeting a non-linear op) goes through
the single-tensor elementwise rule of the same op. `_foreach_norm` of a sharded tensor is a
global reduction: one all-reduce of the local sums of |x|^p for all sharded tensors together
(an all-gather of local maxima for the inf-norms); it returns replicated 0-dim results.
The fused optimizer kernels (`torch._fused_adam_`, ...: `fused=True`) run once on the local
shards when every row shares its parameter's layout, and refuse anything else.
"""
from __future__ import annotations

import math

import torch

from .. import trace as _trace
from ..collectives import all_reduce_, gather_from_region, reduce_from_region
from ._util import REPLICA, ST, ShardingError, shard_spec, materialize, rule, wrap

T = torch.Tensor
Tensor = torch.Tensor

_UNARY = """abs acos asin atan ceil cos cosh erf erfc exp expm1 floor frac lgamma log log10 log1p
            log2 neg reciprocal round rsqrt sigmoid sign sin sinh sqrt tan tanh trunc""".split()
_OTHER = "add sub mul div maximum minimum clamp_min clamp_max pow addcmul addcdiv lerp".split()

# foreach function -> (single-tensor function, in place?, single function is in place?)
_SINGLE = {}
for _name in _UNARY + _OTHER:
    for _ip in (False, True):
        _f = getattr(torch, f"_foreach_{_name}{'_' if _ip else ''}", None)
        if _f is None:
            continue
        _s = getattr(T, _name + "_", None) if _ip else getattr(torch, _name)
        _SINGLE[_f] = (_s or getattr(torch, _name), _ip, _s is not None)
_SINGLE[torch._foreach_zero_] = (T.zero_, True, True)
_SINGLE[torch._foreach_copy_] = (T.copy_, True, True)
if hasattr(torch, "_foreach_clone"):
    _SINGLE[torch._foreach_clone] = (torch.clone, False, False)

_SCALARS = (torch._foreach_addcmul, torch._foreach_addcmul_, torch._foreach_addcdiv,
            torch._foreach_addcdiv_)


def _is_list(a):
    return isinstance(a, (list, tuple))


def _same_layout_rows(func, args, kwargs, inplace):
    """The optimizer's case: every tensor argument is a list of ShardedTensors whose rows share
    one non-partial layout (spec, global shape, group: a parameter, its gradient and its state
    share the very objects, so the comparisons answer on identity); numbers or lists of numbers
    elsewhere. One local `_foreach` call on the shards. None when anything else is passed.

    Kept to a few C-speed passes per list (this runs ~10 times per optimizer step): the first
    list is checked (ShardedTensor, not partial) while its shards are collected; each other list
    is compared with it as a whole (`!=` of lists of (spec, shape, group), identity first) and
    then unwrapped; a list passed twice in a row (`addcmul_(v, g, g)`) is handled once."""
    new = list(args)
    selfs = lay0 = None
    for i, a in enumerate(args):
        c = a.__class__
        if c is list or c is tuple:
            if not a or not isinstance(a[0], Tensor):
                continue  # a list of numbers (per-row scalars)
            if selfs is None:
                locs = []
                put = locs.append
                for t in a:
                    if t.__class__ is not ST or t._spec.is_partial:
                        return None
                    put(t._local)
                selfs, new[i] = a, locs
                continue
            if a is args[i - 1]:
                new[i] = new[i - 1]
                continue
            if lay0 is None:
                lay0 = [(t._spec, t._gshape, t._pg) for t in selfs]
            if [(t._spec, t._gshape, t._pg) if t.__class__ is ST else None for t in a] != lay0:
                return None  # (also a length mismatch: the general path raises torch's error)
            new[i] = [t._local for t in a]
        elif isinstance(a, Tensor):
            return None
    if selfs is None:
        return None
    if kwargs:
        for v in kwargs.values():
            if isinstance(v, (Tensor, list, tuple)):
                return None
    res = func(*new, **kwargs)
    if inplace:
        return list(selfs)
    return [wrap(loc, t._spec, t._pg, t._gshape) for loc, t in zip(res, selfs)]


_FOREACH_POWSUM = getattr(torch, "_foreach_powsum", None)   # torch >= 2.10


def _powsums(locs, ord, p: float, dtype):
    """sum |x|^p of each local tensor (p = 0: the count of nonzeros), one fused call where
    this torch has `_foreach_powsum`."""
    if _FOREACH_POWSUM is not None:
        return _FOREACH_POWSUM(locs, ord, dtype=dtype)
    out = []
    for x in locs:
        x = x if dtype is None else x.to(dtype)
        out.append((x != 0).sum().to(x.dtype) if p == 0 else x.abs().pow(p).sum())
    return out


@rule(*_SINGLE)
def foreach(func, args, kwargs):
    """One local `_foreach` call for the rows whose tensors share a layout; the rest row by row
    through the single-tensor rules."""
    single, inplace, single_inplace = _SINGLE[func]
    out = _same_layout_rows(func, args, kwargs, inplace)
    if out is not None:
        return out
    lists = [i for i, a in enumerate(args) if _is_list(a)]
    tlists = [i for i in lists if args[i] and isinstance(args[i][0], Tensor)]
    selfs = args[tlists[0]]
    n = len(selfs)
    # non-list tensor arguments (a 0-dim scale, a 1-D tensor of scalars) as local tensors
    fast_args = list(args)
    grad = torch.is_grad_enabled()
    slow_all = False
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            if type(a) is ST and a._spec.is_shard:
                slow_all = True
            else:
                fast_args[i] = materialize(a, func)
            if grad and a.requires_grad:
                slow_all = True
    scal = {i: fast_args[i] for i, a in enumerate(args) if isinstance(a, Tensor)}
    fast, slow = [], []
    for r in range(n):
        s = selfs[r]
        if slow_all:
            slow.append(r)
        elif type(s) is ST:
            sp, sh, pg = s._spec, s._gshape, s._pg
            ok = not sp.is_partial
            for li in tlists:
                t = args[li][r]
                if type(t) is not ST or (t._spec is not sp and t._spec != sp) or \
                        t._gshape != sh or t._pg is not pg:
                    ok = False
                    break
            (fast if ok else slow).append(r)
        elif all(type(args[li][r]) is not ST for li in tlists):
            fast.append(r)
        else:
            slow.append(r)

    out = [None] * n
    if fast:
        everything = len(fast) == n
        for i in lists:
            a = args[i]
            rows = a if everything else [a[r] for r in fast]
            fast_args[i] = [x._local if type(x) is ST else x for x in rows] if i in tlists else rows
        kw = kwargs
        if func in _SCALARS and not everything:  # a 1-D tensor of per-row scalars
            if len(args) > 3 and isinstance(args[3], Tensor) and args[3].dim():
                fast_args[3] = fast_args[3][fast]
            if isinstance(kwargs.get("scalars"), Tensor):
                kw = dict(kwargs, scalars=materialize(kwargs["scalars"], func)[fast])
        res = func(*fast_args, **kw)
        if not inplace:
            for r, loc in zip(fast, res):
                s = selfs[r]
                out[r] = wrap(loc, s._spec, s._pg, s._gshape) if type(s) is ST else loc
    for r in slow:
        row = []
        kw = dict(kwargs)
        for i, a in enumerate(args):
            v = a[r] if _is_list(a) else scal.get(i, a)
            if func in _SCALARS and i == 3:
                if isinstance(v, Tensor):
                    v = (v[r] if v.dim() else v).item()
                kw["value"] = v
                continue
            row.append(v)
        if func in _SCALARS and "scalars" in kw:
            sc = kw.pop("scalars")
            kw["value"] = sc[r].item() if isinstance(sc, Tensor) else sc[r]
        if inplace and not single_inplace:  # e.g. _foreach_maximum_: no Tensor.maximum_
            T.copy_(row[0], single(*row, **kw))
        else:
            out[r] = single(*row, **kw)
    return list(selfs) if inplace else out


@rule(torch._foreach_norm)
def foreach_norm(func, args, kwargs):
    """Per-tensor norms. Sharded tensors need the whole tensor's norm: the local sums of |x|^p
    of all of them are reduced together in one all-reduce (local maxima all-gathered for
    +-inf). Replicated and plain tensors are normed locally; partial ones are reduced first."""
    tensors = args[0]
    ord = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    p = float(ord)
    n = len(tensors)
    out = [None] * n
    local_rows, shard_rows = [], {}
    for r, t in enumerate(tensors):
        if type(t) is ST and t._spec.is_shard:
            shard_rows.setdefault(id(t._pg), []).append(r)
        else:
            local_rows.append(r)
    if local_rows:
        locs = [materialize(tensors[r], func) for r in local_rows]
        res = torch._foreach_norm(locs, ord, dtype=dtype)
        for r, v in zip(local_rows, res):
            t = tensors[r]
            out[r] = wrap(v, REPLICA, t._pg, torch.Size()) if type(t) is ST else v
    for rows in shard_rows.values():
        pg = tensors[rows[0]]._pg
        locs = [tensors[r]._local for r in rows]
        if math.isinf(p):
            def ext(x, big=p > 0):
                if x.numel() == 0:  # the identity of max |x| is 0, of min |x| is inf
                    return x.new_full((), 0.0 if big else math.inf, dtype=dtype or x.dtype)
                return torch.linalg.vector_norm(x, p, dtype=dtype)
            mine = torch.stack([ext(x) for x in locs])
            d, k = pg.tp_world_size(), len(rows)
            every = gather_from_region(mine, shard_spec(0, d), d * k, pg, func).view(d, k)
            norms = every.amax(0) if p > 0 else every.amin(0)
        else:
            sums = torch.stack(_powsums(locs, ord, p, dtype))
            sums = reduce_from_region(sums, pg, func, inplace=not sums.requires_grad)
            norms = sums if p == 0 else sums.pow(1.0 / p)
        for r, v in zip(rows, norms.unbind(0)):
            out[r] = wrap(v, REPLICA, pg, torch.Size())
    return out


@rule(torch._amp_foreach_non_finite_check_and_unscale_)
def amp_unscale(func, args, kwargs):
    """`GradScaler.unscale_`: every gradient shard is unscaled in place and checked locally; then
    `found_inf` is maxed over the tensor-parallel group of the sharded gradients (one 4-byte
    all-reduce, as Megatron's optimizer does over its model-parallel group), so every rank
    skips or takes the step alike: an inf in one rank's shard is an inf in the serial
    gradient."""
    names = ("self", "found_inf", "inv_scale")
    grads, found_inf, inv_scale = (list(args) + [kwargs.get(n) for n in names[len(args):]])[:3]
    if type(found_inf) is ST or type(inv_scale) is ST:
        raise ShardingError(f"{func.__name__}: found_inf and inv_scale must be plain tensors "
                            f"(GradScaler's own), got {type(found_inf).__name__} and "
                            f"{type(inv_scale).__name__}")
    groups = {}
    for g in grads:
        if type(g) is ST:
            groups.setdefault(id(g._pg), g._pg)
    func([g._local if type(g) is ST else g for g in grads], found_inf, inv_scale)
    for pg in groups.values():
        all_reduce_(found_inf, pg, func, "backward", reduce_op="max")


# --- fused optimizer kernels ----------------------------------------------------------------------

def _fused_kernels():
    """torch's fused optimizer steps (`torch._fused_adam_`, `_fused_adamw_`, `_fused_sgd_`,
    `_fused_adagrad_`, and any other this torch has), told apart from other `_fused_*` ops by
    their schema: in place, the params list then the grads list. -> {function: argument names}"""
    out = {}
    for name in dir(torch):
        if not (name.startswith("_fused_") and name.endswith("_")):
            continue
        try:
            names = tuple(a.name for a in getattr(torch.ops.aten, name).default._schema.arguments)
        except (AttributeError, RuntimeError):
            continue
        if names[:2] == ("self", "grads"):
            out[getattr(torch, name)] = names
    return out


_FUSED = _fused_kernels()


def _layout(t) -> str:
    if t.__class__ is ST:
        return f"{t._spec!r} of global shape {tuple(t._gshape)}"
    return f"a plain tensor of shape {tuple(t.shape)}"


def _fused_row_error(func, row: int, pname: str, p, name: str, t, why: str):
    return ShardingError(
        f"{_trace.func_name(func)}: row {row} does not share one layout: {pname}[{row}] is "
        f"{_layout(p)}, {name}[{row}] is {_layout(t)}; {why}")


def _fused_list(func, name: str, ts, params, pname: str, back: list):
    """The local tensors of one tensor list of a fused step, checked row by row against the
    params: a ShardedTensor must have its parameter's layout (spec, global shape, group); a plain
    tensor is a per-parameter scalar (the step count) beside a sharded parameter, or anything
    beside a plain one (an all-plain row). Lists of another length go to torch unchecked.

    The CPU kernels read every tensor as contiguous memory (a strided one gets a wrong update),
    and a shard is often a strided slice of the full tensor (`from_global` on a non-leading
    dim): such a tensor goes in as a contiguous copy, recorded in `back` to be copied back."""
    if ts is params:
        locs = [t._local if t.__class__ is ST else t for t in ts]
        return _contiguous(locs, back)
    check = len(ts) == len(params)
    locs = []
    put = locs.append
    for r, t in enumerate(ts):
        p = params[r] if check else None
        if t.__class__ is ST:
            if check and (p.__class__ is not ST or (t._spec is not p._spec and t._spec != p._spec)
                          or t._gshape != p._gshape or (t._pg is not p._pg and t._pg != p._pg)):
                raise _fused_row_error(func, r, pname, p, name, t,
                                       "every list's row must be laid out like its parameter")
            put(t._local)
        else:
            if p.__class__ is ST and t.dim():
                raise _fused_row_error(func, r, pname, p, name, t,
                                       "beside a ShardedTensor parameter a plain tensor can only "
                                       "be a 0-dim per-parameter value (a step count)")
            put(t)
    return _contiguous(locs, back)


def _contiguous(locs, back: list):
    for r, t in enumerate(locs):
        if not t.is_contiguous():
            locs[r] = c = t.contiguous()
            back.append((t, c))
    return locs


def _fused_scalar(func, name: str, v):
    """A tensor argument that is not a list (lr, grad_scale, found_inf): one replicated value."""
    if v.__class__ is not ST:
        return v
    if not v._spec.is_replicate:
        raise ShardingError(f"{_trace.func_name(func)}: {name}= must be a replicated value, got "
                            f"{v._spec!r}")
    return v._local


@rule(*_FUSED)
def fused_step(func, args, kwargs):
    """`optimizer.step()` with fused=True: one fused kernel on the local shards, no communication,
    as serially. Every tensor list's rows must share the params' layout (their gradients and
    states do: they are made from the parameters); a step count may be plain; other arguments
    (hyper-parameters, lr/grad_scale/found_inf tensors) pass through. A partial parameter, or a
    row laid out otherwise, is a ShardingError: a fused kernel cannot redistribute a row (the
    foreach path, fused=False, does)."""
    names = _FUSED[func]
    params = args[0] if args else kwargs["self"]
    pname = names[0]
    for r, p in enumerate(params):
        if p.__class__ is ST and p._spec.is_partial:
            raise ShardingError(f"{_trace.func_name(func)}: row {r}: {pname}[{r}] is "
                                f"{_layout(p)}; a fused optimizer step needs non-partial "
                                f"parameters (reduce the value first)")
    new, kw, back = list(args), dict(kwargs), []
    for i, a in enumerate(args):
        name = names[i] if i < len(names) else f"argument {i}"
        if _is_list(a) and a and isinstance(a[0], Tensor):
            new[i] = _fused_list(func, name, a, params, pname, back)
        elif isinstance(a, Tensor):
            new[i] = _fused_scalar(func, name, a)
    for k, v in kwargs.items():
        if _is_list(v) and v and isinstance(v[0], Tensor):
            kw[k] = _fused_list(func, k, v, params, pname, back)
        elif isinstance(v, Tensor):
            kw[k] = _fused_scalar(func, k, v)
    out = func(*new, **kw)
    for t, c in back:   # the kernel updated contiguous copies of strided shards
        t.copy_(c)
    return out
