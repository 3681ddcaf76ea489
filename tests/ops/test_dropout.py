"""Dropout (ops/dropout.py): replicated regions draw the same mask on every rank from the default
generator; sharded regions draw independent per-rank streams without touching it; the "serial"
mode reproduces the serial model's masks exactly. Forward and gradients against serial."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs
from torch import nn

import shardtensor as st
from shardtensor.ops import dropout as dropout_mod
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs

F64 = torch.float64


def _serial_mode(rank, shape, spec, p, inplace, seed):
    pg = st.ProcessGroup()
    st.config.dropout = "serial"
    try:
        torch.manual_seed(seed)
        full = torch.randn(shape, dtype=F64, requires_grad=True)
        x = st.ShardedTensor.from_global(full, pg, spec)
        torch.manual_seed(seed + 1)
        with st.CommTrace() as trace:
            y = F.dropout(x.clone() if inplace else x, p, True, inplace)
        after = torch.rand(()).item()
        out = y.full()
        w = torch.randn(shape, dtype=F64)
        (out * w).sum().backward()
        return out.detach(), full.grad, y.spec, [e.kind for e in trace.events], after
    finally:
        st.config.dropout = "independent"


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_serial_mode_equals_serial_dropout(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=8))
    spec = data.draw(specs(shape, world))
    p = data.draw(hs.sampled_from([0.1, 0.5, 0.9, 1.0]))
    inplace = data.draw(hs.booleans())
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _serial_mode, shape, spec, p, inplace, seed)
    torch.manual_seed(seed)
    full = torch.randn(shape, dtype=F64, requires_grad=True)
    torch.manual_seed(seed + 1)
    ref = F.dropout(full.clone() if inplace else full, p, True, inplace)
    after = torch.rand(()).item()
    w = torch.randn(shape, dtype=F64)
    (ref * w).sum().backward()
    nspec = spec.normalize(shape)
    for out, grad, ospec, kinds, nxt in res:
        assert torch.equal(out, ref.detach())                  # bitwise the serial masks
        torch.testing.assert_close(grad, full.grad, rtol=0, atol=0)
        assert ospec == (st.ReplicaSpec() if nspec.is_partial else nspec)
        assert kinds == (["all_reduce"] if nspec.is_partial and world > 1 else [])
        assert nxt == after                                    # the default stream as serial


def _independent(rank, shape, spec, p, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    full = torch.randn(shape, dtype=F64).abs() + 1.0          # no zeros: the mask is visible
    full.requires_grad_()
    x = st.ShardedTensor.from_global(full, pg, spec)
    dropout_mod.manual_seed(seed + 1)
    y = nn.Dropout(p)(x)
    after = torch.rand(()).item()                              # the default generator's state
    local = y.to_local().detach()
    out = y.full()
    (out * 3).sum().backward()
    dropout_mod.manual_seed(seed + 1)                          # re-seeding repeats the masks
    again = nn.Dropout(p)(x).to_local().detach()
    return local, out.detach(), full.detach(), full.grad, after, torch.equal(local, again)


@pytest.mark.parametrize("world", (2, 4))
def test_independent_mode_streams(world):
    p, seed = 0.5, 3
    # sharded: per-rank masks, independent across ranks, the default generator untouched
    shard = run(world, _independent, (4 * world, 16), st.ShardSpec(0, world), p, seed)
    torch.manual_seed(seed + 1)
    untouched = torch.rand(()).item()
    masks = []
    for local, out, full, grad, after, repeat in shard:
        assert after == untouched and repeat
        kept = out != 0
        assert torch.equal(out[kept], (full / (1 - p))[kept])
        torch.testing.assert_close(grad, kept.to(F64) * 3 / (1 - p))
        assert 0.2 < kept.double().mean().item() < 0.8
        masks.append(local != 0)
    assert not any(torch.equal(masks[0], m) for m in masks[1:])      # ranks draw differently
    assert all(torch.equal(shard[0][1], r[1]) for r in shard)        # one global value
    # replicated: the same mask on every rank, equal to serial dropout for the same seed
    rep = run(world, _independent, (6, 16), st.ReplicaSpec(), p, seed)
    torch.manual_seed(seed)
    full = torch.randn(6, 16, dtype=F64).abs() + 1.0
    torch.manual_seed(seed + 1)
    ref = F.dropout(full, p)
    after = torch.rand(()).item()
    for local, out, _, _, nxt, repeat in rep:
        assert torch.equal(local, ref) and torch.equal(out, ref) and nxt == after and repeat


def _identity_and_partial(rank):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    full = torch.randn(4, 6)
    x = st.ShardedTensor.from_global(full, pg, st.ShardSpec(1, pg.tp_world_size()))
    out = {"eval": F.dropout(x, 0.5, training=False) is x, "p0": F.dropout(x, 0.0) is x,
           "module eval": nn.Dropout(0.3).eval()(x) is x,
           "torch.dropout eval": torch.dropout(x, 0.5, False) is x}
    y = x.clone()
    r = F.dropout(y, 0.5, inplace=True)
    out["inplace returns x"] = r is y and y.spec == x.spec
    out["inplace changed"] = not torch.equal(y.full(), full)
    z = x.clone()
    torch.dropout_(z, 0.5, True)
    out["torch.dropout_"] = not torch.equal(z.full(), full)
    try:
        F.dropout(x, 1.5)
    except ValueError as e:
        out["bad p"] = "between 0 and 1" in str(e)
    P = st.ShardedTensor.from_local(full / pg.tp_world_size(), pg, st.PartialSpec(),
                                    shape=full.shape)
    torch.manual_seed(5)
    with st.CommTrace() as trace:
        q = F.dropout(P, 0.5)
    torch.manual_seed(5)
    ref = F.dropout(full, 0.5)
    out["partial"] = (q.spec == st.ReplicaSpec() and torch.allclose(q.full(), ref)
                      and len(trace.events) == (pg.tp_world_size() > 1))
    return out


def test_identity_inplace_and_partial():
    for out in run(2, _identity_and_partial):
        assert all(out.values()), {k: v for k, v in out.items() if not v}


def _checkpointed(rank, use_ctx):
    from torch.utils.checkpoint import checkpoint
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    full = torch.randn(4, 8, dtype=F64, requires_grad=True)
    x = st.ShardedTensor.from_global(full, pg, st.ShardSpec(1, pg.tp_world_size()))
    fn = lambda t: F.dropout(F.dropout(t * 2, 0.5), 0.5).exp()
    dropout_mod.manual_seed(1)
    ref = fn(x).full()
    ref.sum().backward()
    g_ref, full.grad = full.grad.clone(), None
    dropout_mod.manual_seed(1)
    kw = {"context_fn": dropout_mod.checkpoint_context} if use_ctx else {}
    out = checkpoint(fn, x, use_reentrant=False, **kw).full()
    out.sum().backward()
    return torch.equal(out, ref), torch.equal(full.grad, g_ref)


def test_activation_checkpointing_recomputes_the_same_masks():
    for same_out, same_grad in run(2, _checkpointed, True):
        assert same_out and same_grad
    # without the context the recomputation draws new masks: the gradient is wrong
    assert not any(same_grad for _, same_grad in run(2, _checkpointed, False))


def _sdpa_serial_warns(rank):
    import warnings
    pg = st.ProcessGroup()
    q = st.ShardedTensor.from_global(torch.randn(2, 4, 5, 8), pg, st.ShardSpec(1, 2))
    st.config.dropout = "serial"
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    finally:
        st.config.dropout = "independent"
    return [str(m.message) for m in w if "fused kernel" in str(m.message)]


def test_sdpa_dropout_under_serial_mode_warns_once():
    """sdpa draws its masks inside the kernel: 'serial' cannot be honoured there, and says so."""
    for msgs in run(2, _sdpa_serial_warns):
        assert len(msgs) == 1 and "attn_implementation='eager'" in msgs[0]
