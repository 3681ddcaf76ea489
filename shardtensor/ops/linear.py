"""Linear algebra: F.linear, mm/addmm (GPT-2's Conv1D), bmm/baddbmm, matmul/@, mv, dot, einsum,
and convolutions (F.conv1d/2d/3d, F.conv_transpose1d/2d/3d: a contraction over the input
channels, spatial dims unlabelled).

Every op is one two-operand contraction written with labels (`ik,kj->ij`). The layout decision is
pure and cached (`_plan`): split the work along one label L, or keep a pending partial sum.
- L kept in the output (a free or batch dim): operands holding L are sharded on it, the others
  replicated; the output is sharded on L. Column-parallel linear is L = out features.
- L contracted: both operands sharded on L, the output is a PartialSpec (row-parallel linear).
- A partial operand times a replicated one stays partial (the product is linear in it).
A plan with no forward communication wins; among those, or otherwise, the one with the least
traffic (forward and backward, a partial output counted as its future all-reduce) plus per-rank
compute (so a sharded weight is not gathered to save a little traffic). A replicated operand
used whole by split work gets Megatron's f (`copy_to_region`: identity forward, all-reduce of
its gradient backward). A bias is added to a sharded output shard-wise; a partial output is
reduced first and the bias added once (replicated output).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import trace as _trace
from ..collectives import copy_to_region, gather_from_region, reduce_from_region
from ..dispatch import UnsupportedOpError
from ._util import (PARTIAL, REPLICA, shard_spec, ST, copy_once, group_of, remember, rule, spec_of,
                    to_layout, unwrap, wrap)

T = torch.Tensor
Labels = Tuple[Optional[str], ...]


# --- the pure part: which layout to compute in ------------------------------------------------

def _move_cost(src, dst, n: int, d: int, grad: bool) -> float:
    """Elements communicated to move a value of n elements from `src` to `dst` (forward, plus
    backward when it needs a gradient)."""
    if src == dst:
        return 0
    if src.is_replicate:
        return n if (dst.is_shard and grad) else 0          # slice; backward gathers
    if src.is_shard:
        if dst.is_partial:
            return 0
        if dst.is_replicate:
            return n                                        # gather; backward slices
        if dst.dim == src.dim:
            return n + (n if grad else 0)                   # restride through the full value
        return n / d * (2 if grad else 1)                   # all-to-all both ways
    return 2 * n if dst.is_replicate else n + (n if grad else 0)   # partial: all-reduce / r-s


def _moves_forward(src, dst) -> bool:
    """Does moving from `src` to `dst` communicate in the forward pass?"""
    return src != dst and not src.is_replicate and not (src.is_shard and dst.is_partial)


@lru_cache(maxsize=4096)
def _plan(la: Labels, lb: Labels, lo: Labels, sa, sb, sizes: Tuple[Tuple[str, int], ...],
          na: int, nb: int, rga: bool, rgb: bool, d: int):
    """-> (layout of a, layout of b, copy a?, copy b?, output layout) for `la,lb->lo`."""
    size = dict(sizes)
    if sa.is_replicate and sb.is_replicate:
        return REPLICA, REPLICA, False, False, REPLICA   # replicated in, replicated out
    flops = 1
    for n in size.values():
        flops *= n
    cands = [(REPLICA, REPLICA, REPLICA)]
    for L in dict.fromkeys(x for x in la + lb if x is not None):
        strides = {s.stride for s, ls in ((sa, la), (sb, lb)) if s.is_shard and ls[s.dim] == L}
        for stride in sorted(strides or {1}):
            if size[L] % stride:
                continue
            ta = shard_spec(la.index(L), d, stride) if L in la else REPLICA
            tb = shard_spec(lb.index(L), d, stride) if L in lb else REPLICA
            to = shard_spec(lo.index(L), d, stride) if L in lo else PARTIAL
            cands.append((ta, tb, to))
    if sa.is_partial:
        cands.append((PARTIAL, REPLICA, PARTIAL))
    if sb.is_partial:
        cands.append((REPLICA, PARTIAL, PARTIAL))
    no = 1
    for lab in lo:
        if lab is not None:   # (a convolution's spatial dims: unlabelled, left out of the cost)
            no *= size[lab]
    best, best_key = None, None
    for ta, tb, to in cands:
        split = not to.is_replicate
        ca, cb = split and ta.is_replicate and rga, split and tb.is_replicate and rgb
        # elements communicated (a partial output will be all-reduced sooner or later) plus
        # multiply-adds per rank: split work is worth a little traffic
        cost = (_move_cost(sa, ta, na, d, rga) + _move_cost(sb, tb, nb, d, rgb)
                + 2 * na * ca + 2 * nb * cb + 2 * no * to.is_partial
                + (flops / d if split else flops))
        # a plan with no forward communication always wins: it computes where the operands
        # already are, or slices a replicated one locally (Megatron's column and row parallel
        # layers, attention with heads sharded on both sides)
        key = (_moves_forward(sa, ta) or _moves_forward(sb, tb), cost)
        if best_key is None or key < best_key:
            best, best_key = (ta, tb, ca, cb, to), key
    return best


def _bias_layout(to, bshape: Sequence[int], oshape: Sequence[int], d: int):
    """Layout of a bias broadcast onto an output laid out by `to` -> (spec, needs f?)."""
    if not to.is_shard:
        return REPLICA, False
    j = to.dim - (len(oshape) - len(bshape))
    if j >= 0 and bshape[j] == oshape[to.dim]:
        return shard_spec(j, d, to.stride), False
    return REPLICA, True          # a broadcast bias: every shard uses all of it


# --- the doing part ---------------------------------------------------------------------------

_PLANS: dict = {}   # (labels, shapes, specs, requires_grad, degree) -> _plan's answer


def _cached_plan(la, lb, lo, ga, gb, sa, sb, rga: bool, rgb: bool, d: int):
    """`_plan`'s answer for these labels, global shapes, layouts, grads and degree (cached)."""
    key = (la, lb, lo, ga, gb, sa, sb, rga, rgb, d)
    plan = _PLANS.get(key)
    if plan is None:
        sizes = {}
        for ls, shape in ((la, ga), (lb, gb)):
            for lab, n in zip(ls, shape):
                if lab is not None:
                    sizes[lab] = n
        plan = remember(_PLANS, key, _plan(la, lb, lo, sa, sb, tuple(sorted(sizes.items())),
                                           ga.numel(), gb.numel(), rga, rgb, d))
    return plan


