"""ShardedTensor: this rank's shard of a global tensor, presenting the global tensor.

`shape`, `size()`, `dim()` and `numel()` are the serial tensor's; storage is the local shard.
Every torch function that meets a ShardedTensor goes through the dispatch table (`dispatch.py`);
autograd runs on the local shards, so the backward pass needs no Python dispatch.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import trace as _trace
from .collectives import gather_output, redistribute_local
from .dispatch import RULES, UnsupportedOpError, ShardingError, config, _swallowed_by_torch
from .groups import ProcessGroup
from .spec import ComputeSpec, ReplicaSpec, Spec, grad_spec, local_shape, local_size

__all__ = ["ShardedTensor", "wrap"]

_EMPTY: dict = {}
# the instance attributes that make a ShardedTensor what it is (not copied when a rule swaps a
# new ShardedTensor into an existing object: deepcopy, in-place transpose)
OWN_ATTRS = ("_local", "_spec", "_pg", "_gshape", "_compute_spec", "_grad_wrapper", "_col", "_f")
# the dispatcher's hot path reads these without attribute lookups (same objects as in trace.py)
_get_rule = RULES.get
_CURRENT_OP = _trace.current_op
_EXPLAIN = _trace.EXPLAIN
_DisableTF = torch._C.DisableTorchFunctionSubclass
_ATEN_DETACH = torch.ops.aten.detach.default
_ATEN_SET = torch.ops.aten.set_.source_Tensor
_ATEN_ITEM = torch.ops.aten._local_scalar_dense.default


class ShardedTensor(torch.Tensor):
    """This rank's shard (`to_local()`) plus its layout (`spec`), `compute_spec` and
    ProcessGroup (`pg`); answers every metadata query with the global tensor's."""

    # set by `wrap`; kept in the instance dict
    _local: torch.Tensor
    _spec: Spec
    _pg: ProcessGroup
    _compute_spec: Optional[ComputeSpec] = None   # set per instance only when not None
    _col = None   # linear's column-parallel fast path: (last input shape, its output layout)

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_global(cls, full: torch.Tensor, pg: ProcessGroup, spec: Spec,
                    compute_spec: Optional[ComputeSpec] = None) -> "ShardedTensor":
        """Every rank passes the same full tensor and keeps its part (no communication).
        Differentiable; the shard may share storage with `full`."""
        if isinstance(full, ShardedTensor):
            raise TypeError("ShardedTensor.from_global: `full` is already a ShardedTensor; use "
                            ".redistribute(spec)")
        spec = _check_spec(spec, full.shape, pg, "from_global")
        # `full` is a replicated value: its gradient is gathered back to every rank
        local = redistribute_local(full, _REPLICA, spec, full.shape, pg, "from_global")
        return wrap(local, spec, pg, full.shape, compute_spec)

    @classmethod
    def from_local(cls, local: torch.Tensor, pg: ProcessGroup, spec: Spec,
                   shape: Optional[Sequence[int]] = None,
                   compute_spec: Optional[ComputeSpec] = None,
                   run_check: bool = True) -> "ShardedTensor":
        """Wrap this rank's shard. The global shape is `shape` if given; otherwise, for a
        ShardSpec, the shard sizes make it (checked against the tensor_split layout), and for a
        ReplicaSpec / PartialSpec it is the local shape (no communication, no check).

        Every other call checks every rank's local shape with one small all-gather (at tp > 1;
        ~0.1-1 ms on gloo): a shard that does not fit on one rank raises the same
        ShardingError on every rank, naming the ranks, their local shapes and the expected
        parts (a check on one rank alone would leave the others waiting at their next
        collective). Every rank passes the same `spec` and `shape`; ranks that do not are named
        too. `run_check=False` with `shape` skips the all-gather (code that wraps shards it
        knows fit, once per step): a misfit then raises on its own rank only."""
        if isinstance(local, ShardedTensor):
            raise TypeError("ShardedTensor.from_local: `local` is already a ShardedTensor")
        if shape is None and not getattr(spec, "is_shard", False):
            spec = _check_spec(spec, local.shape, pg, "from_local")
            return wrap(local, spec, pg, local.shape, compute_spec)
        _check_types(spec, pg, "from_local")
        try:
            nspec, gshape, status = *_local_fit(local, spec, shape, pg), 0
        except _Misfit:
            status = 1
        except ValueError:   # the spec does not fit the shape (ShardingError too)
            status = 2
        if pg.tp_world_size() > 1 and (run_check or shape is None):
            msg, sizes = _from_local_verdict(local, spec, shape, pg, status)
            if msg is not None:
                raise ShardingError(msg)
        if status:   # one rank (or unchecked): this rank's own error
            _local_fit(local, spec, shape, pg)
        if gshape is None:   # the sizes along the sharded dim make the global shape
            gshape = list(local.shape)
            if pg.tp_world_size() > 1:
                gshape[nspec.dim] = sum(sizes)
        return wrap(local, nspec, pg, gshape, compute_spec)

    # --- the contract's accessors ------------------------------------------------------------
    @property
    def spec(self) -> Spec:
        return self._spec

    @property
    def compute_spec(self) -> Optional[ComputeSpec]:
        return self._compute_spec

    @property
    def pg(self) -> ProcessGroup:
        return self._pg

    def to_local(self) -> torch.Tensor:
        """This rank's shard, a plain tensor (no copy; autograd flows through it)."""
        return self._local

    def full(self) -> torch.Tensor:
        """The global value as a plain tensor on every rank (collective, differentiable)."""
        return redistribute_local(self._local, self._spec, _REPLICA, self._gshape, self._pg,
                                  "ShardedTensor.full")

    def redistribute(self, spec: Spec) -> "ShardedTensor":
        """The same global value laid out by `spec` (collective where needed, differentiable)."""
        spec = _check_spec(spec, self._gshape, self._pg, "redistribute")
        local = redistribute_local(self._local, self._spec, spec, self._gshape, self._pg,
                                   "ShardedTensor.redistribute")
        return wrap(local, spec, self._pg, self._gshape, self._compute_spec)

    # --- metadata answered in Python, off the dispatch path (HF code asks for these a lot) ----
    @property
    def shape(self) -> torch.Size:
        return self._gshape

    def size(self, dim: Optional[int] = None):
        return self._gshape if dim is None else self._gshape[dim]

    def dim(self) -> int:
        return len(self._gshape)

    ndimension = dim

    @property
    def ndim(self) -> int:
        return len(self._gshape)

    def numel(self) -> int:
        return self._gshape.numel()

    nelement = numel

    def __len__(self) -> int:
        if not self._gshape:
            raise TypeError("len() of a 0-d tensor")
        return self._gshape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._local.dtype

    @property
    def device(self) -> torch.device:
        return self._local.device

    @property
    def is_sparse(self) -> bool:
        return self._local.is_sparse

    @property
    def is_cuda(self) -> bool:
        return self._local.is_cuda

    @property
    def is_cpu(self) -> bool:
        return self._local.is_cpu

    @property
    def is_meta(self) -> bool:
        return self._local.is_meta

    # `grad` lives on the shard (the autograd leaf); optimizers read `p.grad` several times per
    # parameter per step, so it is answered here rather than through the dispatcher (the rules
    # for `Tensor.grad.__get__/__set__` in ops/meta.py call these same functions)
    _grad_wrapper: Optional["ShardedTensor"] = None  # the last wrapper `grad` returned

    def _get_grad(self):
        """The shard's gradient, presented with the tensor's layout (a partial value's gradient
        is the replicated gradient of the sum); one wrapper per gradient tensor, cached."""
        g = self._local.grad
        if g is None:
            return None
        cached = self._grad_wrapper
        if cached is not None and cached._local is g:
            return cached
        out = self._grad_wrapper = wrap(g, grad_spec(self._spec), self._pg, self._gshape)
        return out

    def _set_grad(self, g) -> None:
        if g is None:
            self._local.grad = None
            return
        if type(g) is not ShardedTensor:
            raise ShardingError(f"setting .grad of a ShardedTensor with {self._spec!r} needs a "
                                f"ShardedTensor with the same layout, got a plain tensor; build "
                                f"it with ShardedTensor.from_global(grad, pg, {self._spec!r})")
        spec = grad_spec(self._spec)   # laid out as _get_grad presents it
        self._local.grad = g._local if g._spec == spec else g.redistribute(spec)._local

    def _del_grad(self) -> None:
        self._local.grad = None

    grad = property(_get_grad, _set_grad, _del_grad)

    # --- Python protocol (kept off the dispatch path) ---------------------------------------
    def __hash__(self) -> int:
        return id(self)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"ShardedTensor(shape={tuple(self._gshape)}, spec={self._spec!r}, "
                f"rank={self._pg.tp_local_rank()}/{self._pg.tp_world_size()}, "
                f"local={self._local!r})")

    def __reduce_ex__(self, protocol):
        raise TypeError("a ShardedTensor cannot be pickled on its own (its layout is tied to a "
                        "process group); save with shardtensor.save(model_or_state_dict, path) or "
                        "pickle t.full() / t.to_local()")

    # --- dispatch ----------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        r = None
        try:
            r = _get_rule(func)
            if _COPY_VIEWS and args and id(args[0]) in _COPY_VIEWS:
                return _write_back(r, func, args, kwargs or _EMPTY)
            if r is not None:
                _CURRENT_OP[0] = func
                if _EXPLAIN:
                    return _EXPLAIN[-1].call(r, func, args, kwargs or _EMPTY)
                return r(func, args, kwargs or _EMPTY)
            return _no_rule(func, args, kwargs or _EMPTY)
        except UnsupportedOpError as e:   # (a try costs nothing until it catches)
            out = _tp_one(func, args, kwargs or _EMPTY)   # a group of one rank: serial's answer
            if out is not _NOT_LOCAL:
                return out
            if r is not None and config.fallback == "gather" and e.gather and \
                    not _writes(func, kwargs or _EMPTY):   # the rule refuses these inputs:
                return _gather(func, args, kwargs or _EMPTY, 3)   # the user's opted-in fallback
            err = _swallowed_by_torch(e)
            if err is None:
                raise
            raise err from e

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is _ATEN_DETACH:   # autograd saving a custom Function's output (C++)
            x = args[0]
            return wrap(x._local.detach(), x._spec, x._pg, x._gshape, x._compute_spec)
        if func is _ATEN_SET:      # Tensor.set_ has no __torch_function__ entry (parametrize)
            return _set(*args, **(kwargs or _EMPTY))
        if func is _ATEN_ITEM:     # a 0-d ShardedTensor read as a number by torch's argument
            return number(args[0])  # parser (torch.arange(n), n from generate's bookkeeping)
        out = _replicated_below(func, args, kwargs or _EMPTY)
        if out is not _NOT_LOCAL:
            return out
        raise RuntimeError(f"shardtensor: the aten op {func} reached ShardedTensor's "
                           f"__torch_dispatch__; some torch function bypassed the sharding "
                           f"rules. torch.func transforms (grad, vmap, jacrev, ...) do so: they "
                           f"run below __torch_function__ and cannot take sharded or partial "
                           f"ShardedTensors, nor write into replicated ones (use "
                           f"torch.autograd.grad / .backward()). Otherwise, please report this "
                           f"with the code that ran.")


