"""Views and layout-only ops: reshape family, transposes, squeeze/unsqueeze, expand, repeat,
roll, flip, contiguous.

A view keeps the shard wherever the local shards are themselves a view of the global one (the
common cases: a sharded hidden dim split into (heads, head_dim) on head boundaries, heads merged
back, a fused q|k|v dim viewed as (3, heads, head_dim)); it communicates otherwise (gather, view,
re-shard), never silently. Replicated and partial values (views are linear) stay local.
"""
from __future__ import annotations

import weakref
from functools import lru_cache
from math import prod
from typing import Sequence, Tuple

import torch

from ..dispatch import UnsupportedOpError
from ..spec import local_shape, part_sizes
from ..tensor import OWN_ATTRS as _OWN, RESHAPED, copy_view
from ._util import REPLICA, ST, ShardSpec, shard_spec, remember, rule, to_layout, wrap

T = torch.Tensor


# --- the reshape plan ---------------------------------------------------------------------------

def _groups(ishape, oshape):
    """Runs of consecutive input and output dims with equal products: [(in_dims, out_dims)]."""
    out, i, j, ni, no = [], 0, 0, len(ishape), len(oshape)
    while i < ni or j < no:
        ins, outs, pi, po = [], [], 1, 1
        if i < ni:
            ins.append(i); pi *= ishape[i]; i += 1
        if j < no:
            outs.append(j); po *= oshape[j]; j += 1
        while pi != po:
            if pi < po:
                ins.append(i); pi *= ishape[i]; i += 1
            else:
                outs.append(j); po *= oshape[j]; j += 1
        out.append((ins, outs))
    return out


