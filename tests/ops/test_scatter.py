"""Writing at a replicated index (ops/scatter.py): scatter_/scatter_add_/index_add_/index_fill_
(in place and not) along the sharded dim or another one, and F.pad, against serial torch:
values, the gradients of the destination and the source, and no communication except where a
partial destination is reduced or a padded sharded dim is gathered."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as hs

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


# --- sources in any layout (found by the OpInfo sweep, tests/ops/opinfo_sweep.py) -------------

SRC_OPS = ["index_add_", "index_add", "scatter_add_", "scatter_ src", "index_fill_ tensor"]


def _src_inputs(name, shape, dim, m, seed):
    full, perm, index, src, w = _inputs(shape, dim, m, seed)
    if name == "index_fill_ tensor":   # a 0-d tensor value
        src = torch.tensor(-1.25, dtype=torch.float64)
    return full, perm, index, src, w


def _apply_src(name, x, dim, perm, index, src):
    if name == "index_fill_ tensor":
        return x.index_fill_(dim, index, src)
    return _apply(name, x, dim, perm, index, src)


def _src_cases(rank, cases):
    pg = st.ProcessGroup()
    out = []
    for name, shape, spec, sspec, dim, m, seed in cases:
        full, perm, index, src, w = _src_inputs(name, shape, dim, m, seed)
        full.requires_grad_()
        src.requires_grad_()
        x = make(full, spec, pg, rank, seed) * 1.0
        s = make(src, sspec, pg, rank, seed + 1) if src.dim() else src
        y = _apply_src(name, x, dim, perm, index, s)
        got = (y.full() if isinstance(y, st.ShardedTensor) else y)
        (got * w).sum().backward()
        out.append((got.detach(), full.grad, src.grad))
    return out


@pytest.mark.parametrize("world", (2, 4))
@settings(max_examples=8)
@given(data=hs.data())
def test_index_writes_take_sources_in_any_layout(world, data):
    """The source / value of index_add_, scatter_add_, scatter_ and index_fill_ (a 0-d tensor)
    in any layout, sharded along the written dim included, with the destination in any layout:
    serial's values and gradients (a source sharded along the written dim met the destination's
    shard: 'index_add_(): Number of indices (5) should be equal to source.size(dim): (3)'; a
    0-d value along another dim than the sharded one: IndexError)."""
    cases = []
    for _ in range(6):
        shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=6))
        dim = data.draw(hs.integers(0, len(shape) - 1))
        m = data.draw(hs.integers(1, shape[dim]))
        name = data.draw(hs.sampled_from(SRC_OPS))
        sshape = list(shape)
        sshape[dim] = m
        cases.append((name, shape, data.draw(specs(shape, world)),
                      data.draw(specs(tuple(sshape), world)), dim, m,
                      data.draw(hs.integers(0, 2 ** 16))))
    res = run(world, _src_cases, cases)
    for k, (name, shape, spec, sspec, dim, m, seed) in enumerate(cases):
        full, perm, index, src, w = _src_inputs(name, shape, dim, m, seed)
        full.requires_grad_()
        src.requires_grad_()
        ref = _apply_src(name, full * 1.0, dim, perm, index, src)
        (ref * w).sum().backward()
        what = f"{name} {shape} dim {dim}, {spec} / source {sspec}"
        gx = [r[k][1] for r in res][:1 if spec.is_partial else world]
        gs = [r[k][2] for r in res][:1 if sspec.is_partial and src.dim() else world]
        for r in res:
            torch.testing.assert_close(r[k][0], ref.detach(), msg=what)
        for g in gx:
            torch.testing.assert_close(g, full.grad, msg=what)
        for g in gs:
            torch.testing.assert_close(g, src.grad, msg=what)


def _pad_modes(rank, cases):
    pg = st.ProcessGroup()
    out = []
    for shape, spec, widths, mode, seed in cases:
        g = torch.Generator().manual_seed(seed)
        full = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
        y = F.pad(make(full, spec, pg, rank, seed), widths, mode=mode)
        got = y.full()
        (got * torch.randn(got.shape, dtype=torch.float64, generator=g)).sum().backward()
        out.append((got.detach(), full.grad))
    return out


@pytest.mark.parametrize("world", (2, 4))
@settings(max_examples=6)
@given(data=hs.data())
def test_pad_modes_with_ranks_holding_nothing(world, data):
    """F.pad reflect / replicate / circular with the input sharded on an unpadded dim whose size
    is below the degree (ranks holding none of it): serial's values and gradients (those ranks
    raised 'Expected 2D or 3D ... tensor with ... non-zero dimensions' alone, and the others
    waited in their next collective: a hang)."""
    cases = []
    for _ in range(6):
        k = data.draw(hs.integers(1, 2))   # padded dims (the last k)
        lead = data.draw(hs.integers(1, 2))
        shape = tuple(data.draw(hs.integers(1, world)) for _ in range(lead)) + \
            tuple(data.draw(hs.integers(2, 5)) for _ in range(k))
        mode = data.draw(hs.sampled_from(["reflect", "replicate", "circular"]))
        widths = tuple(data.draw(hs.integers(0, shape[len(shape) - 1 - i // 2] - 1))
                       for i in range(2 * k))
        spec = data.draw(hs.sampled_from(
            [st.ShardSpec(d, world) for d in range(lead)] + [st.PartialSpec()]))
        cases.append((shape, spec, widths, mode, data.draw(hs.integers(0, 2 ** 16))))
    res = run(world, _pad_modes, cases)
    for k, (shape, spec, widths, mode, seed) in enumerate(cases):
        g = torch.Generator().manual_seed(seed)
        full = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
        ref = F.pad(full, widths, mode=mode)
        (ref * torch.randn(ref.shape, dtype=torch.float64, generator=g)).sum().backward()
        what = f"{shape} {spec} {widths} {mode}"
        for r in res:
            torch.testing.assert_close(r[k][0], ref.detach(), msg=what)
        for r in res[:1 if spec.is_partial else world]:
            torch.testing.assert_close(r[k][1], full.grad, msg=what)