def _contract(func, a, b, la: Labels, lb: Labels, lo: Labels, oshape, local_fn, bias=None,
              add_bias=None):
    """Run `local_fn(a_local, b_local, bias_local_or_None)` in the cheapest layout and wrap it.
    `add_bias(out, bias)` adds a bias after a partial output has been reduced."""
    pg = group_of(func, a, b, bias)
    d = pg.tp_world_size()
    ta, tb, ca, cb, to = _cached_plan(la, lb, lo, _gshape(a), _gshape(b), spec_of(a), spec_of(b),
                                      _rg(a), _rg(b), d)
    al, bl = to_layout(a, ta, pg, func), to_layout(b, tb, pg, func)
    if ca:
        al = copy_once(a, al, pg, func)
    if cb:
        bl = copy_once(b, bl, pg, func)
    if bias is not None and not to.is_partial:
        bspec, bcopy = _bias_layout(to, _gshape(bias), oshape, d)
        biasl = to_layout(bias, bspec, pg, func)
        if bcopy and _rg(bias):
            biasl = copy_to_region(biasl, pg, func)
        out = local_fn(al, bl, biasl)
    else:
        out = local_fn(al, bl, None)
    if to.is_partial and (bias is not None or _out_replicate(a, b)):
        out = reduce_from_region(out, pg, func)   # the bias must be added once, after the sum
        to = REPLICA
        if bias is not None:
            out = add_bias(out, to_layout(bias, REPLICA, pg, func))
    elif to.is_shard and _out_replicate(a, b):
        out = gather_from_region(out, to, oshape[to.dim], pg, func)
        to = REPLICA
    return wrap(out, to, pg, oshape)


def _gshape(x) -> torch.Size:
    return x._gshape if type(x) is ST else x.shape


def _rg(x) -> bool:
    return bool(unwrap(x).requires_grad)


def _out_replicate(a, b) -> bool:
    for x in (a, b):
        if type(x) is ST and x._compute_spec is not None and x._compute_spec.output_replicate:
            return True
    return False


