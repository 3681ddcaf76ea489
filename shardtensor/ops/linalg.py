"""Matrix factorizations and the identity. A factorization has no communication-free form on a
sharded matrix; the one here serves `nn.init.orthogonal_` (a one-off at initialisation) with
serial's exact values. `torch.eye(out=sharded)` (`nn.init.eye_`) fills each shard locally."""
from __future__ import annotations

import torch

from ._util import REPLICA, ST, ShardingError, group_of, materialize, rule, to_layout, wrap


@rule(torch.linalg.qr)
def qr(func, args, kwargs):
    """`torch.linalg.qr(A)`: a sharded A is gathered (one all-gather of the matrix, which
    `CommTrace` shows under this op) and factorized on every rank, so Q and R are replicated and
    equal serial's; a partial A is reduced first. Differentiable like serial's."""
    a = args[0]
    if kwargs.get("out") is not None:
        raise ShardingError("torch.linalg.qr(out=...) with a ShardedTensor: take the result "
                            "instead (Q and R come back replicated)")
    pg = group_of(func, a)
    full = materialize(a, func) if a._spec.is_partial else to_layout(a, REPLICA, pg, func)
    q, r = func(full, *args[1:], **kwargs)
    return torch.return_types.linalg_qr(
        (wrap(q, REPLICA, pg, q.shape), wrap(r, REPLICA, pg, r.shape)))


@rule(torch.eye)
def eye(func, args, kwargs):
    """`torch.eye(n, m, out=x)` into a ShardedTensor x of shape (n, m) (`nn.init.eye_`): each
    rank writes its piece of the identity (no communication); x keeps its layout (a partial x
    becomes replicated)."""
    out = kwargs.get("out")
    if type(out) is not ST:
        raise ShardingError("torch.eye: only out= may be a ShardedTensor")
    n = args[0] if args else kwargs["n"]
    m = args[1] if len(args) > 1 else kwargs.get("m", n)
    if m is None:
        m = n
    if tuple(out._gshape) != (n, m):
        raise ShardingError(f"torch.eye({n}, {m}, out=x): x is a ShardedTensor of shape "
                            f"{tuple(out._gshape)} with {out._spec!r}, which cannot be resized; "
                            f"pass an out of shape ({n}, {m})")
    loc = out._local
    spec = out._spec
    rows, cols = torch.arange(n, device=loc.device), torch.arange(m, device=loc.device)
    if spec.is_shard:
        from ..spec import take_shard
        rank = out._pg.tp_local_rank()
        if spec.dim == 0:
            rows = take_shard(rows, spec.__class__(0, spec.degree, spec.stride), rank)
        else:
            cols = take_shard(cols, spec.__class__(0, spec.degree, spec.stride), rank)
    with torch.no_grad():
        loc.copy_(rows[:, None] == cols[None, :])
    if spec.is_partial:
        out._spec = REPLICA
    if kwargs.get("requires_grad"):
        out.requires_grad_(True)
    return out
