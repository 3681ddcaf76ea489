"""What every rule needs: unwrap, layout of an argument, the common process group, moving an
argument to a layout, wrapping results. Rules import from here, never from each other."""
from __future__ import annotations

import torch

from .. import trace as _trace
from ..collectives import (copy_to_region, partial_from_replica, redistribute_local,
                           scatter_to_region)
from ..dispatch import ShardingError, rule, config  # noqa: F401  (re-exported for rule modules)
from ..spec import (PARTIAL, REPLICA, PartialSpec, ReplicaSpec, ShardSpec, Spec,  # noqa: F401
                    shard_spec)
from ..tensor import ShardedTensor, wrap  # noqa: F401

ST = ShardedTensor


_CACHE_LIMIT = 4096


def remember(cache: dict, key, value):
    """Store a pure layout decision in one of the rules' caches and return it. A cache that
    outgrows _CACHE_LIMIT entries (ever-changing shapes) starts over."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def unwrap(x):
    return x._local if type(x) is ST else x


def spec_of(x) -> Spec:
    """The layout of an argument: a plain tensor or a number is a replicated value."""
    return x._spec if type(x) is ST else REPLICA


def group_of(func, *xs):
    """The one ProcessGroup of the ShardedTensors among `xs` (ShardingError if they differ)."""
    pg = None
    for x in xs:
        if type(x) is ST:
            if pg is None:
                pg = x._pg
            elif x._pg is not pg and x._pg != pg:
                raise ShardingError(
                    f"{_trace.func_name(func)}: inputs live on different process groups "
                    f"({pg!r} and {x._pg!r}); redistribute them onto one group first")
    return pg


def to_layout(x, spec: Spec, pg, func=None):
    """The local tensor of argument `x` (ShardedTensor or plain tensor) in layout `spec`.
    A plain tensor is a replicated value: it is sliced locally, never communicated."""
    if type(x) is ST:
        if x._spec == spec:
            return x._local
        if x._spec.is_partial and spec.is_replicate:
            return _reduce_once(x, func)
        return redistribute_local(x._local, x._spec, spec, x._gshape, pg, func)
    if spec.is_replicate:
        return x
    if spec.is_shard:
        return scatter_to_region(x, spec, pg, func)
    return partial_from_replica(x, pg)


def materialize(x, func=None):
    """The local tensor of `x` with any pending partial sum reduced (replicated afterwards)."""
    if type(x) is ST and x._spec.is_partial:
        return _reduce_once(x, func)
    return unwrap(x)


def _reduce_once(x, func=None):
    """Reduce a pending partial sum and rebind `x` to the result: the global value is the same,
    `x` is replicated from now on, and every later reader uses the reduced shard instead of
    reducing again (a residual stream read by a norm and by q, k, v costs one all-reduce).
    Autograd is unchanged: the reduced shard's gradient flows back to the summand."""
    local = redistribute_local(x._local, x._spec, REPLICA, x._gshape, x._pg, func)
    x._local, x._spec = local, REPLICA
    return local


def local_index(ids: torch.Tensor, n: int, spec: ShardSpec, rank: int):
    """Global indices `ids` into a dim of size n laid out by `spec` (dim 0 of a table, the class
    dim of logits) -> (local indices, mask of the ids this rank holds). Local indices outside the
    mask are meaningless; callers fill them. Pure local arithmetic (used by embedding and loss)."""
    from ..spec import shard_ranges
    ranges = shard_ranges(n, spec.degree, spec.stride, rank)
    if len(ranges) == 1:
        start, length = ranges[0]
        return ids - start, (ids >= start) & (ids < start + length)
    lid = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    off = 0
    for start, length in ranges:
        m = (ids >= start) & (ids < start + length)
        lid = torch.where(m, ids - (start - off), lid)
        mask |= m
        off += length
    return lid, mask


class IndexOutOfRange(IndexError, RuntimeError):
    """An index outside its dim. Serial torch raises IndexError or RuntimeError for it
    depending on the op, dims and kernel (index_add_ of a 1-D tensor: IndexError, of a 2-D
    one: RuntimeError), so this is both: whatever serial code catches, it catches this."""


def check_index(ids: torch.Tensor, n: int, func, dim: int, negative: bool = False) -> None:
    """Raise IndexOutOfRange naming the op, as serial torch raises, when an index in `ids` lies
    outside [0, n) ([-n, n) where `negative`): a rule that masks the ids each rank does not
    hold would otherwise give zeros for an id no rank holds. Checked without reading a value
    on the host (a device sync that would break CUDA-graph capture), as loss.py's targets: on
    an accelerator a device-side assert, as serial's kernel asserts; on the CPU it raises here."""
    if not ids.numel() or ids.is_meta:
        return
    lo = -n if negative else 0
    what = f"{_trace.func_name(func)}: an index is out of bounds for dimension {dim} with size {n}"
    try:
        torch._assert_async(((ids >= lo) & (ids < n)).all(), what)
    except RuntimeError:
        bad = ids[(ids < lo) | (ids >= n)][0]
        raise IndexOutOfRange(f"{_trace.func_name(func)}: index {int(bad)} is out of bounds for "
                              f"dimension {dim} with size {n}") from None


def allreduce_for_shards(x, pg, func=None):
    """Sum per-rank statistics (`x`) over the group for use *inside* a sharded computation (a
    softmax denominator, a layer-norm mean): forward all-reduce, and, since every rank's shard
    then contributes to the statistic's gradient, backward all-reduce too."""
    from ..collectives import copy_to_region, reduce_from_region
    return copy_to_region(reduce_from_region(x, pg, func), pg, func)


def copy_once(x, local, pg, func=None):
    """Megatron's f (identity forward, all-reduce of the gradient backward) on the replicated
    input `x` of a column-parallel op, once per activation: q, k and v projections of the same
    hidden state share one f, so the backward pass all-reduces their summed gradient once.
    Cached only on non-leaf activations (rebuilt every step), never on parameters."""
    if type(x) is ST and local is x._local and local.grad_fn is not None:
        cached = x.__dict__.get("_f")
        if cached is not None and cached[0] is local:
            return cached[1]
        out = copy_to_region(local, pg, func)
        x.__dict__["_f"] = (local, out)
        return out
    return copy_to_region(local, pg, func)