def _no_out(func, kwargs):
    if kwargs.get("out") is not None:
        raise UnsupportedOpError(f"{_trace.func_name(func)}: out= is not supported with "
                                 f"ShardedTensor inputs; assign the result instead")


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _batch_labels(n: int, prefix: str = "b") -> Labels:
    return tuple(f"{prefix}{i}" for i in range(n))


# --- F.linear ---------------------------------------------------------------------------------

@rule(F.linear)
def linear(func, args, kwargs):
    """y = x W^T + b. W sharded on dim 0 (out features): column parallel, output sharded on its
    last dim, no forward communication. W sharded on dim 1 with x sharded on its last dim: row
    parallel, output partial (reduced, then the bias added once, when there is a bias)."""
    if kwargs:
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
    else:
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        c = w._col if w.__class__ is ST else None
        if c is not None and bias is None and x.__class__ is ST and x._gshape == c[0]:
            # the column-parallel call this weight saw last (q/k/v, up, gate), without a bias
            # (the checks `_megatron_fast_path` makes, in its order, for this one case)
            ws = w._spec
            cs = w._compute_spec
            if ws.is_shard and ws.dim == 0 and x._spec.is_replicate and x._pg is w._pg and (
                    cs is None or not cs.output_replicate):
                xl = x._local
                if xl.requires_grad and ws.degree > 1:
                    xl = copy_once(x, xl, w._pg, func)
                oshape, ospec, _ = c[1]
                return wrap(F.linear(xl, w._local), ospec, w._pg, oshape)
    out = _megatron_fast_path(func, x, w, bias, 0, F.linear)
    if out is not None:
        return out
    gx, gw = _gshape(x), _gshape(w)
    lx = _batch_labels(len(gx) - 1) + ("k",)
    lw = ("n", "k") if len(gw) == 2 else ("k",)
    lo = lx[:-1] + lw[:-1]
    oshape = torch.Size(tuple(gx[:-1]) + tuple(gw[:-1]))
    return _contract(func, x, w, lx, lw, lo, oshape, lambda a, b, c: F.linear(a, b, c),
                     bias, lambda out, c: out + c)


# --- mm, addmm, bmm, baddbmm, mv, dot -----------------------------------------------------------

_MM = (("i", "k"), ("k", "j"), ("i", "j"))
_BMM = (("b", "i", "k"), ("b", "k", "j"), ("b", "i", "j"))


@rule(torch.mm, T.mm)
def mm(func, args, kwargs):
    _no_out(func, kwargs)
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat2")
    oshape = torch.Size((_gshape(a)[0], _gshape(b)[1]))
    return _contract(func, a, b, *_MM, oshape, lambda x, y, _: torch.mm(x, y))


@rule(torch.bmm, T.bmm)
def bmm(func, args, kwargs):
    _no_out(func, kwargs)
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat2")
    ga, gb = _gshape(a), _gshape(b)
    return _contract(func, a, b, *_BMM, torch.Size((ga[0], ga[1], gb[2])),
                     lambda x, y, _: torch.bmm(x, y))


def _addmm_like(func, args, kwargs, labels, mm_fn, add_fn):
    _no_out(func, kwargs)
    c = _arg(args, kwargs, 0, "input")
    a, b = _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    if a is None:
        a, b = kwargs.get("batch1"), kwargs.get("batch2")
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    ga, gb = _gshape(a), _gshape(b)
    oshape = torch.Size(tuple(ga[:-1]) + (gb[-1],))

    def local(x, y, cl):
        if cl is None:
            out = mm_fn(x, y)
            return out if alpha == 1 else out * alpha
        return add_fn(cl, x, y, beta=beta, alpha=alpha)

    def add_bias(out, cl):
        if beta == 0:
            return out
        return out + (cl if beta == 1 else cl * beta)
    return _contract(func, a, b, *labels, oshape, local, c, add_bias)


@rule(torch.addmm, T.addmm)
def addmm(func, args, kwargs):
    """beta * input + alpha * (mat1 @ mat2); GPT-2's Conv1D with its weight (in, out)."""
    if len(args) == 3 and not kwargs:
        out = _megatron_fast_path(func, args[1], args[2], args[0], 1, _addmm_local)
        if out is not None:
            return out
    return _addmm_like(func, args, kwargs, _MM, torch.mm, torch.addmm)


def _addmm_local(x, w, b):
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


_FAST_SHAPES: dict = {}


