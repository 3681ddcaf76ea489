"""Gradients handed to and from autograd on ShardedTensors of every layout (ops/meta.py):
`out.backward(gradient)`, `autograd.grad(..., grad_outputs)` and `register_hook` vs serial. A
partial value's gradient is the replicated gradient of the sum, on every rank: a ShardedTensor
gradient given for a partial output was laid out as a partial value (rank 0 held it, the others
zeros), and a hook on a partial value saw its gradient as a partial value (read: d times it)."""
import pytest
import torch
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs


def _full(x):
    return x.full() if isinstance(x, st.ShardedTensor) else x


def _value(x, spec, pg=None):
    """tanh(x) * 1.5 laid out by `spec` (a partial one from a linear op: still partial)."""
    if pg is None:
        return torch.tanh(x) * 1.5
    return torch.tanh(st.ShardedTensor.from_global(x, pg, st.ReplicaSpec())).redistribute(spec) * 1.5


def _case(how, shape, spec, gspec, seed, pg=None):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(shape, dtype=torch.float64)
    if how == "plain_out":   # a plain output, a ShardedTensor input and gradient
        xs = x if pg is None else st.ShardedTensor.from_global(x, pg, spec)
        out = torch.tanh(_full(xs)) * 1.5
        g = gout if pg is None or gspec is None else st.ShardedTensor.from_global(gout, pg, gspec)
        (gx,) = torch.autograd.grad(out, xs, g)
        return _full(gx), []
    out = _value(x, spec, pg)
    if pg is not None:
        assert out.spec == spec or (spec.is_shard and out.spec.is_shard), (out.spec, spec)
    g = gout if pg is None or gspec is None else st.ShardedTensor.from_global(gout, pg, gspec)
    seen = []
    if how == "backward":
        out.backward(g)
    elif how == "grad":
        (gx,) = torch.autograd.grad(out, x, g)
        x.grad = gx
    else:   # a hook that reads and doubles the gradient
        out.register_hook(lambda t: seen.append(_full(t).detach().clone()) or t * 2)
        out.backward(g)
    return x.grad, seen


def _case_rank(rank, how, shape, spec, gspec, seed):
    return _case(how, shape, spec, gspec, seed, st.ProcessGroup())


@pytest.mark.parametrize("how", ["backward", "grad", "hook", "plain_out"])
@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_gradients_given_and_seen_in_every_layout(world, how, data):
    shape = data.draw(shapes(max_dims=3, max_side=7))
    spec = data.draw(specs(shape, world))
    gspec = data.draw(hs.one_of(hs.none(), specs(shape, world)))   # None: a plain tensor
    seed = data.draw(hs.integers(0, 2 ** 16))
    ref, ref_seen = _case(how, shape, spec, gspec, seed)
    for gx, seen in run(world, _case_rank, how, shape, spec, gspec, seed):
        torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-12)
        assert len(seen) == len(ref_seen)
        for a, b in zip(seen, ref_seen):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
