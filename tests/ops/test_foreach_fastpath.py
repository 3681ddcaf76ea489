"""The optimizer's hot paths: the `ShardedTensor.grad` property (answered without dispatch) and
the foreach rule's one-local-call path, on every layout, against the serial values."""
import pytest
import torch

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS

F64 = torch.float64


def _layouts(n, partial=True):
    # uneven (7 rows over 2 and 4), a strided shard, replicated, and partial or another shard
    return [st.ShardSpec(0, n), st.ShardSpec(1, n, stride=2), st.ReplicaSpec(),
            st.PartialSpec() if partial else st.ShardSpec(1, n)]


def _fulls(seed, k=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(7, 4, generator=g, dtype=F64) + 0.5 for _ in range(k)]


def _grad_property(rank):
    pg = st.ProcessGroup()
    out = []
    for spec, full, gfull in zip(_layouts(pg.tp_world_size(), partial=False), _fulls(0), _fulls(1)):
        p = st.ShardedTensor.from_global(full, pg, spec).detach().requires_grad_()
        assert p.grad is None and torch.Tensor.grad.__get__(p) is None
        (p * p).sum().backward()                        # d/dp sum(p^2) = 2p
        g = p.grad
        assert isinstance(g, st.ShardedTensor) and g.to_local() is p.to_local().grad
        assert g.spec == spec and g.shape == p.shape
        assert p.grad is g and torch.Tensor.grad.__get__(p) is g   # one cached wrapper
        res = [g.full()]
        # setting from another layout redistributes onto the parameter's
        p.grad = st.ShardedTensor.from_global(gfull, pg, st.ReplicaSpec())
        assert p.grad is not g and p.grad.to_local() is p.to_local().grad
        assert p.grad.spec == spec
        res.append(p.grad.full())
        with pytest.raises(st.ShardingError, match="plain tensor"):
            p.grad = gfull
        p.grad = st.ShardedTensor.from_global(2 * gfull, pg, spec)
        res.append(p.grad.full())
        del p.grad
        assert p.grad is None and p.to_local().grad is None
        torch.Tensor.grad.__set__(p, st.ShardedTensor.from_global(gfull, pg, st.ReplicaSpec()))
        res.append(p.grad.full())
        p.grad = None
        assert p.grad is None and p.to_local().grad is None
        out.append(res)
    # a partial parameter's gradient (each summand's) is the replicated gradient of the sum
    p = st.ShardedTensor.from_global(_fulls(0)[0], pg, st.PartialSpec()).detach().requires_grad_()
    p.to_local().grad = torch.full_like(p.to_local(), 2.0)
    assert p.grad.spec == st.ReplicaSpec() and p.grad is torch.Tensor.grad.__get__(p)
    out.append([p.grad.full()])
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_grad_property_matches_serial(world):
    fulls, gfulls = _fulls(0), _fulls(1)
    for out in run(world, _grad_property):
        for res, full, gfull in zip(out[:-1], fulls, gfulls):
            for got, want in zip(res, [2 * full, gfull, 2 * gfull, gfull], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[-1][0], torch.full((7, 4), 2.0, dtype=F64))


# (name, fn(xs, ys)) over lists whose rows share a layout, including partial ones
OPS = [
    ("add_ list", lambda xs, ys: torch._foreach_add_(xs, ys, alpha=0.5)),
    ("mul_ scalar", lambda xs, ys: torch._foreach_mul_(xs, 2.0)),
    ("sqrt", lambda xs, ys: torch._foreach_sqrt(xs)),
    ("addcmul_ same list twice", lambda xs, ys: torch._foreach_addcmul_(xs, ys, ys, value=0.5)),
    ("addcdiv_ scalars", lambda xs, ys: torch._foreach_addcdiv_(xs, ys, xs, [0.1, 0.2, 0.3, 0.4])),
    ("lerp_", lambda xs, ys: torch._foreach_lerp_(xs, ys, 0.25)),
    ("div list", lambda xs, ys: torch._foreach_div(xs, ys)),
]


def _apply(rank, idx, case):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    lay = _layouts(n, partial=False)
    xs, ys = _fulls(2), _fulls(3)
    if case == "same":              # one spec object per row, shared by both lists
        xspecs = yspecs = lay
    elif case == "equal":           # equal, not identical, specs (e.g. loaded optimizer state)
        xspecs, yspecs = lay, _layouts(n, partial=False)
    elif case == "partial":         # rows that share a layout, some of them partial
        xspecs = yspecs = _layouts(n)
    elif case == "partial first":   # partial values in the first list only
        xspecs, yspecs = [st.PartialSpec()] * 4, lay
    else:                           # a plain tensor in the last row of the first list
        xspecs, yspecs = lay[:3] + [None], lay
    X = [x if s is None else st.ShardedTensor.from_global(x, pg, s) for x, s in zip(xs, xspecs)]
    Y = [y if s is None else st.ShardedTensor.from_global(y, pg, s) for y, s in zip(ys, yspecs)]
    with torch.no_grad(), st.CommTrace() as trace:
        out = OPS[idx][1](X, Y)
    out = X if out is None else out
    return ([o.full() if isinstance(o, st.ShardedTensor) else o for o in out],
            [o.spec if isinstance(o, st.ShardedTensor) else None for o in out],
            [e.kind for e in trace.events])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["same", "equal", "partial", "partial first", "plain row"])
@pytest.mark.parametrize("idx", range(len(OPS)))
def test_foreach_rows_match_serial(world, case, idx):
    xs, ys = _fulls(2), _fulls(3)
    ref = OPS[idx][1](xs, ys)
    ref = xs if ref is None else ref
    for outs, specs_, kinds in run(world, _apply, idx, case):
        assert len(outs) == len(ref)
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=OPS[idx][0])
        if case in ("same", "equal"):   # one local call: layouts kept, nothing communicated
            assert specs_ == _layouts(world, partial=False), (OPS[idx][0], specs_)
            assert kinds == [], (OPS[idx][0], kinds)