def _fast_shape(xshape, wshape, out_dim: int, ws, column: bool):
    """(output shape, output spec) of the fast path, cached on the global shapes (slicing a
    torch.Size costs more than the rest of the rule)."""
    key = (xshape, wshape, out_dim, ws, column)
    r = _FAST_SHAPES.get(key)
    if r is None:
        oshape = torch.Size(tuple(xshape[:-1]) + (wshape[out_dim],))
        ospec = shard_spec(len(oshape) - 1, ws.degree, ws.stride) if column else PARTIAL
        r = remember(_FAST_SHAPES, key, (oshape, ospec, shard_spec(0, ws.degree, ws.stride)))
    return r


def _megatron_fast_path(func, x, w, bias, out_dim: int, local_fn):
    """The two layouts Megatron uses, decided without the planner (the hot path of every
    transformer): column parallel (weight sharded on its output dim `out_dim`, input replicated
    or plain; output sharded, Megatron's f on the input) and row parallel (weight sharded on its
    input dim, input sharded on its last dim alike; output partial, or reduced once and the
    bias added when there is one). Returns None for anything else."""
    if type(w) is not ST:
        return None
    ws = w._spec
    if not ws.is_shard or len(w._gshape) != 2 or (
            w._compute_spec is not None and w._compute_spec.output_replicate):
        return None
    pg = w._pg
    tx = type(x)
    if ws.dim == out_dim:                                   # column parallel
        if tx is ST:
            if not x._spec.is_replicate or x._pg is not pg:
                return None
            xl = x._local
            xshape = x._gshape
        elif isinstance(x, torch.Tensor):
            xl = x
            xshape = x.shape
        else:
            return None
        c = w._col                                  # the last input shape seen by this weight
        if c is not None and c[0] == xshape:
            oshape, ospec, bspec = c[1]
        else:
            oshape, ospec, bspec = r = _fast_shape(xshape, w._gshape, out_dim, ws, True)
            w.__dict__["_col"] = (xshape, r)
        if bias is None:
            bl = None
        elif type(bias) is ST and bias._spec == bspec and bias._pg is pg:
            bl = bias._local
        else:
            return None
        if xl.requires_grad and ws.degree > 1:
            xl = copy_once(x, xl, pg, func)
        return wrap(local_fn(xl, w._local, bl), ospec, pg, oshape)
    # row parallel: input sharded on its last dim exactly as the weight's input dim
    if tx is not ST or x._pg is not pg:
        return None
    xs = x._spec
    if not (xs.is_shard and xs.dim == len(x._gshape) - 1 and xs.stride == ws.stride):
        return None
    if bias is not None and not (type(bias) is ST and bias._spec.is_replicate and bias._pg is pg) \
            and not (type(bias) is not ST and isinstance(bias, torch.Tensor)):
        return None
    oshape = _fast_shape(x._gshape, w._gshape, out_dim, ws, False)[0]
    out = local_fn(x._local, w._local, None)
    if bias is None:
        return wrap(out, PARTIAL, pg, oshape)
    out = reduce_from_region(out, pg, func, inplace=True)   # the bias is added once, after the sum
    return wrap(out + unwrap(bias), REPLICA, pg, oshape)


@rule(torch.baddbmm, T.baddbmm)
def baddbmm(func, args, kwargs):
    return _addmm_like(func, args, kwargs, _BMM, torch.bmm, torch.baddbmm)


@rule(torch.mv, T.mv)
def mv(func, args, kwargs):
    _no_out(func, kwargs)
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "vec")
    return _contract(func, a, b, ("i", "k"), ("k",), ("i",), torch.Size((_gshape(a)[0],)),
                     lambda x, y, _: torch.mv(x, y))


@rule(torch.dot, T.dot, torch.vdot, T.vdot)
def dot(func, args, kwargs):
    _no_out(func, kwargs)
    op = torch.vdot if func in (torch.vdot, T.vdot) else torch.dot   # vdot: conj(a) . b
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other" if op is torch.vdot
                                                 else "tensor")
    return _contract(func, a, b, ("k",), ("k",), (), torch.Size(()),
                     lambda x, y, _: op(x, y))


# --- matmul / @ ---------------------------------------------------------------------------------

