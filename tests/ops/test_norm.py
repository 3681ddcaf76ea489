"""Normalisation rules (ops/norm.py) and the RMS-norm pattern models write out, against serial
torch: output, input gradient and weight/bias gradients, over random layouts."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs


def _layout_param(p, how, x_spec, nd, k, pg):
    """The weight/bias as the test asks: plain, replicated, or sharded like the input."""
    if how == "plain" or p is None:
        return p
    if how == "replica" or not (x_spec.is_shard and x_spec.dim >= nd - k):
        return st.ShardedTensor.from_global(p, pg, st.ReplicaSpec())
    return st.ShardedTensor.from_global(
        p, pg, st.ShardSpec(x_spec.dim - (nd - k), x_spec.degree, x_spec.stride))


def _rms_pattern(h, weight, eps):
    """Llama's / T5's RMSNorm forward, written out."""
    dtype = h.dtype
    h = h.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def _norm(rank, shape, spec, k, kind, how, affine, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    dtype = torch.float32 if kind == "pattern" else torch.float64
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).requires_grad_()
    nshape = tuple(shape[len(shape) - k:])
    w = (torch.randn(nshape, dtype=dtype) if affine else None)
    b = (torch.randn(nshape, dtype=dtype) if affine and kind == "layer" else None)
    params = [p.requires_grad_() for p in (w, b) if p is not None]
    t = st.ShardedTensor.from_global(x, pg, spec)
    nspec = t.spec
    tw = _layout_param(w, how, nspec, len(shape), k, pg)
    tb = _layout_param(b, how, nspec, len(shape), k, pg)

    def apply(xx, ww, bb):
        if kind == "layer":
            return F.layer_norm(xx, nshape, ww, bb, 1e-5)
        if kind == "rms":
            return F.rms_norm(xx, nshape, ww, 1e-6)
        return _rms_pattern(xx, ww, 1e-6)

    with st.CommTrace() as trace:
        out = apply(t, tw, tb)
    fwd = [e.kind for e in trace.events if e.op not in ("from_global",)]
    ref_x = x.detach().clone().requires_grad_()
    ref_p = [p.detach().clone().requires_grad_() for p in params]
    ref = apply(ref_x, *(ref_p + [None] * (2 - len(ref_p))))
    g = torch.randn(ref.shape, dtype=dtype)
    (out.full() * g).sum().backward()
    (ref * g).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.full(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    for p, rp in zip(params, ref_p):
        torch.testing.assert_close(p.grad, rp.grad, **tol)
    return out.spec, fwd


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@given(data=hs.data())
def test_norms_match_serial(world, kind, data):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=7))
    spec = data.draw(specs(shape, world))
    k = data.draw(hs.integers(1, len(shape)))
    how = data.draw(hs.sampled_from(["plain", "replica", "sharded"]))
    affine = data.draw(hs.booleans())
    ospec, fwd = run(world, _norm, shape, spec, k, kind, how, affine,
                     data.draw(hs.integers(0, 2**16)))[0]
    n = spec.normalize(shape)
    assert ospec == (st.ReplicaSpec() if n.is_partial else n)
    if n.is_shard and n.dim < len(shape) - k:
        assert fwd == []                        # normalised dims whole on every rank: local
    if n.is_shard and n.dim >= len(shape) - k and world > 1:
        assert fwd == ["all_reduce"] * (2 if kind == "layer" else 1)


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_rms_norm_pattern_matches_serial(world, data):
    """`h.to(float32).pow(2).mean(-1, keepdim=True)`, `rsqrt`: elementwise rules + the mean rule."""
    shape = data.draw(shapes(min_dims=2, max_dims=3, min_side=1, max_side=7))
    spec = data.draw(specs(shape, world, partial=False))
    ospec, fwd = run(world, _norm, shape, spec, 1, "pattern", "sharded", True,
                     data.draw(hs.integers(0, 2**16)))[0]
    n = spec.normalize(shape)
    assert ospec == n
    if n.is_shard and n.dim == len(shape) - 1 and world > 1:
        assert fwd == ["all_reduce"]             # the mean over the hidden shards, once
    elif world > 1:
        assert fwd == []


def _low_precision_layer_norm(rank, world):
    """F.layer_norm of a bfloat16 / float16 input sharded on the normalised dim (statistics
    summed over the ranks), float32 or same-dtype weight and bias: serial's dtype and values."""
    pg = st.ProcessGroup()
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        for wdtype in (torch.float32, dtype):
            g = torch.Generator().manual_seed(4)
            x = (torch.randn(3, 5, 12, generator=g) * 2 + 1).to(dtype)
            w, b = (torch.randn(12, generator=g).to(wdtype) for _ in range(2))
            for spec in (st.ShardSpec(2, world), st.ShardSpec(2, world, 3)):
                ref = F.layer_norm(x, (12,), w, b)
                got = F.layer_norm(st.ShardedTensor.from_global(x, pg, spec), (12,), w, b)
                torch.testing.assert_close(got.full(), ref)   # dtype included
                out.append((str(dtype), str(wdtype), repr(spec)))
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_layer_norm_over_sharded_dims_keeps_low_precision_dtypes(world):
    # the normalised input was cast back to bfloat16 before float32 weight and bias: a float32
    # output (serial: bfloat16), rounded three times with same-dtype weights
    assert len(run(world, _low_precision_layer_norm, world)[0]) == 8