_REPLICA = ReplicaSpec()


def number(x: "ShardedTensor"):
    """The value of a 0-d ShardedTensor as a Python number (a partial one's sum: collective)."""
    return (x._local if x._spec.is_replicate else x.full()).item()


# --- basic-indexing results that are copies ---------------------------------------------------
# x[idx] with basic indexing is a view of x in serial code: writing into it writes into x. Where
# the shards cannot present it as a view (a step, an int or a slice across shard boundaries on
# the sharded dim) the rule computes a copy and registers it here with (x, idx): an in-place op
# on the copy is then written back by `x[idx] = copy` (so `x[:, ::2] += 1` and
# `x[:, :2].add_(1)` change x as in serial). The copy does not see later writes into x.
_COPY_VIEWS: dict = {}


# `idx` for a copy standing for `base.view(shape)` (view.py: a view the shards cannot present
# as one): written back by `base.copy_(copy.reshape(base.shape))`
RESHAPED = object()


def copy_view(out: "ShardedTensor", base: torch.Tensor, idx) -> "ShardedTensor":
    """Register `out`, a copy standing for the view `base[idx]` (or `base.view(...)` when `idx`
    is RESHAPED; see above)."""
    import weakref
    key = id(out)
    _COPY_VIEWS[key] = (weakref.ref(out, lambda _r, k=key: _COPY_VIEWS.pop(k, None)), base, idx)
    return out


