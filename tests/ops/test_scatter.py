"""Writing at a replicated index (ops/scatter.py): scatter_/scatter_add_/index_add_/index_fill_
(in place and not) along the sharded dim or another one, and F.pad, against serial torch:
values, the gradients of the destination and the source, and no communication except where a
partial destination is reduced or a padded sharded dim is gathered."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs

from ops.test_elementwise import make

T = torch.Tensor
OPS = ["scatter_ value", "scatter_ src", "scatter", "scatter_add_", "scatter_add", "index_add_",
       "index_add", "index_fill_"]


def _inputs(shape, dim, m, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(shape, dtype=torch.float64, generator=g)
    ishape = list(shape)
    ishape[dim] = m
    # unique positions along `dim` (an overwrite with repeated positions has no defined winner)
    perm = torch.rand(shape, generator=g).argsort(dim).narrow(dim, 0, m)
    src = torch.randn(ishape, dtype=torch.float64, generator=g)
    index = torch.randint(0, shape[dim], (m,), generator=g)
    w = torch.randn(shape, dtype=torch.float64, generator=g)
    return full, perm, index, src, w


def _apply(name, x, dim, perm, index, src):
    if name == "scatter_ value":
        return x.scatter_(dim, perm, -2.5)
    if name == "scatter_ src":
        return x.scatter_(dim, perm, src)
    if name == "scatter":   # transformers <= 5.17's repetition penalty on vocab-sharded scores
        return x.scatter(dim, perm, src)
    if name == "scatter_add_":
        return x.scatter_add_(dim, perm, src)
    if name == "scatter_add":
        return torch.scatter_add(x, dim, perm, src)
    if name == "index_add_":
        return x.index_add_(dim, index, src, alpha=0.5)
    if name == "index_add":
        return torch.index_add(x, dim, index, src)
    return x.index_fill_(dim, index, 3.0)


def _one(rank, name, shape, spec, dim, m, seed):
    pg = st.ProcessGroup()
    full, perm, index, src, w = _inputs(shape, dim, m, seed)
    full.requires_grad_()
    src.requires_grad_()
    x = make(full, spec, pg, rank, seed) * 1.0   # a fresh activation (in place is allowed)
    with st.CommTrace() as trace:
        y = _apply(name, x, dim, perm, index, src)
    inplace_same = (y is x) if name.endswith("_") or name.startswith("scatter_ ") else True
    out = y.full()
    (out * w).sum().backward()
    return out.detach(), full.grad, src.grad, [e.kind for e in trace.events], inplace_same


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_index_writes_match_serial(world, data):
    shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=7))
    spec = data.draw(specs(shape, world))
    dim = data.draw(hs.integers(0, len(shape) - 1))
    m = data.draw(hs.integers(1, shape[dim]))
    name = data.draw(hs.sampled_from(OPS))
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _one, name, shape, spec, dim, m, seed)
    full, perm, index, src, w = _inputs(shape, dim, m, seed)
    full.requires_grad_()
    src.requires_grad_()
    ref = _apply(name, full * 1.0, dim, perm, index, src)
    (ref * w).sum().backward()
    nspec = spec.normalize(shape)
    gx = [r[1] for r in res]
    if nspec.is_partial:
        gx = gx[:1]   # rank 0's summand holds the value
    for out, _, gsrc, kinds, same in res:
        torch.testing.assert_close(out, ref.detach(), msg=name)
        if name not in ("scatter_ value", "index_fill_"):
            torch.testing.assert_close(gsrc, src.grad, msg=name)
        assert same, name
        assert set(kinds) <= ({"all_reduce"} if nspec.is_partial and world > 1 else set()), kinds
    for g in gx:
        torch.testing.assert_close(g, full.grad, msg=name)


def _pad(rank, shape, spec, widths, value, seed):
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    x = make(full, spec, pg, rank, seed)
    with st.CommTrace() as trace:
        y = F.pad(x, widths, value=value)
    out = y.full()
    w = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (out * w).sum().backward()
    return out.detach(), full.grad, y.spec, [e.kind for e in trace.events]


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_pad_matches_serial(world, data):
    shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=6))
    spec = data.draw(specs(shape, world))
    k = data.draw(hs.integers(1, len(shape)))
    widths = tuple(data.draw(hs.integers(0, 2)) for _ in range(2 * k))
    value = data.draw(hs.sampled_from([0.0, 1.5]))
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _pad, shape, spec, widths, value, seed)
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    ref = F.pad(full, widths, value=value)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (ref * w).sum().backward()
    nspec = spec.normalize(shape)
    padded = {len(shape) - 1 - i // 2 for i, v in enumerate(widths) if v}
    gx = [r[1] for r in res]
    if nspec.is_partial:
        gx = gx[:1]
    for out, _, ospec, kinds in res:
        torch.testing.assert_close(out, ref.detach())
        if nspec.is_shard and nspec.dim in padded:
            assert ospec == st.ReplicaSpec()
        elif not nspec.is_partial or value == 0.0:
            assert ospec == nspec and kinds == []
    for gr in gx:
        torch.testing.assert_close(gr, full.grad)