@lru_cache(maxsize=1024)
def _matmul_labels(ga: Tuple[int, ...], gb: Tuple[int, ...]):
    """Labels of torch.matmul's contraction, batch dims broadcast from the right. A batch dim of
    size 1 facing a larger one is not carried by that operand (label None)."""
    if not ga or not gb:
        raise RuntimeError(f"both arguments to matmul need to be at least 1D, but they are "
                           f"{len(ga)}D and {len(gb)}D")
    ba, bb = ga[:-2], gb[:-2]
    bo = tuple(torch.broadcast_shapes(ba, bb)) if (ba or bb) else ()
    names = _batch_labels(len(bo))

    def batch(bs):
        off = len(bo) - len(bs)
        return tuple(names[off + i] if n == bo[off + i] else None for i, n in enumerate(bs))
    la = ("k",) if len(ga) == 1 else batch(ba) + ("i", "k")
    lb = ("k",) if len(gb) == 1 else batch(bb) + ("k", "j")
    lo = names + (("i",) if len(ga) > 1 else ()) + (("j",) if len(gb) > 1 else ())
    oshape = bo + ((ga[-2],) if len(ga) > 1 else ()) + ((gb[-1],) if len(gb) > 1 else ())
    return la, lb, lo, torch.Size(oshape)


_MATMUL_LOCAL: dict = {}  # (shapes, specs, requires_grad) -> (out shape, out spec) or False


def _matmul_local(a, b):
    """(output shape, output layout) when two ShardedTensors of one group can be multiplied as
    they lie, shard by shard, with no communication either way and no copy (q @ k^T and
    attn @ v with heads sharded alike; a contraction sharded alike on both sides, partial
    output); False otherwise. Decided by the planner once per (shapes, layouts, grads)."""
    key = (a._gshape, b._gshape, a._spec, b._spec, a._local.requires_grad,
           b._local.requires_grad, a._pg.tp_world_size())   # `_cached_plan`'s arguments
    r = _MATMUL_LOCAL.get(key)
    if r is None:
        la, lb, lo, oshape = _matmul_labels(a._gshape, b._gshape)
        ta, tb, ca, cb, to = _cached_plan(la, lb, lo, *key)
        r = (oshape, to) if (ta == a._spec and tb == b._spec and not ca and not cb) else False
        remember(_MATMUL_LOCAL, key, r)
    return r


@rule(torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__)
def matmul(func, args, kwargs):
    """torch.matmul with broadcasting. q @ k^T and attn @ v with heads sharded on the same batch
    dim stay local; a contraction over a dim sharded on both sides gives a PartialSpec."""
    _no_out(func, kwargs)
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
    if func is T.__rmatmul__:
        a, b = b, a
    if (type(a) is ST and type(b) is ST and a._pg is b._pg and a._compute_spec is None
            and b._compute_spec is None):
        r = _matmul_local(a, b)
        if r:
            return wrap(torch.matmul(a._local, b._local), r[1], a._pg, r[0])
    la, lb, lo, oshape = _matmul_labels(_gshape(a), _gshape(b))
    return _contract(func, a, b, la, lb, lo, oshape, lambda x, y, _: torch.matmul(x, y))


# --- einsum ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1024)
def _einsum_labels(eq: str, ga: Tuple[int, ...], gb: Tuple[int, ...]):
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        raise UnsupportedOpError(f"torch.einsum: only two-operand equations have a sharding rule,"
                                 f" got {eq!r}")
    nell = 0
    for t, g in zip(terms, (ga, gb)):
        if "..." in t:
            nell = max(nell, len(g) - (len(t) - 3))
    ell = _batch_labels(nell, ".")

    def expand(t, g):
        if "..." not in t:
            return list(t)
        pre, post = t.split("...")
        k = len(g) - len(pre) - len(post)
        return list(pre) + list(ell[nell - k:]) + list(post)
    ls = [expand(t, g) for t, g in zip(terms, (ga, gb))]
    for t, lab in zip(terms, ls):
        if len(set(lab)) != len(lab):
            raise UnsupportedOpError(f"torch.einsum: repeated labels in {t!r} (a diagonal) have "
                                     f"no sharding rule")
    if arrow:
        lo = expand(rhs, ()) if "..." not in rhs else (
            list(rhs.split("...")[0]) + list(ell) + list(rhs.split("...")[1]))
    else:
        counts = {}
        for lab in ls[0] + ls[1]:
            counts[lab] = counts.get(lab, 0) + 1
        lo = list(ell) + sorted(c for c, n in counts.items() if n == 1 and c not in ell)
    size = {}
    for lab, g in zip(ls, (ga, gb)):
        for c, n in zip(lab, g):
            size[c] = max(size.get(c, 1), n)
    la = tuple(c if n == size[c] else None for c, n in zip(ls[0], ga))
    lb = tuple(c if n == size[c] else None for c, n in zip(ls[1], gb))
    return la, lb, tuple(lo), torch.Size(tuple(size[c] for c in lo))