_NOT_WRITES = frozenset(("requires_grad_", "share_memory_", "detach_", "retain_grad_"))


def _inplace(func) -> bool:
    """Whether `func` writes into its first argument's values."""
    name = getattr(func, "__name__", "") or ""
    if name.startswith("__"):
        return name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                        "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                        "__ilshift__", "__irshift__")
    return name.endswith("_") and name not in _NOT_WRITES


def _write_back(r, func, args, kwargs):
    """An op on a registered copy (see above): run it; when it wrote into the copy, write the
    copy into what it stands for."""
    out = r(func, args, kwargs) if r is not None else _no_rule(func, args, kwargs)
    entry = _COPY_VIEWS.get(id(args[0]))
    if entry is not None and entry[0]() is args[0] and _inplace(func):
        _, base, idx = entry
        if idx is RESHAPED:
            base.copy_(args[0].reshape(base.shape))
        else:
            base[idx] = args[0]
    return out


def _set(dst, src):
    """`dst.set_(src)` (torch's parametrizations keep the parameter object this way): the shard
    of a ShardedTensor with the same layout and global shape, or `dst` itself, is taken over; any
    other source would change what the wrapper presents, so it is refused."""
    if src is dst:
        return dst
    if type(dst) is not ShardedTensor:
        raise ShardingError(f"Tensor.set_ of a plain tensor from a ShardedTensor with "
                            f"{src._spec!r}: use src.full() or src.to_local() as the source")
    if (type(src) is ShardedTensor and src._spec == dst._spec and src._gshape == dst._gshape
            and src._pg == dst._pg):
        dst._local.set_(src._local)
        return dst
    what = (f"a ShardedTensor with {src._spec!r} and shape {tuple(src._gshape)}"
            if type(src) is ShardedTensor else f"a plain tensor of shape {tuple(src.shape)}")
    raise ShardingError(f"Tensor.set_ on a ShardedTensor with {dst._spec!r} and shape "
                        f"{tuple(dst._gshape)}: the source is {what}; set_ can only take a "
                        f"source with the same layout and shape (redistribute it first, or use "
                        f"copy_ / torch.utils.swap_tensors)")


