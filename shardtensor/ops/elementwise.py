"""Elementwise ops: unary math, binary ops with broadcasting, casts, copies and `*_like`.

Shards and replicas run locally and keep their layout. A plain tensor or a number is a
replicated value: it is sliced locally to the output's layout when it spans the sharded dim and
used as is when it broadcasts along it (its gradient is then all-reduced: Megatron's `f`).
Partial inputs stay partial only where the op is linear in them (partial + partial, partial *
replicated, neg, casts to floating dtypes); otherwise they are reduced first (all-reduce, or
reduce-scatter when the other operand is sharded). Two operands sharded on different dims: the
smaller one is moved (all-to-all). Layout decisions are pure and cached on (specs, shapes).
"""
from __future__ import annotations

import inspect
import math
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..collectives import copy_to_region, redistribute_local
from ..spec import take_shard
from ..tensor import number
from ._util import (PARTIAL, REPLICA, ST, ShardingError, shard_spec, group_of, materialize,
                    remember, rule, to_layout, wrap)
from ..dispatch import UnsupportedOpError
from .. import trace as _trace

T = torch.Tensor
Tensor = torch.Tensor
_DisableTF = torch._C.DisableTorchFunctionSubclass


def _spellings(names, extra=()):
    """Every spelling of each name: torch.X, Tensor.X, F.X, and the in-place X_ forms.
    Returns (funcs, inplace funcs)."""
    funcs, inplace = {}, set()
    for name in names.split():
        for ns in (torch, T, F, torch.special):
            for n, ip in ((name, False), (name + "_", True)):
                f = getattr(ns, n, None)
                if callable(f) and not isinstance(f, type):
                    funcs[f] = None
                    if ip:
                        inplace.add(f)
    for name in extra:
        f = getattr(T, name, None)
        if f is not None:
            funcs[f] = None
            if name.startswith("__i") and name != "__invert__":
                inplace.add(f)
    return list(funcs), inplace


# --- which argument positions an op is linear in (for PartialSpec inputs) -------------------------
# "sum": the op is linear in those arguments jointly (a + b): the output stays partial when every
# one of them is partial. "prod": linear in each separately (a * b): one partial operand is kept,
# the others are reduced first.
_ARGS01 = frozenset((0, 1, "input", "other"))
_LIN = {}


def _lin(funcs, mode, positions):
    for f in funcs:
        _LIN[f] = (mode, frozenset(positions))


_UNARY, _UNARY_IP = _spellings("""
    relu silu gelu softplus tanh sigmoid exp exp2 expm1 log log1p log2 log10 abs absolute sqrt
    rsqrt square sin cos tan sinh cosh asin acos atan erf erfc erfinv reciprocal clamp clip
    clamp_min clamp_max nan_to_num sign sgn floor ceil round trunc frac logical_not bitwise_not
    relu6 leaky_relu elu selu celu mish hardswish hardsigmoid hardtanh logsigmoid threshold
    softsign tanhshrink isnan isinf isfinite isposinf isneginf signbit neg negative positive
    conj conj_physical resolve_conj resolve_neg
    """, ("__abs__", "__neg__", "__pos__", "__invert__"))
_lin([f for f in _UNARY if getattr(f, "__name__", "").rstrip("_") in (
    "neg", "negative", "positive", "conj", "conj_physical", "resolve_conj", "resolve_neg")]
     + [T.__neg__, T.__pos__], "prod", (0,))

