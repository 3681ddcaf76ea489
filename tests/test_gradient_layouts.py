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


def _set_grad_of_partial_leaf(rank, gspec_name, seed):
    """A partial leaf's .grad set from its own (replicated) .grad rescaled, or from a gradient
    of another layout: read back as serial's on every rank."""
    pg = st.ProcessGroup() if rank is not None else None
    torch.manual_seed(seed)
    full = torch.randn(5, 3, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    newg = torch.randn(5, 3, dtype=torch.float64)
    x = (full.clone() if pg is None else
         st.ShardedTensor.from_global(full.clone(), pg, st.PartialSpec())).requires_grad_()
    (x @ w).tanh().sum().backward()
    if gspec_name == "own":
        x.grad = x.grad * 0.5
    elif pg is None:
        x.grad = newg
    else:
        gspec = {"replica": st.ReplicaSpec(), "shard0": st.ShardSpec(0, pg.tp_world_size()),
                 "partial": st.PartialSpec()}[gspec_name]
        x.grad = st.ShardedTensor.from_global(newg, pg, gspec)
    return _full(x.grad)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("gspec", ["own", "replica", "shard0", "partial"])
def test_setting_the_grad_of_a_partial_leaf_matches_serial(world, gspec):
    """.grad of a partial value is presented replicated (the gradient of the sum), but the
    setter laid a replicated gradient out as a partial value: rank 0 kept it, the others zeros,
    so `x.grad = x.grad * 0.5` read back as zeros on ranks 1.. (off by 100% there)."""
    ref = _set_grad_of_partial_leaf(None, gspec, 3)
    for g in run(world, _set_grad_of_partial_leaf, gspec, 3):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