def _wrap_factory():
    """`wrap`, calling `_make_wrapper_subclass` positionally where this torch accepts it (the
    keyword parser costs ~0.5 us per call, paid by every op that returns a ShardedTensor), with
    the call inlined (one Python frame less per op)."""
    mws, strided, Size = torch.Tensor._make_wrapper_subclass, torch.strided, torch.Size
    probe = torch.empty(0)
    try:
        mws(ShardedTensor, probe.shape, None, None, None, probe.dtype, strided, probe.device,
            False, False)
        positional = True
    except TypeError:  # older torch: keyword-only after `size`
        positional = False

    if not positional:
        by_keyword = mws

        def mws(cls, shape, _strides, _offset, _format, dtype, _layout, device, _pin, grad):
            return by_keyword(cls, shape, dtype=dtype, device=device, requires_grad=grad)

    def wrap(local: torch.Tensor, spec: Spec, pg: ProcessGroup, shape,
             compute_spec: Optional[ComputeSpec] = None) -> ShardedTensor:
        """A ShardedTensor over `local` with global `shape` (no checks: rules call this)."""
        if shape.__class__ is not Size:
            shape = Size(shape)
        t = mws(ShardedTensor, shape, None, None, None, local.dtype, strided, local.device,
                False, local.requires_grad)
        d = t.__dict__
        d["_local"] = local
        d["_spec"] = spec
        d["_pg"] = pg
        d["_gshape"] = shape
        if compute_spec is not None:
            d["_compute_spec"] = compute_spec
        return t
    return wrap


wrap = _wrap_factory()


def _check_types(spec, pg, where: str) -> None:
    if not isinstance(pg, ProcessGroup):
        raise TypeError(f"ShardedTensor.{where}: pg must be a shardtensor.ProcessGroup, got "
                        f"{type(pg).__name__}")
    if not hasattr(spec, "is_shard"):
        raise TypeError(f"ShardedTensor.{where}: spec must be ShardSpec, ReplicaSpec or "
                        f"PartialSpec, got {spec!r}")


