"""tp = 1 (world 1, or a tensor-parallel group of one rank inside data parallelism): a layout of
degree 1 holds the whole tensor, so every op serial supports behaves as serially (value,
gradient, in-place and out= writes, views, errors), including ops whose rules refuse a sharded
dim and ops with no rule. One pool task per world runs the whole table."""
import pytest
import torch
import torch.nn.functional as F

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS

T = torch.Tensor


def _idx(n, k, shape=None):
    g = torch.Generator().manual_seed(n * 31 + k)
    return torch.randint(0, n, shape or (k,), generator=g)


def _clone(x):
    return x.detach().clone()


def _unsqueeze_(x, y):
    z = x * 1
    out = z.unsqueeze_(0)
    assert out is z
    return z, z.shape


def _out_resized(x, y):
    o = _clone(x).new_empty(0)   # serial resizes out=
    torch.cumsum(_clone(x), 1, out=o)
    return o, o.shape


def _out_given(x, y):
    o = torch.empty_like(_clone(x))
    r = torch.cummax(_clone(x), 1, out=(o, torch.empty(x.shape, dtype=torch.long)))
    return o, r.indices


def _step_view_sees_writes(x, y):
    b = _clone(x)
    v = b[:, ::2]          # a view in serial code: sees later writes into b, and writes into b
    b.mul_(2)
    v.add_(1)
    return v, b


def _reshape_view_sees_writes(x, y):
    b = _clone(x)
    v = b.view(6, 4)
    b.sub_(3)
    return v, b


def _embedding_max_norm(x, y):
    w = _clone(y)          # max_norm renormalises the picked rows of the table in place
    out = F.embedding(_idx(6, 5), w, max_norm=1.0)
    return out, w


def _multinomial(x, y):
    torch.manual_seed(5)
    return torch.multinomial(x.softmax(1), 7, replacement=True)


# name -> f(x, y): x (4, 6), y (6, 5), both float64 leaves (sharded with ShardSpec(d, 1))
CASES = {
    # rules that refuse the sharded dim
    "cumsum": lambda x, y: x.cumsum(1),
    "cumprod": lambda x, y: torch.cumprod(x, 0),
    "einsum3": lambda x, y: torch.einsum("ij,jk,kl->il", x, y, y.t()),
    "nuclear_norm": lambda x, y: torch.norm(x, p="nuc"),
    "matrix_2_norm": lambda x, y: torch.linalg.norm(x, ord=2),
    "index_copy": lambda x, y: x.index_copy(1, torch.tensor([4, 0]), y[:4, :2]),
    "scatter_add": lambda x, y: x.scatter_add(1, _idx(6, 2, (4, 2)), y[:4, :2]),
    "take_along_flat": lambda x, y: torch.take_along_dim(x, _idx(24, 5)),
    "where_one_arg": lambda x, y: torch.where(x > 0),
    "embedding_max_norm": _embedding_max_norm,
    "multinomial": _multinomial,
    # no rule at all
    "cummax": lambda x, y: torch.cummax(x, 1),
    "logcumsumexp": lambda x, y: torch.logcumsumexp(x, 0),
    "tril": lambda x, y: torch.tril(x, 1),
    "nonzero": lambda x, y: (x > 0.5).nonzero(),
    "kron": lambda x, y: torch.kron(x, y),
    "diff": lambda x, y: torch.diff(x, dim=1),
    "kthvalue": lambda x, y: torch.kthvalue(x, 2, 1),
    "trace": lambda x, y: torch.trace(x @ y[:, :4]),
    # in place, out=, views
    "cumsum_": lambda x, y: (x * 1).cumsum_(1),
    "unsqueeze_": _unsqueeze_,
    "t_": lambda x, y: (lambda z: (z.t_(), z.shape))(x * 1),
    "out_resized": _out_resized,
    "out_given": _out_given,
    "step_view": _step_view_sees_writes,
    "reshape_view": _reshape_view_sees_writes,
    # serial's own errors
    "leaf_in_place": lambda x, y: x.cumsum_(1),
    "out_with_grad": lambda x, y: torch.cumsum(x, 1, out=torch.empty(4, 6, dtype=x.dtype)),
    "bad_view": lambda x, y: x.t().view(24),
}


def _leaves(out):
    from torch.utils._pytree import tree_leaves
    return tree_leaves(out)


def _full(v):
    return v.full() if isinstance(v, st.ShardedTensor) else v


def _apply(name, x, y, leaves):
    """(outputs as plain values, gradients of the `leaves` x and y stand for) or the error
    raised."""
    try:
        out = [_full(v) for v in _leaves(CASES[name](x, y))]
    except Exception as e:   # noqa: BLE001 (compared with serial's)
        return f"{type(e).__name__}: {e}"
    diff = [v for v in out if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = None
    if diff:
        g = torch.Generator().manual_seed(7)
        loss = sum((v * torch.randn(v.shape, dtype=v.dtype, generator=g)).sum() for v in diff)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [v.detach() if isinstance(v, torch.Tensor) else v for v in out], grads


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) != isinstance(v, torch.Tensor):
            return False
        if isinstance(u, torch.Tensor):
            if u.shape != v.shape or u.dtype != v.dtype or not torch.allclose(
                    u, v, rtol=1e-10, atol=1e-12, equal_nan=True):
                return False
        elif u != v:
            return False
    return len(a) == len(b)


def _table_at_tp_one(rank, names):
    world = torch.distributed.get_world_size()
    pg = st.ProcessGroup(tp_degree=1, dp_degree=world)
    assert pg.tp_world_size() == 1
    torch.manual_seed(0)
    x0, y0 = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    wrong = []
    for name in names:
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        want = _apply(name, x, y, (x, y))
        for d in (0, 1):
            xs, ys = x0.clone().requires_grad_(), y0.clone().requires_grad_()
            spec = st.ShardSpec(d, 1)
            got = _apply(name, st.ShardedTensor.from_global(xs, pg, spec),
                         st.ShardedTensor.from_global(ys, pg, spec), (xs, ys))
            if isinstance(got, str) or isinstance(want, str):
                if got != want:
                    wrong.append((name, d, repr(got), repr(want)))
                continue
            if not _same(got[0], want[0]):
                wrong.append((name, d, "value", repr(got[0]), repr(want[0])))
            elif (got[1] is None) != (want[1] is None) or got[1] is not None and not all(
                    (p is None and q is None) or (p is not None and q is not None and
                                                  torch.allclose(p, q, rtol=1e-10, atol=1e-12))
                    for p, q in zip(got[1], want[1])):
                wrong.append((name, d, "grad", repr(got[1]), repr(want[1])))
    return wrong


@pytest.mark.parametrize("world", WORLDS)
def test_every_op_at_tp_one_matches_serial(world):
    # a ShardSpec(d, 1) shard is the whole tensor; rules refused it (cumsum along d, einsum of 3
    # operands, ...) and ops with no rule raised UnsupportedOpError; views were copies
    for wrong in run(world, _table_at_tp_one, list(CASES)):
        assert wrong == []