def _low_precision_rms_norm(rank, world):
    """F.rms_norm of a bfloat16 / float16 input sharded on the normalised dim, with a weight of
    float32, the input's dtype, a sharded weight, or none: serial's dtype and values (torch 2.4
    promotes to float32 with a float32 weight, later kernels keep the input's dtype)."""
    pg = st.ProcessGroup()
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        for wdtype in (torch.float32, dtype, None):
            g = torch.Generator().manual_seed(5)
            x = (torch.randn(3, 5, 12, generator=g) * 2 + 1).to(dtype)
            w = None if wdtype is None else torch.randn(12, generator=g).to(wdtype)
            for spec in (st.ShardSpec(2, world), st.ShardSpec(2, world, 3)):
                ref = F.rms_norm(x, (12,), w, 1e-6)
                sw = w if w is None else st.ShardedTensor.from_global(w, pg, st.ShardSpec(0, world, spec.stride))
                for weight in ((w,) if w is None else (w, sw)):
                    got = F.rms_norm(st.ShardedTensor.from_global(x, pg, spec), (12,), weight, 1e-6)
                    torch.testing.assert_close(got.full(), ref)   # dtype included
                    out.append((str(dtype), str(wdtype), repr(spec)))
    return out


@pytest.mark.skipif(not hasattr(F, "rms_norm"), reason="F.rms_norm is new in torch 2.4")
@pytest.mark.parametrize("world", WORLDS)
def test_rms_norm_over_sharded_dims_keeps_serials_dtype(world):
    # the normalised input was cast back to bfloat16, then multiplied by the float32 weight: a
    # float32 output where torch 2.13's serial rms_norm returns bfloat16
    assert len(run(world, _low_precision_rms_norm, world)[0]) == 20


def _rms_norm_default_eps(rank, world):
    """F.rms_norm without eps over a sharded normalised dim, inputs small enough for eps to
    matter (mean square 1e-4 .. 1e-8) and of unit size: (dtype, scale, stride) where the value or
    dtype differs from serial's."""
    pg = st.ProcessGroup()
    bad = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for scale in (1e-2, 1e-4, 1.0):
            g = torch.Generator().manual_seed(7)
            x = (torch.randn(4, 8, generator=g, dtype=torch.float64) * scale).to(dtype)
            ref = F.rms_norm(x, (8,))
            for stride in (1, 2):
                got = F.rms_norm(st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, world, stride)),
                                 (8,)).full()
                if got.dtype != ref.dtype or not torch.allclose(got, ref, rtol=1e-5, atol=0):
                    bad.append((str(dtype), scale, stride))
    return bad


@pytest.mark.skipif(not hasattr(F, "rms_norm"), reason="F.rms_norm is new in torch 2.4")
@pytest.mark.parametrize("world", WORLDS)
def test_rms_norm_default_eps_is_serials(world):
    # eps=None took the input dtype's epsilon (bfloat16: 0.0078): torch >= 2.5 adds float32's
    # for a bfloat16/float16 input, so rms_norm of a (2, 4) bfloat16 tensor of 0.01 sharded on
    # dim 1 gave 0.112 where serial gives 1.0 (torch 2.4 takes the input dtype's: kept there)
    for rank, bad in enumerate(run(world, _rms_norm_default_eps, world)):
        assert not bad, (rank, bad)
