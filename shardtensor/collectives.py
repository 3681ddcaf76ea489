"""Autograd-aware collectives on local shards: Megatron's f/g pairs and their relatives.

Each is a small `torch.autograd.Function` whose name says what it does forward; its backward is
the conjugate collective, itself run as the conjugate Function when the backward builds a graph
(`create_graph=True`), so gradients of any order are exact. Every collective issued reports to
`CommTrace`. A group of one rank
communicates nothing. `redistribute_local` moves a local shard between any two layouts.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from . import trace as _trace
from .spec import ShardSpec, Spec, assemble, shard_spec, local_size, shard_ranges, take_shard

__all__ = [
    "copy_to_region", "reduce_from_region", "gather_from_region", "scatter_to_region",
    "reduce_scatter_to_region", "all_to_all_region", "partial_from_replica",
    "partial_from_shard", "replica_from_summand_grads", "redistribute_local", "all_reduce_",
]

_all_gather_base = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_base = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _record(kind: str, t: torch.Tensor, pg, op, phase: str) -> None:
    if _trace._ACTIVE:
        _trace.record(kind, t.numel() * t.element_size(), pg.tp_world_size(), op, phase)


# --- raw collectives (no autograd) -------------------------------------------------------------

def gather_output(shape, like: torch.Tensor) -> torch.Tensor:
    """An empty tensor for a gather to write into (`like`'s dtype and device): a normal tensor
    under `inference_mode` too, since torch < 2.5's gloo writes the gathered pieces from its
    own thread, outside InferenceMode, and refuses to write into an inference tensor."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return torch.empty(shape, dtype=like.dtype, device=like.device)
    return like.new_empty(shape)


_CONTIGUOUS = torch.contiguous_format
# dtypes the backends cannot move (gloo: int16, uint16/32/64, float8; nccl: int16): gathered and
# exchanged as their bytes (a contiguous tensor viewed as uint8 is its last dim times itemsize)
_AS_BYTES = frozenset(getattr(torch, n) for n in (
    "int16", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz") if hasattr(torch, n))
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _cat_refused(dtype) -> bool:
    try:   # torch < 2.5's CPU cat of small contiguous inputs along a dim > 0 has no float8 kernel
        torch.cat([torch.zeros(1, 1, dtype=dtype)] * 2, 1)
        return False
    except RuntimeError:
        return True


# of those, the dtypes an all-to-all joins as their bytes (its pieces meet along the source dim)
_CAT_AS_BYTES = frozenset(t for t in _AS_BYTES if _cat_refused(t))


def all_reduce_(x: torch.Tensor, pg, op=None, phase: str = "forward",
                reduce_op: str = "sum") -> torch.Tensor:
    """Reduce `x` in place over the tensor-parallel group: "sum" (default), "max" or "min"
    (max/min have no autograd conjugate: use them on detached values, e.g. a softmax shift)."""
    if pg.tp_world_size() == 1:
        return x
    _record("all_reduce", x, pg, op, phase)
    if not x.is_contiguous():   # the backends reduce memory, not elements: ranks whose summands
        y = x.contiguous()      # have other strides (a permuted einsum output) must not mix
        dist.all_reduce(y, op=_REDUCE_OPS[reduce_op], group=pg.tp_process_group())
        return x.copy_(y)
    dist.all_reduce(x, op=_REDUCE_OPS[reduce_op], group=pg.tp_process_group())
    return x


def _all_gather(x: torch.Tensor, spec: ShardSpec, n: int, pg, op, phase) -> torch.Tensor:
    """Gather the pieces of a dim of global size n laid out by `spec`, uneven pieces included."""
    d, dim = pg.tp_world_size(), spec.dim
    if d == 1:
        return x
    sizes = [local_size(n, d, spec.stride, r) for r in range(d)]
    m = max(sizes)
    xt = x.movedim(dim, 0) if dim else x
    if xt.shape[0] < m:  # pad this rank's piece to the largest so every rank sends the same
        xt = torch.cat([xt, xt.new_zeros((m - xt.shape[0],) + tuple(xt.shape[1:]))])
    xt = xt.contiguous()
    # (a trailing dim of 1 first: the bytes widen it, never the gathered dim of a 1-D piece)
    wire = (xt.unsqueeze(-1).clone(memory_format=_CONTIGUOUS).view(torch.uint8)
            if xt.dtype in _AS_BYTES else xt)
    out = gather_output((d * m,) + tuple(wire.shape[1:]), wire)
    _record("all_gather", out, pg, op, phase)
    _all_gather_base(out, wire, group=pg.tp_process_group())
    if wire is not xt:
        out = out.view(xt.dtype).squeeze(-1)
    if m * d == n and spec.stride == 1:
        full = out
    else:
        pieces = [out.narrow(0, r * m, sizes[r]) for r in range(d)]
        full = assemble(pieces, shard_spec(0, d, spec.stride))
    return _in_layout_of(full.movedim(0, dim) if dim else full, x)


def _in_layout_of(full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gathered `full` laid out in memory like its shard `x` (contiguous for a contiguous
    shard), as the serial tensor is: what a stride-dependent op computes follows the memory order
    (torch.multinomial draws its exponentials in it: top-p sampling after the sort of a gathered
    vocab-sharded row drew other tokens than serial's)."""
    if x.is_contiguous():   # through 1-D: serial's strides on size-1 dims too, which a
        return full.contiguous().view(-1).view(full.shape)   # contiguous tensor may lack
    return empty_in_dim_order(full.shape, x, dtype=full.dtype, device=full.device).copy_(full)


def empty_in_dim_order(shape, x: torch.Tensor, **kw) -> torch.Tensor:
    """An empty tensor of `shape` whose dims lie in memory in the order of `x`'s strides
    (outermost first), as `empty_like(x)` lays out a dense x."""
    perm = sorted(range(x.dim()), key=lambda k: -x.stride(k))
    out = torch.empty([shape[k] for k in perm], **kw)
    return out.permute([perm.index(k) for k in range(x.dim())])


def _reduce_scatter(x: torch.Tensor, spec: ShardSpec, pg, op, phase) -> torch.Tensor:
    """Sum full-shaped summands over the group and keep this rank's piece of `spec.dim`."""
    d, dim = pg.tp_world_size(), spec.dim
    if d == 1:
        return x
    n = x.shape[dim]
    sizes = [local_size(n, d, spec.stride, r) for r in range(d)]
    m = max(sizes)
    xt = x.movedim(dim, 0) if dim else x
    s0 = shard_spec(0, d, spec.stride)
    if m * d == n and spec.stride == 1:
        send = xt.contiguous()
    else:
        parts = []
        for r in range(d):
            p = take_shard(xt, s0, r)
            if sizes[r] < m:
                p = torch.cat([p, p.new_zeros((m - sizes[r],) + tuple(p.shape[1:]))])
            parts.append(p)
        send = torch.cat(parts).contiguous()
    out = send.new_empty((m,) + tuple(send.shape[1:]))
    _record("reduce_scatter", send, pg, op, phase)
    _reduce_scatter_base(out, send, group=pg.tp_process_group())
    me = pg.tp_local_rank()
    if sizes[me] < m:
        out = out[: sizes[me]]
    return out.movedim(0, dim) if dim else out


def _all_to_all(x: torch.Tensor, src: ShardSpec, dst: ShardSpec, full_shape: Sequence[int], pg,
                op, phase) -> torch.Tensor:
    """Shard(src.dim) -> Shard(dst.dim): send every rank its piece of dst.dim, receive this
    rank's piece of dst.dim from every rank, and join them along src.dim."""
    d = pg.tp_world_size()
    if d == 1:
        return x
    me = pg.tp_local_rank()
    nb, na = full_shape[dst.dim], full_shape[src.dim]
    send_pieces = [take_shard(x, dst, j).contiguous() for j in range(d)]
    send = torch.cat([p.reshape(-1) for p in send_pieces])
    recv_shapes = []
    for i in range(d):
        s = list(x.shape)
        s[src.dim] = local_size(na, d, src.stride, i)
        s[dst.dim] = local_size(nb, d, dst.stride, me)
        recv_shapes.append(s)
    recv_numels = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv = send.new_empty(sum(recv_numels))
    _record("all_to_all", send, pg, op, phase)
    raw = send.dtype in _AS_BYTES
    k = send.element_size() if raw else 1
    dist.all_to_all_single(recv.view(torch.uint8) if raw else recv,
                           send.view(torch.uint8) if raw else send,
                           output_split_sizes=[k * c for c in recv_numels],
                           input_split_sizes=[k * p.numel() for p in send_pieces],
                           group=pg.tp_process_group())
    if send.dtype in _CAT_AS_BYTES:   # joined as bytes: each piece with a trailing dim of k
        by = shard_spec(src.dim % x.dim(), src.degree, src.stride)
        pieces = [c.view(s + [k]) for c, s in zip(torch.split(recv.view(torch.uint8),
                                                              [k * c for c in recv_numels]),
                                                  recv_shapes)]
        return assemble(pieces, by).view(send.dtype).squeeze(-1)
    pieces = [c.view(s) for c, s in zip(torch.split(recv, recv_numels), recv_shapes)]
    return assemble(pieces, src)


# --- autograd Functions ------------------------------------------------------------------------
#
# Every Function here is linear, so its backward is a linear map too; when a graph is being built
# through it (`create_graph=True`: gradient penalties, Hessian-vector products, double backward)
# the backward computes that map with the *conjugate* Function: the one whose forward is this
# backward and whose backward is this forward (Megatron's f/g pairs): CopyToRegion <->
# ReduceFromRegion, GatherFromRegion <-> ScatterToRegion, ReduceScatterToRegion <->
# GatherToSummands, AllToAll(src, dst) <-> AllToAll(dst, src), PartialFromReplica <->
# ReplicaFromSummandGrads, PartialFromShard <-> ShardOfSummandGrad. Higher orders recurse. The
# layouts of the cotangents make each pair adjoint: a replicated value's cotangent is one value
# (the same on every rank), a shard's or a summand's is one per rank. Without a graph the
# backward runs the raw collective (the first-order fast path: one check more, nothing else).


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity (a replicated value enters a parallel region). Backward: all-reduce."""

    @staticmethod
    def forward(ctx, x, pg, op):
        ctx.pg, ctx.op = pg, op
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return _ReduceFromRegion.apply(g, ctx.pg, ctx.op, False, "backward"), None, None
        return all_reduce_(g.clone(memory_format=_CONTIGUOUS), ctx.pg, ctx.op, "backward"), None, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: all-reduce (summands become the replicated sum). Backward: identity."""

    @staticmethod
    def forward(ctx, x, pg, op, inplace, phase):
        ctx.pg, ctx.op = pg, op
        return all_reduce_(x if inplace else x.clone(memory_format=_CONTIGUOUS), pg, op, phase)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return _CopyToRegion.apply(g, ctx.pg, ctx.op), None, None, None, None
        return g, None, None, None, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather the shards of `spec.dim`. Backward: keep this rank's shard."""

    @staticmethod
    def forward(ctx, x, spec, n, pg, op, phase):
        ctx.spec, ctx.pg, ctx.op = spec, pg, op
        return _all_gather(x, spec, n, pg, op, phase)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return _ScatterToRegion.apply(g, ctx.spec, ctx.pg, ctx.op), None, None, None, None, None
        return take_shard(g, ctx.spec, ctx.pg.tp_local_rank()), None, None, None, None, None


class _ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's shard of a replicated value (no communication).
    Backward: all-gather the gradient shards."""

    @staticmethod
    def forward(ctx, x, spec, pg, op):
        ctx.spec, ctx.pg, ctx.op, ctx.n = spec, pg, op, x.shape[spec.dim]
        return take_shard(x, spec, pg.tp_local_rank()).clone()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return (_GatherFromRegion.apply(g, ctx.spec, ctx.n, ctx.pg, ctx.op, "backward"),
                    None, None, None)
        return _all_gather(g, ctx.spec, ctx.n, ctx.pg, ctx.op, "backward"), None, None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    """Forward: reduce-scatter summands into shards. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, spec, pg, op, phase):
        ctx.spec, ctx.pg, ctx.op, ctx.n = spec, pg, op, x.shape[spec.dim]
        return _reduce_scatter(x, spec, pg, op, phase)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return (_GatherToSummands.apply(g, ctx.spec, ctx.n, ctx.pg, ctx.op),
                    None, None, None, None)
        return _all_gather(g, ctx.spec, ctx.n, ctx.pg, ctx.op, "backward"), None, None, None, None


class _GatherToSummands(torch.autograd.Function):
    """ReduceScatterToRegion's conjugate (only built in a backward that builds a graph): forward
    all-gather the shards, the result taken as every rank's summand; backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x, spec, n, pg, op):
        ctx.spec, ctx.pg, ctx.op = spec, pg, op
        return _all_gather(x, spec, n, pg, op, "backward")

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return (_ReduceScatterToRegion.apply(g, ctx.spec, ctx.pg, ctx.op, "backward"),
                    None, None, None, None)
        return _reduce_scatter(g, ctx.spec, ctx.pg, ctx.op, "backward"), None, None, None, None


class _AllToAll(torch.autograd.Function):
    """Forward: Shard(src.dim) -> Shard(dst.dim) by all-to-all. Backward: the reverse."""

    @staticmethod
    def forward(ctx, x, src, dst, full_shape, pg, op, phase):
        ctx.args = (src, dst, full_shape, pg, op)
        return _all_to_all(x, src, dst, full_shape, pg, op, phase)

    @staticmethod
    def backward(ctx, g):
        src, dst, full_shape, pg, op = ctx.args
        if torch.is_grad_enabled() and g.requires_grad:
            return (_AllToAll.apply(g, dst, src, full_shape, pg, op, "backward"),
                    None, None, None, None, None, None)
        return (_all_to_all(g, dst, src, full_shape, pg, op, "backward"),
                None, None, None, None, None, None)


class _PartialFromReplica(torch.autograd.Function):
    """Forward: rank 0 keeps the value, the others hold zeros (their sum is the value).
    Backward: identity (a summand's gradient is the sum's gradient)."""

    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return x.clone() if pg.tp_local_rank() == 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return _ReplicaFromSummandGrads.apply(g, ctx.pg), None
        return g, None


class _ReplicaFromSummandGrads(torch.autograd.Function):
    """Summands' gradients (equal on every rank: the gradient of their sum) taken as the one
    replicated gradient. Forward: identity. Backward: rank 0's summand gets the cotangent, the
    others zeros (counted once; PartialFromReplica's forward). PartialFromReplica's conjugate,
    and how `autograd.grad` presents a summand input's gradient when it builds a graph."""

    @staticmethod
    def forward(ctx, g, pg):
        ctx.pg = pg
        return g.view_as(g)

    @staticmethod
    def backward(ctx, c):
        if torch.is_grad_enabled() and c.requires_grad:
            return _PartialFromReplica.apply(c, ctx.pg), None
        return (c.clone() if ctx.pg.tp_local_rank() == 0 else torch.zeros_like(c)), None


def _place_shard(x, spec, full_shape, rank):
    """`x` (this rank's shard of `spec.dim`) in zeros of `full_shape`."""
    out = x.new_zeros(full_shape)
    ranges = shard_ranges(full_shape[spec.dim], spec.degree, spec.stride, rank)
    if ranges[0][1]:
        for (start, length), piece in zip(ranges, torch.split(x, ranges[0][1], spec.dim)):
            out.narrow(spec.dim, start, length).copy_(piece)
    return out


class _PartialFromShard(torch.autograd.Function):
    """Forward: this rank's shard placed in zeros of the full shape. Backward: take the shard.
    (A Function, not slicing ops, so that an empty shard stays connected to the graph: every
    rank must run the same backward collectives.)"""

    @staticmethod
    def forward(ctx, x, spec, full_shape, pg):
        ctx.spec, ctx.shape, ctx.pg, ctx.rank = spec, full_shape, pg, pg.tp_local_rank()
        return _place_shard(x, spec, full_shape, ctx.rank)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and g.requires_grad:
            return _ShardOfSummandGrad.apply(g, ctx.spec, ctx.shape, ctx.pg), None, None, None
        return take_shard(g, ctx.spec, ctx.rank), None, None, None


class _ShardOfSummandGrad(torch.autograd.Function):
    """PartialFromShard's conjugate: forward this rank's shard of the summands' gradient;
    backward the shard placed in zeros (this rank's summand)."""

    @staticmethod
    def forward(ctx, g, spec, full_shape, pg):
        ctx.spec, ctx.shape, ctx.pg = spec, full_shape, pg
        return take_shard(g, spec, pg.tp_local_rank()).clone()

    @staticmethod
    def backward(ctx, c):
        if torch.is_grad_enabled() and c.requires_grad:
            return _PartialFromShard.apply(c, ctx.spec, ctx.shape, ctx.pg), None, None, None
        return _place_shard(c, ctx.spec, ctx.shape, ctx.pg.tp_local_rank()), None, None, None


# --- public wrappers (local tensors in, local tensors out) -------------------------------------

def copy_to_region(x: torch.Tensor, pg, op=None) -> torch.Tensor:
    if pg.tp_world_size() == 1 or not x.requires_grad:
        return x
    return _CopyToRegion.apply(x, pg, op)


def reduce_from_region(x: torch.Tensor, pg, op=None, inplace: bool = False) -> torch.Tensor:
    if pg.tp_world_size() == 1:
        return x
    return _ReduceFromRegion.apply(x, pg, op, inplace, "forward")


def gather_from_region(x: torch.Tensor, spec: ShardSpec, n: int, pg, op=None) -> torch.Tensor:
    if pg.tp_world_size() == 1:
        return x
    return _GatherFromRegion.apply(x, spec, n, pg, op, "forward")


def scatter_to_region(x: torch.Tensor, spec: ShardSpec, pg, op=None) -> torch.Tensor:
    if pg.tp_world_size() == 1:
        return x
    if not x.requires_grad:
        return take_shard(x, spec, pg.tp_local_rank())
    return _ScatterToRegion.apply(x, spec, pg, op)


def reduce_scatter_to_region(x: torch.Tensor, spec: ShardSpec, pg, op=None) -> torch.Tensor:
    if pg.tp_world_size() == 1:
        return x
    return _ReduceScatterToRegion.apply(x, spec, pg, op, "forward")


def all_to_all_region(x: torch.Tensor, src: ShardSpec, dst: ShardSpec, full_shape, pg,
                      op=None) -> torch.Tensor:
    if pg.tp_world_size() == 1:
        return x
    return _AllToAll.apply(x, src, dst, tuple(full_shape), pg, op, "forward")


def partial_from_replica(x: torch.Tensor, pg) -> torch.Tensor:
    if pg.tp_world_size() == 1:
        return x
    return _PartialFromReplica.apply(x, pg)


def partial_from_shard(x: torch.Tensor, spec: ShardSpec, full_shape, pg) -> torch.Tensor:
    """A shard as a summand: zeros outside this rank's piece. Local; backward slices back."""
    if pg.tp_world_size() == 1:
        return x
    return _PartialFromShard.apply(x, spec, tuple(full_shape), pg)


def replica_from_summand_grads(g: torch.Tensor, pg) -> torch.Tensor:
    """The gradient of a partial value's summands (the same on every rank: the gradient of the
    sum) as the one replicated gradient; where it is part of a graph (create_graph=True), its
    own gradient is counted once (rank 0's summand), not once per rank."""
    if pg.tp_world_size() == 1 or not g.requires_grad:
        return g
    return _ReplicaFromSummandGrads.apply(g, pg)


def redistribute_local(x: torch.Tensor, src: Spec, dst: Spec, full_shape, pg, op=None,
                       inplace: bool = False) -> torch.Tensor:
    """This rank's local tensor of a value moved from layout `src` to `dst` (both normalised),
    using the one collective the move needs (none where none is needed). Differentiable."""
    if src == dst:
        return x
    if src.is_shard:
        if dst.is_replicate:
            return gather_from_region(x, src, full_shape[src.dim], pg, op)
        if dst.is_partial:
            return partial_from_shard(x, src, full_shape, pg)
        if dst.dim == src.dim:  # same dim, another stride: through the full value
            return scatter_to_region(gather_from_region(x, src, full_shape[src.dim], pg, op),
                                     dst, pg, op)
        return all_to_all_region(x, src, dst, full_shape, pg, op)
    if src.is_replicate:
        if dst.is_shard:
            return scatter_to_region(x, dst, pg, op)
        return partial_from_replica(x, pg)
    # src is partial
    if dst.is_replicate:
        return reduce_from_region(x, pg, op, inplace)
    return reduce_scatter_to_region(x, dst, pg, op)


# --- max / min reductions (appended for the reduction rules) -----------------------------------

def all_reduce_max_(x: torch.Tensor, pg, op=None, phase: str = "forward") -> torch.Tensor:
    """Elementwise maximum of `x` over the tensor-parallel group, in place (no autograd)."""
    return all_reduce_(x, pg, op, phase, reduce_op="max")


def all_reduce_min_(x: torch.Tensor, pg, op=None, phase: str = "forward") -> torch.Tensor:
    """Elementwise minimum of `x` over the tensor-parallel group, in place (no autograd)."""
    return all_reduce_(x, pg, op, phase, reduce_op="min")


class _ExtremumFromRegion(torch.autograd.Function):
    """Forward: all-reduce max (or min) of per-rank candidates. Backward: the gradient goes to
    the ranks whose candidate is the extremum, split equally among them (one all-reduce counts
    them), like torch.amax splits it among ties."""

    @staticmethod
    def forward(ctx, x, pg, op, largest):
        y = x.clone()
        (all_reduce_max_ if largest else all_reduce_min_)(y, pg, op, "forward")
        ctx.save_for_backward(x, y)
        ctx.pg, ctx.op = pg, op
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        hit = (x == y).to(g.dtype)
        count = all_reduce_(hit.clone(), ctx.pg, ctx.op, "backward")
        if torch.is_grad_enabled() and g.requires_grad:
            # the share is piecewise constant in x; as a map of g its adjoint sums the ranks'
            # shares of the cotangents: CopyToRegion's all-reduce
            share = hit / count.clamp_min(1)
            return _CopyToRegion.apply(g, ctx.pg, ctx.op) * share, None, None, None
        return g * hit / count.clamp_min(1), None, None, None


def max_from_region(x: torch.Tensor, pg, op=None) -> torch.Tensor:
    """The elementwise maximum over the group of every rank's `x` (replicated), differentiable."""
    if pg.tp_world_size() == 1:
        return x
    if not x.requires_grad:
        return all_reduce_max_(x.clone(), pg, op)
    return _ExtremumFromRegion.apply(x, pg, op, True)


def min_from_region(x: torch.Tensor, pg, op=None) -> torch.Tensor:
    """The elementwise minimum over the group of every rank's `x` (replicated), differentiable."""
    if pg.tp_world_size() == 1:
        return x
    if not x.requires_grad:
        return all_reduce_min_(x.clone(), pg, op)
    return _ExtremumFromRegion.apply(x, pg, op, False)