def _check_spec(spec, shape, pg, where: str):
    _check_types(spec, pg, where)
    spec = spec.normalize(shape)
    if spec.is_shard and spec.degree != pg.tp_world_size():
        raise ShardingError(f"ShardedTensor.{where}: {spec!r} has degree {spec.degree} but the "
                            f"process group's tensor-parallel size is {pg.tp_world_size()}")
    return spec


# --- from_local's check across ranks -----------------------------------------------------------

class _Misfit(ShardingError):
    """from_local: this rank's local shape is not its part of the global shape."""


def _local_fit(local, spec, shape, pg):
    """from_local's checks on this rank alone: (normalized spec, global shape or None)."""
    if shape is None:
        return _check_spec(spec, local.shape, pg, "from_local"), None
    shape = torch.Size(shape)
    spec = _check_spec(spec, shape, pg, "from_local")
    expect = local_shape(shape, spec, pg.tp_local_rank())
    if tuple(local.shape) != expect:
        raise _Misfit(f"ShardedTensor.from_local: local shape {tuple(local.shape)} is not rank "
                      f"{pg.tp_local_rank()}'s part {expect} of global shape {tuple(shape)} "
                      f"under {spec!r}")
    return spec, shape


_MAXD = 8   # local dims sent for the messages (a digest compares all of them)


def _digest(*parts) -> int:
    import zlib
    return zlib.crc32(repr(parts).encode())


def _from_local_verdict(local, spec, shape, pg, status: int):
    """One all-gather over the tp group of every rank's (status, digest of its spec and shape,
    local shape): (the same error message on every rank or None, the sizes along the sharded
    dim)."""
    d, nd = pg.tp_world_size(), local.dim()
    dim = spec.dim % nd if spec.is_shard and -nd <= spec.dim < nd else None
    off = tuple(-1 if k == dim else v for k, v in enumerate(local.shape))
    row = [status, _digest(repr(spec), None if shape is None else tuple(shape)), nd,
           _digest(off), -1 if dim is None else local.shape[dim]]
    row += list(local.shape[:_MAXD]) + [-1] * (_MAXD - min(nd, _MAXD))
    t = torch.tensor(row, dtype=torch.int64)
    if dist.get_backend(pg.tp_process_group()) == "nccl":
        t = t.cuda()
    out = [gather_output(t.shape, t) for _ in range(d)]
    if _trace._ACTIVE:   # a collective like any other: CommTrace records every one
        _trace.record("all_gather", d * t.numel() * t.element_size(), d,
                      "ShardedTensor.from_local", "forward")
    dist.all_gather(out, t, group=pg.tp_process_group())
    rows = [[int(v) for v in r] for r in out]
    return _verdict(rows, local, spec, shape, pg), [r[4] for r in rows]


def _shown(r) -> str:
    n = r[2]
    dims = ", ".join(str(v) for v in r[5:5 + min(n, _MAXD)])
    return f"({dims}{', ...' if n > _MAXD else ',' if n == 1 else ''})"


def _verdict(rows, local, spec, shape, pg):
    """The message every rank raises, made from the gathered rows only (so it is the same on
    every rank), or None when every rank's shard fits."""
    head = "ShardedTensor.from_local (on every rank): "
    if len({r[1] for r in rows}) > 1:
        groups: dict = {}
        for k, r in enumerate(rows):
            groups.setdefault(r[1], []).append(k)
        return (head + f"the ranks passed different spec/shape arguments (ranks "
                f"{' vs '.join(str(g) for g in groups.values())}); every rank passes the same")
    if all(r[0] == 2 for r in rows):   # the same arguments refused alike on every rank
        try:
            _local_fit(local, spec, shape, pg)
        except ValueError as e:
            return head + str(e).replace("ShardedTensor.from_local: ", "")
    if shape is not None:
        bad = [k for k, r in enumerate(rows) if r[0]]
        if not bad:
            return None
        gshape = torch.Size(shape)
        nspec = spec.normalize(gshape)
        return head + f"the local shapes do not fit global shape {tuple(gshape)} under " \
            f"{nspec!r}: " + "; ".join(f"rank {k} holds {_shown(rows[k])}, its part is "
                                       f"{local_shape(gshape, nspec, k)}" for k in bad)
    if any(r[0] for r in rows) or len({(r[2], r[3]) for r in rows}) > 1:
        return (head + f"the local shapes {', '.join(_shown(r) for r in rows)} (ranks 0.."
                f"{len(rows) - 1}) are not shards of one tensor under {spec!r} (the same number "
                f"of dims, equal off the sharded dim)")
    sizes = [r[4] for r in rows]
    n = sum(sizes)
    nspec = spec.normalize(local.shape)
    expect = [local_size(n, nspec.degree, nspec.stride, r) for r in range(nspec.degree)]
    if n % nspec.stride or sizes != expect:
        return (head + f"shard sizes {sizes} along dim {nspec.dim} are not a tensor_split "
                f"layout of {n} under {nspec!r} (expected {expect})")
    return None