_SUM, _SUM_IP = _spellings("add sub subtract rsub", (
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__"))
_lin(_SUM, "sum", _ARGS01)
_MUL, _MUL_IP = _spellings("mul multiply", ("__mul__", "__rmul__", "__imul__"))
_lin(_MUL, "prod", _ARGS01)
_DIV, _DIV_IP = _spellings("div divide true_divide", ("__truediv__", "__itruediv__", "__idiv__"))
_lin(_DIV, "prod", (0, "input"))
_OTHER, _OTHER_IP = _spellings("""
    floor_divide remainder fmod maximum minimum fmax fmin pow float_power atan2 hypot eq ne lt
    le gt ge greater less greater_equal less_equal not_equal logical_and logical_or logical_xor
    bitwise_and bitwise_or bitwise_xor masked_fill addcmul addcdiv copysign xlogy isclose
    """, ("__rtruediv__", "__rdiv__", "__pow__", "__rpow__", "__ipow__", "__floordiv__",
          "__rfloordiv__", "__ifloordiv__", "__mod__", "__rmod__", "__imod__", "__eq__", "__ne__",
          "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__rand__", "__iand__", "__or__",
          "__ror__", "__ior__", "__xor__", "__rxor__", "__ixor__"))
_LERP, _LERP_IP = _spellings("lerp")
_lin(_LERP, "sum", (0, 1, "input", "end"))
_lin([torch.where], "sum", (1, 2, "input", "other"))
_lin([T.where], "sum", (0, 2, "other"))

_INPLACE = _UNARY_IP | _SUM_IP | _MUL_IP | _DIV_IP | _OTHER_IP | _LERP_IP
_KEEPS_PARTIAL_ALONE = frozenset(f for f, (m, p) in _LIN.items() if m == "prod" and 0 in p)


# --- layout decisions (pure, cached) --------------------------------------------------------------

@lru_cache(maxsize=8192)
def _plan(lin, inplace, desc):
    """desc: ((position, spec or None for a plain tensor, global shape), ...), self first for an
    in-place op. Returns (output spec, output shape, ((layout or None, copy_to_region?), ...)):
    each operand is moved to `layout` (None: as is), then passed through copy_to_region when it
    is a replicated value meeting a non-replicated output (its gradient must be summed)."""
    shapes = [s for _, _, s in desc]
    out_shape = torch.Size(torch.broadcast_shapes(*shapes)) if len(shapes) > 1 else shapes[0]
    if inplace and out_shape != shapes[0]:   # serial's error, on every rank (the shards of an
        raise RuntimeError(                   # uneven layout might broadcast on some ranks)
            f"output with shape {list(shapes[0])} doesn't match the broadcast shape "
            f"{list(out_shape)}")
    n = len(out_shape)
    specs = [sp for _, sp, _ in desc]
    partial = [i for i, sp in enumerate(specs) if sp is not None and sp.is_partial]
    sharded = any(sp is not None and sp.is_shard for sp in specs)

    if partial and lin is not None and not sharded:
        mode, lpos = lin
        pos = [p for p, _, _ in desc]
        keep = None
        if mode == "sum":
            if all((p in lpos) == (i in partial) for i, p in enumerate(pos)):
                keep = set(partial)
        else:
            lp = [i for i in partial if pos[i] in lpos]
            if lp and (not inplace or lp[0] == 0):
                keep = {lp[0]}
        if keep:
            acts = tuple((None, False) if i in keep else
                         (REPLICA if i in partial else None, True) for i in range(len(desc)))
            return PARTIAL, out_shape, acts

    if inplace:
        target = REPLICA if specs[0] is None or specs[0].is_partial else specs[0]
    else:
        weights = {}
        for _, sp, s in desc:
            if sp is not None and sp.is_shard:
                od = sp.dim + n - len(s)
                if s[sp.dim] == out_shape[od]:
                    key = shard_spec(od, sp.degree, sp.stride)
                    weights[key] = weights.get(key, 0) + s.numel()
        target = max(weights, key=weights.get) if weights else REPLICA

    acts = []
    for _, sp, s in desc:
        want = REPLICA
        if target.is_shard:
            od = target.dim - (n - len(s))
            if od >= 0 and s[od] == out_shape[target.dim]:
                want = shard_spec(od, target.degree, target.stride)
        move = None if sp == want or (sp is None and want is REPLICA) else want
        acts.append((move, want is REPLICA and not target.is_replicate))
    return target, out_shape, tuple(acts)


# --- execution ------------------------------------------------------------------------------------

def _sync_requires_grad(x, local):
    """After an in-place op the shard may require grad where the wrapper did not."""
    if local.requires_grad:
        with _DisableTF():
            if not x.requires_grad:
                T.requires_grad_(x, True)


def _rebind(x, local, spec):
    """An in-place op on a partial value that had to be reduced first: x now holds the result."""
    x._local, x._spec = local, spec
    _sync_requires_grad(x, local)
    return x


def _generic(func, args, kwargs):
    ops = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    ops += [(k, v) for k, v in kwargs.items() if k != "out" and isinstance(v, Tensor)]
    inplace = func in _INPLACE
    lin = _LIN.get(func)
    if "rounding_mode" in kwargs and kwargs["rounding_mode"] is not None:
        lin = None  # floor / trunc division is not linear
    if lin is not None and lin[0] == "sum":
        # a number among the summands would be added once per rank
        for p in lin[1]:
            v = args[p] if type(p) is int and p < len(args) else kwargs.get(p) if type(p) is str else None
            if v is not None and not isinstance(v, Tensor):
                lin = None
                break
    desc, pg = [], None
    for p, v in ops:
        if type(v) is ST:
            desc.append((p, v._spec, v._gshape))
            if pg is None:
                pg = v._pg
            elif v._pg is not pg and v._pg != pg:
                group_of(func, *(v for _, v in ops))
        else:
            desc.append((p, None, v.shape))
    if inplace and ops[0][0] != 0:
        raise UnsupportedOpError(f"{_trace.func_name(func)}: in-place op without a tensor self")
    target, out_shape, acts = _plan(lin, inplace, tuple(desc))
    new_args, new_kwargs = list(args), dict(kwargs)
    for (p, v), (move, copy) in zip(ops, acts):
        loc = v._local if type(v) is ST else v
        if move is not None:
            loc = to_layout(v, move, pg, func)
        if copy:
            loc = copy_to_region(loc, pg, func)
        if type(p) is int:
            new_args[p] = loc
        else:
            new_kwargs[p] = loc
    out = kwargs.get("out")
    if out is not None:
        if type(out) is ST:
            if out._gshape != out_shape:
                raise ShardingError(f"{_trace.func_name(func)}: out= has shape "
                                    f"{tuple(out._gshape)}, the result {tuple(out_shape)}")
            if out._spec == target:
                new_kwargs["out"] = out._local
                func(*new_args, **new_kwargs)
            else:  # the result moved into out's layout
                del new_kwargs["out"]
                res = redistribute_local(func(*new_args, **new_kwargs), target, out._spec,
                                         out_shape, pg, func)
                out._local.copy_(res)
        elif target.is_replicate:
            func(*new_args, **new_kwargs)
        else:  # a plain out= holds the whole (replicated) value
            del new_kwargs["out"]
            out.copy_(redistribute_local(func(*new_args, **new_kwargs), target, REPLICA,
                                         out_shape, pg, func))
        return out
    res = func(*new_args, **new_kwargs)
    if inplace:
        x = args[0]
        if type(x) is ST:
            if res is not x._local:
                return _rebind(x, res, target)
            _sync_requires_grad(x, res)
        return x
    return wrap(res, target, pg, out_shape)


_BCAST: dict = {}


def _bcast_plan(xshape, yshape, spec):
    """x sharded by `spec` meets a plain y: (output shape, output layout) when y spans the
    sharded dim with size 1 or not at all (every shard uses all of y, no slicing), else False."""
    key = (xshape, yshape, spec)
    r = _BCAST.get(key)
    if r is None:
        n = max(len(xshape), len(yshape))
        od = spec.dim + n - len(xshape)
        yd = od - (n - len(yshape))
        r = False
        if yd < 0 or yshape[yd] == 1:
            try:
                oshape = torch.Size(torch.broadcast_shapes(xshape, yshape))
            except RuntimeError:
                pass
            else:
                r = (oshape, shard_spec(od, spec.degree, spec.stride))
        remember(_BCAST, key, r)
    return r


def _local_result(x, loc, res, spec, shape):
    """The op ran on x's shard `loc`: x itself after an in-place op, else a new ShardedTensor."""
    if res is loc:
        _sync_requires_grad(x, res)
        return x
    return wrap(res, spec, x._pg, shape)


@rule(*_UNARY, *_SUM, *_MUL, *_DIV, *_OTHER, *_LERP)
def pointwise(func, args, kwargs):
    """Elementwise op. Local fast paths, no planning: x with numbers; x with a ShardedTensor of
    its layout (or both replicated); a replicated x with a plain tensor; a sharded x with a plain
    tensor that broadcasts along the sharded dim and needs no gradient (rope's cos/sin). A
    partial x stays partial with numbers where the op is linear in it. The rest: `_generic`."""
    x = args[0] if args else None
    if type(x) is not ST or "out" in kwargs:
        return _generic(func, args, kwargs)
    if kwargs:
        for v in kwargs.values():
            if isinstance(v, Tensor):
                return _generic(func, args, kwargs)
    n = len(args)
    if n > 2:
        for v in args[2:]:
            if isinstance(v, Tensor):
                return _generic(func, args, kwargs)
    spec, loc = x._spec, x._local
    y = args[1] if n > 1 else None
    if not isinstance(y, Tensor):                   # x alone, or with numbers
        if spec.is_partial and (func not in _KEEPS_PARTIAL_ALONE
                                or kwargs.get("rounding_mode") is not None):
            loc = materialize(x, func)
            res = func(loc, *args[1:], **kwargs)
            if res is loc or func in _INPLACE:
                return _rebind(x, res, REPLICA)
            return wrap(res, REPLICA, x._pg, x._gshape)
        res = func(loc) if n == 1 and not kwargs else func(loc, *args[1:], **kwargs)
        return _local_result(x, loc, res, spec, x._gshape)
    if spec.is_partial:
        return _generic(func, args, kwargs)
    shape = x._gshape
    if type(y) is ST:
        ys = y._spec
        if y._pg is not x._pg or not (ys is spec or ys == spec) or (
                y._gshape is not shape and y._gshape != shape and not spec.is_replicate):
            return _generic(func, args, kwargs)
        y = y._local                                # same layout, or both replicated
    elif not spec.is_replicate:                     # a plain tensor: a replicated value
        plan = False if y.requires_grad else _bcast_plan(shape, y.shape, spec)
        if not plan:
            return _generic(func, args, kwargs)
        shape, spec = plan
    res = func(loc, y) if n == 2 and not kwargs else func(loc, y, *args[2:], **kwargs)
    if res is loc:                                  # in place
        _sync_requires_grad(x, res)
        return x
    return wrap(res, spec, x._pg, res.shape if spec.is_replicate else shape)


@rule(torch.where, T.where)
def where(func, args, kwargs):
    if func is torch.where and len(args) + len(kwargs) == 1:
        c = args[0] if args else kwargs["condition"]
        if type(c) is ST and c._spec.is_replicate:   # indices of a replicated value: local
            return tuple(wrap(i, REPLICA, c._pg, i.shape) for i in torch.where(c._local))
        raise UnsupportedOpError("torch.where(condition) with one argument returns indices (like "
                                 "nonzero) and has no sharding rule; use torch.where(cond, a, b)")
    return _generic(func, args, kwargs)


# --- casts, copies, fills ----------------------------------------------------------------------

def _unwrap_templates(args):
    return tuple(a._local if type(a) is ST else a for a in args)


def _partial_cast_ok(src, dst):
    """Summands may be cast separately when the sum is unchanged (up to rounding)."""
    if dst.is_floating_point or dst.is_complex:
        return True
    return not src.is_floating_point and src != torch.bool and dst != torch.bool


_CASTS = [getattr(T, n) for n in """to float double half bfloat16 type type_as int long short
          char byte bool cfloat cdouble cpu cuda clone""".split() if hasattr(T, n)] + [torch.clone]


@rule(*_CASTS)
def cast(func, args, kwargs):
    """Casts and clones keep the layout, except that a cast of a partial value reduces it first
    (a clone stays partial); `.to()` that changes nothing returns the tensor itself, as torch
    does."""
    x = args[0]
    rest = _unwrap_templates(args[1:])
    if kwargs:
        kwargs = {k: (v._local if type(v) is ST else v) for k, v in kwargs.items()}
    if type(x) is not ST:  # plain.to(sharded) / plain.type_as(sharded): a plain result
        return func(x, *rest, **kwargs)
    loc = x._local
    res = func(loc, *rest, **kwargs)
    if not isinstance(res, Tensor):  # x.type() -> 'torch.FloatTensor'
        return res
    if res is loc:
        return x
    spec = x._spec
    if spec.is_partial and (func not in _CLONES or not _partial_cast_ok(loc.dtype, res.dtype)):
        # A cast of a pending sum reduces the source itself (once: `materialize` rebinds it), so
        # the RMS-norm pattern `h.to(float32).pow(2)...` leaves `h` reduced for every later reader.
        res, spec = func(materialize(x, func), *rest, **kwargs), REPLICA
    return wrap(res, spec, x._pg, x._gshape, x._compute_spec)


_CLONES = (T.clone, torch.clone)


_RANDOM_LIKE = (torch.rand_like, torch.randn_like, torch.randint_like)


def _serial_draw(x, draw):
    """This rank's piece of `draw(t)` for an uninitialised full-size `t` of x's dtype and
    device: random values equal to serial's, every rank's generator advanced alike."""
    loc = x._local
    full = draw(torch.empty(x._gshape, dtype=loc.dtype, device=loc.device))
    return take_shard(full, x._spec, x._pg.tp_local_rank())


@rule(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, *_RANDOM_LIKE)
def like(func, args, kwargs):
    """Same layout as the input; a partial input gives a replicated result (ones_like of a
    partial value must not be summed over ranks). Random fills of a shard draw the full tensor
    from the default generator and keep this rank's piece: the values equal the serial ones and
    every rank's generator advances alike."""
    x = args[0]
    rest = _unwrap_templates(args[1:])
    spec = REPLICA if x._spec.is_partial else x._spec
    loc = x._local
    if func in _RANDOM_LIKE and spec.is_shard:
        kw = dict(kwargs)
        rg = kw.pop("requires_grad", False)
        kw.pop("memory_format", None)
        res = _serial_draw(x, lambda t: func(t, *rest, **kw)).clone().requires_grad_(rg)
    else:
        res = func(loc, *rest, **kwargs)
    return wrap(res, spec, x._pg, x._gshape)


_RANDOM_FILLS = tuple(f for f in (getattr(T, n, None) for n in (
    "normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_",
    "random_")) if f is not None)


@rule(*_RANDOM_FILLS)
def random_fill_(func, args, kwargs):
    """In-place random fills (`nn.init.normal_`, `p.data.uniform_`, HF's `_init_weights`), with
    `like`'s semantics: a shard takes its piece of a full draw from the default generator (the
    values equal serial's, every rank's generator advances alike); a replicated tensor draws
    the same values on every rank; a partial one becomes the replicated draw."""
    x = args[0]
    rest = [materialize(a, func) if type(a) is ST else a for a in args[1:]]
    kw = {k: materialize(v, func) if type(v) is ST else v for k, v in kwargs.items()}
    loc = x._local
    if loc.requires_grad and loc.is_leaf and torch.is_grad_enabled():
        # torch's own refusal, raised before anything is drawn (the generator stays put)
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                           "operation.")
    if x._spec.is_shard:
        loc.copy_(_serial_draw(x, lambda t: func(t, *rest, **kw)))
    else:
        func(loc, *rest, **kw)
        if x._spec.is_partial:
            x._spec = REPLICA
    return x


def _numbers(a):
    """A 0-d ShardedTensor (or a list of them and numbers) as Python numbers: its value."""
    if type(a) is ST and not a._gshape:
        return number(a)
    if isinstance(a, (list, tuple)) and any(type(v) is ST for v in a):
        return tuple(_numbers(v) for v in a)
    return a


@rule(T.new_zeros, T.new_ones, T.new_empty, T.new_full, T.new_tensor)
def new_factory(func, args, kwargs):
    """`x.new_zeros(size)` and kin: x's dtype and device. Asked for x's own global shape, a
    sharded x gives a result laid out like x (each rank makes its shard); any other size, or a
    replicated or partial x, gives a plain tensor (a replicated value, as plain tensors are
    everywhere in shardtensor). `new_tensor(data)` copies data (a ShardedTensor's full value)."""
    x, rest = args[0], list(args[1:])
    if func is not T.new_tensor:   # sizes given as 0-d ShardedTensors (generate's counts)
        rest = [_numbers(a) for a in rest]
        if "size" in kwargs:
            kwargs = dict(kwargs, size=_numbers(kwargs["size"]))
    if type(x) is not ST:          # a plain x: only its size arguments were ShardedTensors
        return func(x, *rest, **kwargs)
    loc = x._local
    if func is T.new_tensor:
        rest = [a.full() if type(a) is ST else a for a in rest]
        return func(loc, *rest, **kwargs)
    if rest and isinstance(rest[0], (list, tuple)):      # new_zeros((2, 3)), new_full(s, v)
        size, others = rest[0], rest[1:]
    elif rest and func is not T.new_full:                 # new_zeros(2, 3)
        size, others = tuple(rest), []
    else:                                                 # size= keyword
        size, others = kwargs.get("size"), rest
    kw = {k: v for k, v in kwargs.items() if k != "size"}
    spec = x._spec
    if spec.is_shard and size is not None and tuple(size) == tuple(x._gshape):
        from ..spec import local_shape
        lshape = local_shape(x._gshape, spec, x._pg.tp_local_rank())
        return wrap(func(loc, lshape, *others, **kw), spec, x._pg, x._gshape)
    return func(loc, size, *others, **kw)


@rule(T.new)
def legacy_new(func, args, kwargs):
    """The legacy `x.new(...)` (torch 2.4's `nn.init.orthogonal_` calls `x.new(rows, cols)`):
    sizes (ints or a torch.Size) make an uninitialized tensor like `new_empty`; data (a list, a
    tuple, a tensor) is copied like `new_tensor`; no argument gives an empty tensor."""
    x, rest = args[0], [_numbers(a) for a in args[1:]]
    if rest and (isinstance(rest[0], torch.Size) or all(isinstance(a, int) for a in rest)):
        size = tuple(rest[0]) if isinstance(rest[0], torch.Size) else tuple(rest)
        return new_factory(T.new_empty, (x, size), kwargs)
    if not rest:
        return new_factory(T.new_empty, (x, (0,)), kwargs)
    return new_factory(T.new_tensor, (x, *rest), kwargs)


_NN_INIT = tuple(getattr(torch.nn.init, n) for n in ("uniform_", "normal_", "constant_",
                                                      "kaiming_uniform_"))


@rule(*_NN_INIT)
def nn_init(func, args, kwargs):
    """The `torch.nn.init` functions that hand ShardedTensors to `__torch_function__` instead of
    running their body: the same body, on the global shape (fans, gains), through the fill
    rules above (so the values equal serial's under the same seed)."""
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    t = a["tensor"]
    gen = {"generator": a["generator"]} if a.get("generator") is not None else {}
    name = func.__name__
    with torch.no_grad():
        if name == "constant_":
            return t.fill_(a["val"])
        if name == "normal_":
            return t.normal_(a["mean"], a["std"], **gen)
        if name == "uniform_":
            return t.uniform_(a["a"], a["b"], **gen)
        if 0 in t.shape:
            warnings.warn("Initializing zero-element tensors is a no-op")
            return t
        fan = torch.nn.init._calculate_correct_fan(t, a["mode"])
        std = torch.nn.init.calculate_gain(a["nonlinearity"], a["a"]) / math.sqrt(fan)
        limit = math.sqrt(3.0) * std          # (torch's order of operations: the same floats)
        return t.uniform_(-limit, limit, **gen)


@rule(T.copy_)
def copy_(func, args, kwargs):
    """dst.copy_(src): the source is moved to dst's layout (a plain source is sliced locally;
    into a partial dst it becomes rank 0's summand)."""
    dst = args[0]
    src = args[1] if len(args) > 1 else kwargs["src"]
    if type(dst) is ST and dst._spec.is_partial:
        pg = group_of(func, dst, src)
        loc = to_layout(src, PARTIAL, pg, func)
        rest = args[2:]
        kw = {k: v for k, v in kwargs.items() if k != "src"}
        dst._local.copy_(loc, *rest, **kw)
        _sync_requires_grad(dst, dst._local)
        return dst
    return _generic(_COPY_INPLACE, args, kwargs)


_COPY_INPLACE = T.copy_
_INPLACE.add(T.copy_)


@rule(T.fill_, torch.fill_)
def fill_(func, args, kwargs):
    """Fill with a replicated value. A partial tensor becomes replicated: every summand is
    overwritten, so nothing needs reducing."""
    x = args[0]
    v = args[1] if len(args) > 1 else kwargs["value"]
    if type(v) is ST:
        v = materialize(v, func)
    if type(x) is not ST:
        return func(x, v)
    x._local.fill_(v)
    if x._spec.is_partial:
        x._spec = REPLICA
    _sync_requires_grad(x, x._local)
    return x


@rule(T.zero_, torch.zero_)
def zero_(func, args, kwargs):
    """Zeros under any layout (a partial zero sums to zero)."""
    x = args[0]
    x._local.zero_()
    return x


@rule(torch.allclose, T.allclose, torch.equal, T.equal)
def allclose(func, args, kwargs):
    """`torch.allclose` / `torch.equal`: the elementwise comparison on the shards, then one
    all-reduce of the verdict (every rank answers alike)."""
    a, b = args[0], args[1]
    if func in (torch.equal, T.equal):
        if tuple(a.shape) != tuple(b.shape):
            return False
        return bool((a == b).all())
    names = ("rtol", "atol", "equal_nan")
    kw = dict(zip(names, args[2:]))
    kw.update(kwargs)
    return bool(torch.isclose(a, b, **kw).all())