@rule(torch.einsum)
def einsum(func, args, kwargs):
    """Two-operand torch.einsum (explicit, implicit or with `...`), laid out like matmul."""
    eq, ops = args[0], args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if len(ops) != 2:
        raise UnsupportedOpError(f"torch.einsum: only two-operand equations have a sharding rule,"
                                 f" got {len(ops)} operands for {eq!r}")
    a, b = ops
    la, lb, lo, oshape = _einsum_labels(eq, tuple(_gshape(a)), tuple(_gshape(b)))
    return _contract(func, a, b, la, lb, lo, oshape,
                     lambda x, y, _: torch.einsum(eq, x, y, **kwargs))


# --- convolutions -------------------------------------------------------------------------------

_CONV_SHAPES: dict = {}
# the arguments after (input, weight, bias), groups apart: F.conv*d's and F.conv_transpose*d's
_CONV_ARGS = (("stride", 1), ("padding", 0), ("dilation", 1))
_TRANSPOSE_ARGS = (("stride", 1), ("padding", 0), ("output_padding", 0), ("dilation", 1))
_TRANSPOSE_NAMES = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                    "dilation")


def _conv_shape(func, gx, gw, gb, conf, groups, transposed: bool) -> torch.Size:
    """The output's global shape, as torch computes it (on meta tensors, cached), after the
    checks torch's kernels make and its meta functions skip (channels, groups, bias, output
    padding): a shard would otherwise meet a mismatched weight on some ranks only."""
    key = (func, gx, gw, gb, conf, groups)
    r = _CONV_SHAPES.get(key)
    if r is None:
        _check_conv(func, gx, gw, gb, dict(conf), groups, transposed)
        meta = [torch.empty(g, device="meta") for g in (gx, gw)]
        r = remember(_CONV_SHAPES, key, func(*meta, None, groups=groups, **dict(conf)).shape)
    return r


def _check_conv(func, gx, gw, gb, conf, groups, transposed: bool):
    name, nd = _trace.func_name(func), len(gw) - 2
    if len(gw) < 3 or len(gx) not in (nd + 1, nd + 2):
        return                                         # torch's meta function says what is wrong
    tw = "transposed=1, " if transposed else ""
    if groups < 1 or gw[0] % groups:
        raise RuntimeError(f"{name}: Given groups={groups}, expected weight to be divisible by "
                           f"{groups} at dimension 0, but got weight of size {list(gw)} instead")
    cin = gw[0] if transposed else gw[1] * groups
    c = gx[len(gx) - nd - 1]
    if c != cin:
        raise RuntimeError(f"{name}: Given {tw}groups={groups}, weight of size {list(gw)}, "
                           f"expected input{list(gx)} to have {cin} channels, but got {c} "
                           f"channels instead")
    cout = gw[1] * groups if transposed else gw[0]
    if gb is not None and tuple(gb) != (cout,):
        raise RuntimeError(f"{name}: Given {tw}weight of size {list(gw)}, expected bias to be "
                           f"1-dimensional with {cout} elements, but got bias of size {list(gb)} "
                           f"instead")
    if transposed:
        def per_dim(v):
            return tuple(v) if isinstance(v, tuple) else (v,) * nd
        big = [o >= s and o >= d for o, s, d in zip(per_dim(conf["output_padding"]),
                                                     per_dim(conf["stride"]),
                                                     per_dim(conf["dilation"]))]
        if any(big):
            raise RuntimeError(f"{name}: output padding must be smaller than either stride or "
                               f"dilation, but got output_padding={conf['output_padding']}, "
                               f"stride={conf['stride']}, dilation={conf['dilation']}")


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _conv_local(func, a, b, c, conf, cdim: int, transposed: bool):
    """func on local pieces; a rank holding no input or no output channel (uneven shards) gets
    a zero channel added and removed: torch's convolutions refuse or misread an empty one.
    The weight is (out, in, *kernel), or (in, out, *kernel) when `transposed`."""
    dout, din = (1, 0) if transposed else (0, 1)
    cout, cin = b.shape[dout], b.shape[din]
    if cout == 0 or cin == 0:
        def one_more(t, dim):
            return torch.cat([t, t.new_zeros(t.shape[:dim] + (1,) + t.shape[dim + 1:])], dim)
        if cin == 0:
            a, b = one_more(a, cdim), one_more(b, din)
        if cout == 0:
            b = one_more(b, dout)
            c = None if c is None else one_more(c, 0)
    out = func(a, b, None if c is None else c.reshape(-1), **dict(conf))
    return out.narrow(cdim, 0, 0) if cout == 0 else out


_TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@rule(F.conv1d, F.conv2d, F.conv3d, *_TRANSPOSED)
def conv(func, args, kwargs):
    """Convolution as a contraction over the input channels: the weight (out, in, *kernel)
    sharded on its out channels is column parallel (output sharded on the channel dim, Megatron's
    f on the input), sharded on its in channels with the input channel-sharded alike row
    parallel (output partial; reduced first when there is a bias); a batch-sharded input with a
    replicated weight stays batch-sharded. A transposed convolution's weight is (in, out / groups,
    *kernel): the same contraction with the weight's dims swapped (dim 1 column parallel, dim 0
    row parallel). Grouped convolutions: channel-sharded input and a weight sharded on dim 0
    (out channels; a transposed one's in channels) stay local when each rank holds whole groups,
    a batch-sharded input with a replicated weight too; otherwise the inputs are gathered
    (computed replicated)."""
    transposed = func in _TRANSPOSED
    names = _TRANSPOSE_NAMES if transposed else ("input", "weight", "bias", "stride", "padding",
                                                 "dilation", "groups")
    v = dict(zip(names, args))
    v.update(kwargs)
    x, w, bias = v["input"], v["weight"], v.get("bias")
    conf = tuple((k, _hashable(v.get(k, d))) for k, d in (_TRANSPOSE_ARGS if transposed
                                                          else _CONV_ARGS))
    groups = v.get("groups", 1)
    gx, gw = _gshape(x), _gshape(w)
    oshape = _conv_shape(func, gx, gw, None if bias is None else tuple(_gshape(bias)), conf,
                         groups, transposed)
    nd = len(gw) - 2
    batched = len(gx) == nd + 2
    if groups == 1:
        if bias is not None:   # laid out (out, 1, ...): broadcast against the channel dim
            bshape = torch.Size((oshape[-nd - 1],) + (1,) * nd)
            bias = (wrap(bias._local.reshape((-1,) + (1,) * nd), bias._spec, bias._pg, bshape)
                    if type(bias) is ST else bias.reshape(bshape))
        lx = ("n", "k") if batched else ("k",)
        pad = (None,) * nd
        lw = ("k", "o") if transposed else ("o", "k")
        return _contract(func, x, w, lx + pad, lw + pad, lx[:-1] + ("o",) + pad, oshape,
                         lambda a, b, c: _conv_local(func, a, b, c, conf, len(lx) - 1,
                                                     transposed),
                         bias, lambda out, c: out + c)
    pg = group_of(func, x, w, bias)
    c = 1 if batched else 0
    xs, ws = spec_of(x), spec_of(w)
    d = pg.tp_world_size() if pg is not None else 1
    if (xs.is_shard and xs.dim == c and xs.stride == 1 and ws == shard_spec(0, d)
            and groups % d == 0 and spec_of(bias) in (ws, REPLICA)):   # whole groups per rank
        bl = None if bias is None else to_layout(bias, ws, pg, func)
        out = func(x._local, w._local, bl, groups=groups // d, **dict(conf))
        return wrap(out, shard_spec(c, d), pg, oshape)
    if batched and xs.is_shard and xs.dim == 0 and ws.is_replicate and spec_of(bias).is_replicate:
        wl, bl = unwrap(w), unwrap(bias)   # split over the batch: the weight's gradient summed
        wl = copy_to_region(wl, pg, func) if wl.requires_grad else wl
        bl = copy_to_region(bl, pg, func) if bl is not None and bl.requires_grad else bl
        return wrap(func(x._local, wl, bl, groups=groups, **dict(conf)), xs, pg, oshape)
    local = [None if t is None else to_layout(t, REPLICA, pg, func) for t in (x, w, bias)]
    return wrap(func(*local, groups=groups, **dict(conf)), REPLICA, pg, oshape)