class _More:
    """`... (n more)` in an error message's list of layouts."""

    def __init__(self, n: int):
        self.n = n

    def __repr__(self) -> str:
        return f"... ({self.n} more)"


def _specs_of(args, kwargs, shown: int = 4):
    """The layouts of the arguments, for error messages; of a list (an optimizer's parameters)
    the first `shown` only."""
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, ShardedTensor):
            out.append(a._spec)
        elif isinstance(a, (list, tuple)) and any(isinstance(x, ShardedTensor) for x in a):
            items = [x._spec if isinstance(x, ShardedTensor) else type(x).__name__
                     for x in a[:shown]]
            if len(a) > shown:
                items.append(_More(len(a) - shown))
            out.append(type(a)(items))
    return tuple(out)


_WARNED = set()


# ops that draw random numbers: run on each rank alone they would give each rank other values
_RANDOM = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout", "exponential",
           "geometric", "cauchy", "log_normal", "uniform", "shuffle", "perm")


_NOT_LOCAL = object()
# in-place ops that change the shape of their input (the wrapper's own sizes must follow)
_RESHAPING = frozenset(("resize_", "resize_as_", "squeeze_", "unsqueeze_", "as_strided_", "t_",
                        "transpose_", "swapdims_", "swapaxes_"))


def _sharded_leaves(args, kwargs):
    from torch.utils._pytree import tree_flatten
    return [x for x in tree_flatten((args, kwargs))[0] if type(x) is ShardedTensor]


def _replicated_locally(func, args, kwargs):
    """An op with no rule whose ShardedTensor inputs are all replicated (plain tensors and
    numbers are replicated values too) gives the same result on every rank: run it on the
    local tensors, present tensor results as replicated (an input written in place is
    returned as itself). _NOT_LOCAL when some input is sharded or partial, or the op is
    random (each rank would draw its own values); `_tp_one` covers groups of one rank."""
    sts = _sharded_leaves(args, kwargs)
    if not sts:
        return _NOT_LOCAL
    if all(x._pg.tp_world_size() == 1 for x in sts):
        return _run_locally(func, args, kwargs, sts)
    fname = getattr(func, "__name__", "") or ""
    if not all(x._spec.is_replicate for x in sts) or any(r in fname for r in _RANDOM):
        return _NOT_LOCAL
    return _run_locally(func, args, kwargs, sts)


def _replicated_below(func, args, kwargs):
    """An aten op that reached __torch_dispatch__ (torch.func transforms run below
    __torch_function__: transformers 4.x vmaps its causal mask over a `cache_position` that
    assisted decoding made replicated) with every ShardedTensor replicated: each holds the whole
    value, so the op runs on them as serially, giving plain tensors. _NOT_LOCAL for an op that
    writes (the wrapper would not follow) or draws random numbers (each rank its own)."""
    sts = _sharded_leaves(args, kwargs)
    if not sts or func._schema.is_mutable or not all(x._spec.is_replicate for x in sts) or \
            any(r in func.__name__ for r in _RANDOM):
        return _NOT_LOCAL
    from torch.utils._pytree import tree_map
    unwrap = lambda x: x._local if type(x) is ShardedTensor else x
    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _tp_one(func, args, kwargs):
    """Where every ShardedTensor input lives on a tensor-parallel group of one rank (tp=1), its
    shard (any layout of degree 1) is the whole tensor: an op a rule refuses runs on the local
    tensors, exactly as serially (errors included). Called on the refusal path only."""
    sts = _sharded_leaves(args, kwargs)
    if not sts or any(x._pg.tp_world_size() != 1 for x in sts):
        return _NOT_LOCAL
    return _run_locally(func, args, kwargs, sts)


