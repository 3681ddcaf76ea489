"""Conv nets' ops against serial torch over random layouts: F.conv1d/conv2d (rule in
ops/linear.py: a contraction over the input channels) and F.batch_norm (ops/norm.py: statistics
per channel, running statistics updated as serial's). Output, every gradient, running statistics;
float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, specs

TOL = dict(rtol=1e-9, atol=1e-10)


def _st(t, pg, spec):
    return st.ShardedTensor.from_global(t, pg, spec) if spec is not None else t


def _against_serial(func, pg, shapes, layouts, conf):
    """func (a convolution) on float64 inputs of `shapes` (x, weight, bias or None) laid out as
    `layouts` against serial, values and gradients -> (output spec, forward collectives)."""
    xs, ws, bs = shapes
    x, w = torch.randn(xs, dtype=torch.float64), torch.randn(ws, dtype=torch.float64)
    b = torch.randn(bs, dtype=torch.float64) if bs else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    args = [_st(t, pg, s) for t, s in zip(leaves, layouts)]
    with st.CommTrace() as trace:
        out = func(args[0], args[1], args[2] if b is not None else None, *conf)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = func(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None, *conf)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (out.full() * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(out.full(), ref.detach(), **TOL)
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad, r.grad, **TOL)
    forward = [e.kind for e in trace.events if e.phase == "forward" and e.op != "from_global"]
    return out.spec, forward


def _conv(rank, nd, shapes, conf, x_spec, w_spec, b_spec, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    return _against_serial((F.conv1d, F.conv2d)[nd - 1], pg, shapes, (x_spec, w_spec, b_spec),
                           conf)


@hs.composite
def _conv_case(draw, world):
    nd = draw(hs.integers(1, 2))
    groups = draw(hs.sampled_from([1, 1, 2]))
    cin, cout = groups * draw(hs.integers(1, 3)), groups * draw(hs.integers(1, 3))
    k, stride, pad, dil = (draw(hs.integers(1, 3)), draw(hs.integers(1, 2)),
                           draw(hs.integers(0, 1)), draw(hs.integers(1, 2)))
    side = draw(hs.integers(dil * (k - 1) + 1, 6))
    batch = draw(hs.sampled_from([(), (1,), (2,), (3,)]))
    xs = batch + (cin,) + (side,) * nd
    ws = (cout, cin // groups) + (k,) * nd
    bs = (cout,) if draw(hs.booleans()) else None
    pick = lambda shape: draw(hs.one_of(hs.none(), specs(shape, world)))
    return nd, (xs, ws, bs), (stride, pad, dil, groups), pick(xs), pick(ws), bs and pick(bs)


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_conv_matches_serial(world, data):
    nd, shapes, conf, x_spec, w_spec, b_spec = data.draw(_conv_case(world))
    if all(s is None for s in (x_spec, w_spec, b_spec)):
        x_spec = st.ReplicaSpec()
    run(world, _conv, nd, shapes, conf, x_spec, w_spec, b_spec, data.draw(hs.integers(0, 2**16)))


@pytest.mark.parametrize("world", [2, 4])
def test_conv_column_then_row_parallel_is_megatron(world):
    """Weight sharded on its out channels with a replicated input: output channel-sharded, no
    forward communication; then sharded on its in channels: a pending sum, no communication."""
    col = run(world, _conv, 2, ((2, 3, 6, 6), (8, 3, 3, 3), (8,)), (1, 1, 1, 1),
              st.ReplicaSpec(), st.ShardSpec(0, world), st.ShardSpec(0, world), 0)[0]
    row = run(world, _conv, 2, ((2, 8, 6, 6), (5, 8, 3, 3), None), (2, 0, 1, 1),
              st.ShardSpec(1, world), st.ShardSpec(1, world), None, 1)[0]
    depthwise = run(world, _conv, 2, ((2, 8, 6, 6), (8, 1, 3, 3), (8,)), (1, 1, 1, 8),
                    st.ShardSpec(1, world), st.ShardSpec(0, world), st.ShardSpec(0, world), 2)[0]
    assert col == (st.ShardSpec(1, world), []), col
    assert row == (st.PartialSpec(), []), row
    assert depthwise == (st.ShardSpec(1, world), []), depthwise


def _bn(rank, shape, x_spec, stats, affine, training, seed):
    """F.batch_norm with the input in `x_spec`, running statistics `stats` (None, "plain" or
    "sharded" like the channels) and weight/bias `affine` (None, "plain", "replica",
    "sharded"), vs serial: output, gradients, running statistics afterwards."""
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    ref_args = [t.detach().clone() for t in (x, rm, rv, w, b)]
    ref_args[0].requires_grad_()
    if affine:
        w.requires_grad_(), b.requires_grad_()
        ref_args[3].requires_grad_(), ref_args[4].requires_grad_()
    tx = st.ShardedTensor.from_global(x, pg, x_spec)
    channels = st.ShardSpec(0, pg.tp_world_size())
    lay = {"plain": lambda t: t, "replica": lambda t: _st(t, pg, st.ReplicaSpec()),
           "sharded": lambda t: _st(t, pg, channels)}
    trm, trv = (None, None) if stats is None else (lay[stats](rm), lay[stats](rv))
    tw, tb = (None, None) if affine is None else (lay[affine](w), lay[affine](b))
    try:
        out = F.batch_norm(tx, trm, trv, tw, tb, training, 0.3, 1e-5)
    except st.UnsupportedOpError as e:
        unchanged = stats is None or torch.equal(_full(trm), ref_args[1])
        return "refused", str(e), unchanged
    ref = F.batch_norm(ref_args[0], None if stats is None else ref_args[1],
                       None if stats is None else ref_args[2],
                       ref_args[3] if affine else None, ref_args[4] if affine else None,
                       training, 0.3, 1e-5)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (out.full() * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(out.full(), ref.detach(), **TOL)
    torch.testing.assert_close(x.grad, ref_args[0].grad, **TOL)
    if affine:
        torch.testing.assert_close(w.grad, ref_args[3].grad, **TOL)
        torch.testing.assert_close(b.grad, ref_args[4].grad, **TOL)
    if stats is not None:
        torch.testing.assert_close(_full(trm), ref_args[1], **TOL)
        torch.testing.assert_close(_full(trv), ref_args[2], **TOL)
    return "ran", out.spec, None


def _full(t):
    return t.full() if isinstance(t, st.ShardedTensor) else t


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_batch_norm_matches_serial(world, data):
    shape = data.draw(hs.lists(hs.integers(1, 5), min_size=2, max_size=4).map(tuple))
    stats = data.draw(hs.sampled_from([None, "plain", "sharded"]))
    training = data.draw(hs.booleans()) or stats is None   # (torch refuses eval without them)
    if training and shape[0] * torch.Size(shape[2:]).numel() < 2:
        shape = (2,) + shape[1:]                       # torch needs 2 values per channel
    x_spec = data.draw(specs(shape, world))
    affine = data.draw(hs.sampled_from([None, "plain", "replica", "sharded"]))
    r = run(world, _bn, shape, x_spec, stats, affine, training,
            data.draw(hs.integers(0, 2**16)))[0]
    d = x_spec.dim % len(shape) if x_spec.is_shard else None
    assert r[0] == "ran", r        # training over an input sharded off the channels: synced
    if world > 1:
        laid = st.ShardSpec(d, x_spec.degree, x_spec.stride) if x_spec.is_shard else None
        assert r[1] == (laid or st.ReplicaSpec()), r


def test_batch_norm_channel_sharded_keeps_plain_running_stats_whole():
    """An nn.BatchNorm2d after a column-parallel conv, two training-mode forwards: its plain buffers
    equal serial's on every rank, one all-gather (of 2 x channels) per training forward."""
    events = run(2, _bn_module, 2)
    assert events[0] == events[1] == [("forward", "all_gather", 2 * 6 * 8)], events


def _bn_module(rank, world):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    serial = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, dtype=torch.float64),
                                 torch.nn.BatchNorm2d(6, dtype=torch.float64))
    model = st.parallelize(copy.deepcopy(serial), pg, plan={"0.*": "row", "1.*": "row"})
    for step in range(2):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        with st.CommTrace() as trace:
            out = model(x)
        torch.testing.assert_close(out.full(), serial(x).detach(), **TOL)
        for name, b in model[1].named_buffers():
            assert type(b) is torch.Tensor, name       # whole, plain, equal to serial's
            torch.testing.assert_close(b, getattr(serial[1], name), **TOL)
    return [(e.phase, e.kind, e.nbytes) for e in trace.events]