def _runs_match(block: int, n: int, inner: int, size: int, stride: int) -> bool:
    """Whether the parts of a dim of `size` (stride `stride`) times `inner` trailing elements are
    exactly the parts of its flattened blocks of `block` elements."""
    return part_sizes(block, n) == tuple(inner * p for p in part_sizes(size // stride, n))


@lru_cache(maxsize=4096)
def reshape_plan(ishape: Tuple[int, ...], spec: ShardSpec, oshape: Tuple[int, ...]):
    """(output spec, True) when every rank's shard reshapes locally into its output shard;
    (spec to re-shard to after gathering, False) otherwise."""
    d, n, s = spec.dim, spec.degree, spec.stride
    if prod(ishape) == 0:
        return REPLICA, False
    for ins, outs in _groups(ishape, oshape):
        if d not in ins:
            continue
        if len(ins) == 1 and len(outs) == 1:
            return shard_spec(outs[0], n, s), True
        a = [ishape[k] for k in ins]
        j = ins.index(d)
        S = prod(a[:j]) * s                      # the group, flattened, is sharded with stride S
        block = prod(a) // S
        if _runs_match(block, n, prod(a[j + 1:]), a[j], s):
            c = [oshape[k] for k in outs]
            found = []
            for jj in range(len(c)):
                outer = prod(c[:jj])
                if S % outer or c[jj] % (S // outer):
                    continue
                if _runs_match(block, n, prod(c[jj + 1:]), c[jj], S // outer):
                    found.append(jj)
            if found:
                # prefer a real dim, then the smallest stride (a plain shard of the heads dim)
                jj = min(found, key=lambda k: (c[k] == 1, S // prod(c[:k])))
                return shard_spec(outs[jj], n, S // prod(c[:jj])), True
        target = next((k for k in outs if oshape[k] > 1), None)
        return (REPLICA if target is None else shard_spec(target, n)), False
    raise AssertionError("unreachable")


def _infer(shape, numel: int, where: str) -> Tuple[int, ...]:
    shape = tuple(int(v) for v in shape)
    if -1 in shape:
        k = shape.index(-1)
        rest = prod(shape[:k] + shape[k + 1:])
        if rest == 0 or numel % rest:
            raise RuntimeError(f"shape '{list(shape)}' is invalid for input of size {numel}")
        shape = shape[:k] + (numel // rest,) + shape[k + 1:]
    if prod(shape) != numel:
        raise RuntimeError(f"{where}: shape '{list(shape)}' is invalid for input of size {numel}")
    return shape


def _shape_args(args) -> Sequence[int]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return args[0]
    return args


_LOCAL_RESHAPES: dict = {}


def reshape_to(x, oshape, func, view: bool):
    """`x` reshaped to the global shape `oshape` (resolved): the shared body of the view family."""
    gshape, spec = x._gshape, x._spec
    if not spec.is_shard:
        # local == global: torch resolves -1 and checks the size (its own error messages)
        local = x._local.view(oshape) if view else x._local.reshape(oshape)
        return wrap(local, spec, x._pg, local.shape)
    # a reshape that was local before: (global out shape, spec, local shape) from the cache
    key = (gshape, spec, tuple(oshape), x._pg.tp_local_rank())
    for v in key[2]:
        if type(v) is not int:
            key = None
            break
    hit = _LOCAL_RESHAPES.get(key) if key is not None else None
    if hit is not None:
        oshape, out, lshape = hit
        local = x._local
        try:
            local = local.view(lshape) if view else local.reshape(lshape)
        except RuntimeError:   # the shard is a non-contiguous slice where the global tensor is not
            if spec.degree == 1:   # (unless the shard is the whole tensor: serial's error)
                raise
            return _copied_view(wrap(local.reshape(lshape), out, x._pg, oshape), x, view)
        return wrap(local, out, x._pg, oshape)
    oshape = _infer(oshape, prod(gshape), "view")
    out, local_ok = reshape_plan(tuple(gshape), spec, oshape)
    if local_ok:
        lshape = local_shape(oshape, out, x._pg.tp_local_rank())
        if key is not None:
            remember(_LOCAL_RESHAPES, key, (torch.Size(oshape), out, lshape))
        local = x._local
        try:
            local = local.view(lshape) if view else local.reshape(lshape)
        except RuntimeError:   # the shard is a non-contiguous slice where the global tensor is not
            if spec.degree == 1:   # (unless the shard is the whole tensor: serial's error)
                raise
            return _copied_view(wrap(local.reshape(lshape), out, x._pg, oshape), x, view)
        return wrap(local, out, x._pg, oshape)
    if spec.degree == 1:   # the shard is the whole tensor: serial's view (or its error)
        local = x._local.view(oshape) if view else x._local.reshape(oshape)
        return wrap(local, REPLICA, x._pg, oshape)
    full = to_layout(x, REPLICA, x._pg, func).reshape(oshape)
    local = to_layout(full, out, x._pg, func)
    if view and local._base is not None:   # (a view of a collective's output cannot be
        local = local.clone()              # written in place under autograd)
    return _copied_view(wrap(local, out, x._pg, oshape), x, view)


def _copied_view(out, x, view: bool):
    """`out`, computed as a copy where serial code gets the view `x.view(shape)`: registered
    so that an in-place op on it is written back into x (tensor.copy_view; orthogonal_ fills a
    weight through `weight.view_as(q).copy_(q)`). A reshape may copy in serial code too."""
    return copy_view(out, x, RESHAPED) if view else out


@rule(T.view)
def view(func, args, kwargs):
    x, rest = args[0], args[1:] or tuple(kwargs.values())
    if len(rest) == 1 and isinstance(rest[0], torch.dtype):
        return _view_dtype(x, rest[0])
    return reshape_to(x, _shape_args(rest), func, view=True)


@rule(T.reshape, torch.reshape)
def reshape(func, args, kwargs):
    x, rest = args[0], args[1:] or tuple(kwargs.values())
    return reshape_to(x, _shape_args(rest), func, view=False)


@rule(T.view_as, T.reshape_as)
def view_as(func, args, kwargs):
    x, other = args[0], args[1] if len(args) > 1 else kwargs["other"]
    shape = other._gshape if type(other) is ST else other.shape
    if type(x) is not ST:   # plain.view_as(sharded): a replicated value stays plain
        return x.view(shape) if func is T.view_as else x.reshape(shape)
    return reshape_to(x, shape, func, view=func is T.view_as)


def _view_dtype(x, dtype):
    old, new = x.dtype.itemsize, torch.empty((), dtype=dtype).element_size()
    nd = len(x._gshape)
    if old != new and x._spec.is_shard and x._spec.dim == nd - 1:
        raise UnsupportedOpError(f"Tensor.view({dtype}): changing the element size along the "
                                 f"sharded last dim ({x._spec!r}) is not supported; "
                                 f"redistribute first")
    if old != new and x._spec.is_partial:
        raise UnsupportedOpError(f"Tensor.view({dtype}) of a PartialSpec value reinterprets "
                                 f"summands; materialise it first (.redistribute(ReplicaSpec()))")
    shape = tuple(x._gshape)
    if nd and old != new:
        shape = shape[:-1] + (shape[-1] * old // new,)
    return wrap(x._local.view(dtype), x._spec, x._pg, shape)


@rule(T.flatten, torch.flatten)
def flatten(func, args, kwargs):
    x = args[0]
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    g = tuple(x._gshape)
    if not g:
        return reshape_to(x, (1,), func, view=False)
    start, end = start % len(g), end % len(g)
    return reshape_to(x, g[:start] + (prod(g[start:end + 1]),) + g[end + 1:], func, view=False)


@rule(T.unflatten, torch.unflatten)
def unflatten(func, args, kwargs):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs["dim"]
    sizes = args[2] if len(args) > 2 else kwargs["sizes"]
    g = tuple(x._gshape)
    dim %= len(g)
    sizes = _infer(sizes, g[dim], "unflatten")
    return reshape_to(x, g[:dim] + sizes + g[dim + 1:], func, view=True)


# --- permutations ---------------------------------------------------------------------------------

_PERMUTED: dict = {}


def _permuted(x, local, perm):
    """Wrap `local` (x's shard permuted by `perm`, a tuple of input dims in output order); the
    output layout and shape are cached on (shape, spec, perm)."""
    key = (x._gshape, x._spec, perm)
    hit = _PERMUTED.get(key)
    if hit is None:
        spec = x._spec
        if spec.is_shard:
            spec = shard_spec(perm.index(spec.dim), spec.degree, spec.stride)
        g = x._gshape
        hit = remember(_PERMUTED, key, (spec, torch.Size(tuple(g[p] for p in perm))))
    return wrap(local, hit[0], x._pg, hit[1])


_REVERSED = tuple(tuple(reversed(range(n))) for n in range(9))


@lru_cache(maxsize=1024)
def _swap_perm(nd, a, b):
    perm = list(range(nd))
    if nd:
        a, b = a % nd, b % nd
        perm[a], perm[b] = perm[b], perm[a]
    return tuple(perm)


@rule(T.transpose, torch.transpose, T.swapaxes, torch.swapaxes, T.swapdims, torch.swapdims)
def transpose(func, args, kwargs):
    x = args[0]
    a = args[1] if len(args) > 1 else kwargs.get("dim0", kwargs.get("axis0"))
    b = args[2] if len(args) > 2 else kwargs.get("dim1", kwargs.get("axis1"))
    return _permuted(x, x._local.transpose(a, b), _swap_perm(len(x._gshape), a, b))


@rule(T.t, torch.t)
def t(func, args, kwargs):
    x = args[0]
    return _permuted(x, x._local.t(), _swap_perm(len(x._gshape), 0, -1))




@rule(*[f for f in (getattr(T, n, None) for n in ("t_", "transpose_", "swapdims_", "swapaxes_"))
        if f is not None])
def transpose_(func, args, kwargs):
    """In place (`nn.init.orthogonal_` of a wide matrix): the shard is transposed in place and
    the same tensor object presents the transposed tensor (its layout's dim moved with it)."""
    x = args[0]
    nd = len(x._gshape)
    if weakref.getweakrefs(x):   # swap_tensors would refuse, after the shard was transposed
        raise UnsupportedOpError(
            f"{func.__name__}: in place on a ShardedTensor with {x._spec!r} and shape "
            f"{tuple(x._gshape)} that is weakly referenced (e.g. a copy standing for a view the "
            f"shards cannot present, registered to write back into its base) is not supported; "
            f"use the out-of-place .t() / .transpose(dim0, dim1)")
    if func is T.t_:
        x._local.t_()   # torch's own checks (at most 2-D, a leaf that requires grad)
        perm = _swap_perm(nd, 0, -1) if nd == 2 else tuple(range(nd))
    else:
        a = args[1] if len(args) > 1 else kwargs.get("dim0", kwargs.get("axis0"))
        b = args[2] if len(args) > 2 else kwargs.get("dim1", kwargs.get("axis1"))
        x._local.transpose_(a, b)
        perm = _swap_perm(nd, a, b)
    try:
        moved = _permuted(x, x._local, perm)
        if x._compute_spec is not None:
            moved.__dict__["_compute_spec"] = x._compute_spec
        # the wrapper's own sizes are the global shape's: the object takes a fresh wrapper's
        moved.__dict__.update({k: v for k, v in x.__dict__.items() if k not in _OWN})
        torch.utils.swap_tensors(x, moved)
    except BaseException:   # the shard back as it was (a transpose is its own inverse)
        x._local.t_() if func is T.t_ else x._local.transpose_(a, b)
        raise
    return x


def _t_property(x, reverse: bool, conj: bool):
    nd = len(x._gshape)
    if reverse:
        perm = _REVERSED[nd] if nd < len(_REVERSED) else tuple(reversed(range(nd)))
    else:
        perm = _swap_perm(nd, -2, -1)
    local = x._local.t() if nd == 2 and not conj else x._local.permute(perm)
    if conj and local.is_complex():
        local = local.conj()
    return _permuted(x, local, perm)


@rule(T.T.__get__)
def t_property(func, args, kwargs):
    return _t_property(args[0], True, False)


@rule(T.H.__get__)
def h_property(func, args, kwargs):
    return _t_property(args[0], True, True)


@rule(T.mT.__get__)
def mt_property(func, args, kwargs):
    return _t_property(args[0], False, False)


@rule(T.mH.__get__)
def mh_property(func, args, kwargs):
    return _t_property(args[0], False, True)


@rule(T.permute, torch.permute)
def permute(func, args, kwargs):
    x = args[0]
    dims = _shape_args(args[1:]) if len(args) > 1 else kwargs["dims"]
    nd = len(x._gshape)
    perm = tuple(int(p) % nd for p in dims)
    return _permuted(x, x._local.permute(perm), perm)


@rule(T.movedim, torch.movedim, T.moveaxis, torch.moveaxis)
def movedim(func, args, kwargs):
    x = args[0]
    src = args[1] if len(args) > 1 else kwargs.get("source")
    dst = args[2] if len(args) > 2 else kwargs.get("destination")
    nd = len(x._gshape)
    src = [v % nd for v in ((src,) if isinstance(src, int) else src)]
    dst = [v % nd for v in ((dst,) if isinstance(dst, int) else dst)]
    order = [None] * nd
    for a, b in zip(src, dst):
        order[b] = a
    rest = iter(k for k in range(nd) if k not in src)
    perm = tuple(o if o is not None else next(rest) for o in order)
    return _permuted(x, x._local.permute(perm), perm)


@rule(T.contiguous)
def contiguous(func, args, kwargs):
    """Like torch: the tensor itself when its shard is already contiguous."""
    x = args[0]
    local = x._local.contiguous(*args[1:], **kwargs)
    if local is x._local:
        return x
    return wrap(local, x._spec, x._pg, x._gshape)


# --- adding and removing dims -----------------------------------------------------------------

@rule(T.unsqueeze, torch.unsqueeze)
def unsqueeze(func, args, kwargs):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs["dim"]
    g = tuple(x._gshape)
    dim %= len(g) + 1
    spec = x._spec
    if spec.is_shard and dim <= spec.dim:
        spec = shard_spec(spec.dim + 1, spec.degree, spec.stride)
    return wrap(x._local.unsqueeze(dim), spec, x._pg, g[:dim] + (1,) + g[dim:])


@rule(T.squeeze, torch.squeeze)
def squeeze(func, args, kwargs):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    g = tuple(x._gshape)
    nd = len(g)
    if dim is None:
        dims = tuple(k for k in range(nd) if g[k] == 1)
    else:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        dims = tuple(sorted({k % nd for k in dims if g[k % nd] == 1})) if nd else ()
    spec, local = x._spec, x._local
    if spec.is_shard and spec.dim in dims:       # a sharded size-1 dim lives on rank 0 only
        local, spec = to_layout(x, REPLICA, x._pg, func), REPLICA
    if spec.is_shard:
        spec = shard_spec(spec.dim - sum(k < spec.dim for k in dims), spec.degree, spec.stride)
    out = local.squeeze(dims) if dims else local
    return wrap(out, spec, x._pg, tuple(v for k, v in enumerate(g) if k not in dims))


# --- broadcasting and tiling --------------------------------------------------------------------

def _expand(x, sizes, func):
    g = tuple(x._gshape)
    k = len(sizes) - len(g)
    if k < 0:
        raise RuntimeError(f"expand: the number of sizes provided ({len(sizes)}) must be greater "
                           f"or equal to the number of dimensions in the tensor ({len(g)})")
    out = tuple(g[i - k] if (v == -1 and i >= k) else int(v) for i, v in enumerate(sizes))
    spec, local = x._spec, x._local
    if spec.is_shard and out[spec.dim + k] != g[spec.dim]:   # broadcasting a sharded size-1 dim
        local, spec = to_layout(x, REPLICA, x._pg, func), REPLICA
    if spec.is_shard:
        spec = shard_spec(spec.dim + k, spec.degree, spec.stride)
    lsizes = local_shape(out, spec, x._pg.tp_local_rank())
    return wrap(local.expand(lsizes), spec, x._pg, out)


@rule(T.expand, T.broadcast_to, torch.broadcast_to)
def expand(func, args, kwargs):
    x = args[0]
    sizes = _shape_args(args[1:]) if len(args) > 1 else kwargs.get("size", kwargs.get("shape"))
    return _expand(x, tuple(sizes), func)


@rule(T.expand_as)
def expand_as(func, args, kwargs):
    x, other = args[0], args[1] if len(args) > 1 else kwargs["other"]
    shape = tuple(other._gshape if type(other) is ST else other.shape)
    if type(x) is not ST:   # plain.expand_as(sharded): a replicated value stays plain
        return x.expand(shape)
    return _expand(x, shape, func)


@rule(T.repeat)
def repeat(func, args, kwargs):
    """Tiling a sharded dim k times tiles every shard: the result is the same shard with
    stride*k, so repeat never communicates."""
    x = args[0]
    reps = tuple(int(v) for v in (_shape_args(args[1:]) if len(args) > 1 else kwargs["repeats"]))
    g = tuple(x._gshape)
    k = len(reps) - len(g)
    out = tuple(reps[:k]) + tuple(v * r for v, r in zip(g, reps[k:]))
    local = x._local.repeat(reps)   # (torch's own errors first)
    spec = x._spec
    if spec.is_shard:   # repeated 0 times: an empty dim, any stride lays it out
        spec = shard_spec(spec.dim + k, spec.degree, spec.stride * reps[spec.dim + k] or 1)
    return wrap(local, spec, x._pg, out)


@rule(T.repeat_interleave, torch.repeat_interleave)
def repeat_interleave(func, args, kwargs):
    x = args[0]
    if type(x) is not ST:   # torch.repeat_interleave(plain, repeats=sharded): a replicated count
        raise UnsupportedOpError("repeat_interleave with sharded `repeats` is not supported")
    repeats = args[1] if len(args) > 1 else kwargs["repeats"]
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    if kwargs.get("output_size") is not None:
        kwargs = {"output_size": kwargs["output_size"]}
    else:
        kwargs = {}
    if type(repeats) is ST:
        repeats = to_layout(repeats, REPLICA, repeats._pg, func)
    if dim is None:
        x, dim = reshape_to(x, (-1,), func, view=False), 0
    g = list(x._gshape)
    dim %= len(g)
    spec, local = x._spec, x._local
    if isinstance(repeats, torch.Tensor) and repeats.numel() != 1:
        g[dim] = int(repeats.sum()) if repeats.numel() else 0
        if spec.is_shard and spec.dim == dim:
            full = to_layout(x, REPLICA, x._pg, func)
            out = shard_spec(dim, spec.degree)
            res = to_layout(full.repeat_interleave(repeats, dim, **kwargs), out, x._pg, func)
            return wrap(res, out, x._pg, g)
        return wrap(local.repeat_interleave(repeats, dim, **kwargs), spec, x._pg, g)
    r = int(repeats)
    n0 = g[dim]
    g[dim] = n0 * r
    if spec.is_shard and spec.dim == dim:
        block = n0 // spec.stride
        if not _runs_match(block * r, spec.degree, r, block, 1):
            full = to_layout(x, REPLICA, x._pg, func)
            res = to_layout(full.repeat_interleave(r, dim), spec, x._pg, func)
            return wrap(res, spec, x._pg, g)
    return wrap(local.repeat_interleave(r, dim), spec, x._pg, g)


def _sharded_dims(x, dims):
    return x._spec.is_shard and x._spec.dim in dims


@rule(T.roll, torch.roll)
def roll(func, args, kwargs):
    x = args[0]
    shifts = args[1] if len(args) > 1 else kwargs["shifts"]
    dims = args[2] if len(args) > 2 else kwargs.get("dims")
    nd = len(x._gshape)
    if dims is None or dims == ():
        touched = set(range(nd))
    else:
        touched = {v % nd for v in ((dims,) if isinstance(dims, int) else dims)}
    if _sharded_dims(x, touched):    # rolling across shard boundaries: through the full value
        full = to_layout(x, REPLICA, x._pg, func).roll(shifts, dims)
        return wrap(to_layout(full, x._spec, x._pg, func), x._spec, x._pg, x._gshape)
    return wrap(x._local.roll(shifts, dims), x._spec, x._pg, x._gshape)


@rule(T.flip, torch.flip)
def flip(func, args, kwargs):
    x = args[0]
    dims = _shape_args(args[1:]) if len(args) > 1 else kwargs["dims"]
    nd = len(x._gshape)
    dims = tuple(v % nd for v in dims)
    if _sharded_dims(x, set(dims)):  # reversing a sharded dim sends every shard to another rank
        full = to_layout(x, REPLICA, x._pg, func).flip(dims)
        return wrap(to_layout(full, x._spec, x._pg, func), x._spec, x._pg, x._gshape)
    return wrap(x._local.flip(dims), x._spec, x._pg, x._gshape)


# --- complex views ------------------------------------------------------------------------------

@rule(torch.view_as_complex)
def view_as_complex(func, args, kwargs):
    """(..., 2) real -> (...) complex (Meta's llama rotary embedding on head shards): every
    shard is a view of its own pairs, unless the pair dim itself is split."""
    x = args[0] if args else kwargs["input"]
    g, spec = tuple(x._gshape), x._spec
    if spec.is_shard and spec.dim == len(g) - 1:
        if spec.degree > 1:
            raise UnsupportedOpError(f"torch.view_as_complex: the input {spec!r} of shape {g} "
                                     f"splits the (real, imag) dim; shard another dim first")
        spec = REPLICA   # a shard of degree 1 is the whole tensor
    return wrap(torch.view_as_complex(x._local), spec, x._pg, g[:-1])


@rule(torch.view_as_real)
def view_as_real(func, args, kwargs):
    """(...) complex -> (..., 2) real, each shard's own view."""
    x = args[0] if args else kwargs["input"]
    return wrap(torch.view_as_real(x._local), x._spec, x._pg, tuple(x._gshape) + (2,))