def _run_locally(func, args, kwargs, sts):
    """`func` on the local tensors of `args` (each holding its whole value): new tensor results
    are presented replicated, an input written in place is returned as itself, and one whose
    shape an in-place op changed (`unsqueeze_`, `resize_`, out= resized) takes a fresh wrapper
    of the new shape (torch.utils.swap_tensors, as transpose_'s rule does)."""
    from torch.utils._pytree import tree_map
    fname = getattr(func, "__name__", "") or ""
    if fname in _RESHAPING or "out" in kwargs:   # swap_tensors refuses weakly referenced
        import weakref                            # tensors: refuse before writing anything
        for x in sts:
            if weakref.getweakrefs(x):
                raise UnsupportedOpError(
                    f"{_trace.func_name(func)}: changing the shape of a weakly referenced "
                    f"ShardedTensor with {x._spec!r} and shape {tuple(x._gshape)} in place is "
                    f"not supported (its wrapper cannot be replaced); use the out-of-place form")
    owners = {id(x._local): x for x in sts}
    shapes = [(x, x._local.shape) for x in sts]
    pg = sts[0]._pg
    unwrap = lambda x: x._local if type(x) is ShardedTensor else x
    _trace.current_op[0] = func
    with _DisableTF():
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    for x, shape in shapes:
        if x._local.shape != shape:
            _reshaped_in_place(x)

    def present(y):
        if not isinstance(y, torch.Tensor) or type(y) is ShardedTensor:
            return y
        owner = owners.get(id(y))
        return owner if owner is not None else wrap(y, _REPLICA, pg, y.shape)
    return tree_map(present, out)


def _reshaped_in_place(x: "ShardedTensor") -> None:
    """`x`'s shard (its whole value) changed shape in place: `x` presents it, replicated."""
    fresh = wrap(x._local, _REPLICA, x._pg, x._local.shape, x._compute_spec)
    fresh.__dict__.update({k: v for k, v in x.__dict__.items() if k not in OWN_ATTRS})
    torch.utils.swap_tensors(x, fresh)


def _no_rule(func, args, kwargs):
    out = _replicated_locally(func, args, kwargs)
    if out is not _NOT_LOCAL:
        return out
    name = _trace.func_name(func)
    specs = _specs_of(args, kwargs)
    if config.fallback != "gather":
        raise UnsupportedOpError(
            f"{name} has no sharding rule for inputs {specs}; set shardtensor.config.fallback = "
            f"'gather' to run it serially, or register a rule (see tutorials/06_custom_rule.ipynb)")
    if _writes(func, kwargs):
        raise UnsupportedOpError(f"{name} writes into its input and has no sharding rule for "
                                 f"inputs {specs}; the gather fallback cannot write back into a "
                                 f"shard. Register a rule (see tutorials/06_custom_rule.ipynb)")
    return _gather(func, args, kwargs)


def _writes(func, kwargs) -> bool:
    fname = getattr(func, "__name__", "")
    return "out" in kwargs or (fname.endswith("_") and not fname.endswith("__"))


def _gather(func, args, kwargs, stacklevel: int = 4):
    """config.fallback = "gather": gather the ShardedTensor inputs, run `func` serially, warn
    once per op."""
    if func not in _WARNED:
        name = _trace.func_name(func)
        specs = _specs_of(args, kwargs)
        _WARNED.add(func)
        warnings.warn(f"shardtensor: {name} has no sharding rule for these inputs; gathering "
                      f"its inputs {specs} and running it serially (config.fallback = 'gather')",
                      stacklevel=stacklevel)
    from torch.utils._pytree import tree_map
    _trace.current_op[0] = func
    unwrap = lambda x: x.full() if isinstance(x, ShardedTensor) else x
    with _DisableTF():
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
