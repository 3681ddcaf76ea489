"""Transposed convolutions (F.conv_transpose1d/2d/3d; rule in ops/linear.py: the convolution's
contraction over the input channels with the weight (in, out / groups, *kernel)) against serial
torch over random layouts, shapes, channel counts (dividing the degree or not), stride, padding,
output_padding, dilation and groups: output and every gradient, float64."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, specs
from test_conv import _against_serial

FUNCS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _one(pg, nd, shapes, conf, layouts, seed):
    """One case: (output spec, forward collectives) after checking values and gradients."""
    torch.manual_seed(seed)
    return _against_serial(FUNCS[nd - 1], pg, shapes, layouts, conf)


def _cases(rank, cases):
    pg = st.ProcessGroup()
    return [_one(pg, *case) for case in cases]


@hs.composite
def _case(draw, world):
    nd = draw(hs.sampled_from([1, 1, 2, 2, 3]))
    groups = draw(hs.sampled_from([1, 1, 2]))
    cin, cout = groups * draw(hs.integers(1, 3)), groups * draw(hs.integers(1, 3))
    k, stride, pad, dil = (draw(hs.integers(1, 3)), draw(hs.integers(1, 2)),
                           draw(hs.integers(0, 1)), draw(hs.integers(1, 2)))
    opad = draw(hs.integers(0, max(stride, dil) - 1))   # torch: below stride or dilation
    side = draw(hs.integers(1, 4 if nd < 3 else 2))
    if (side - 1) * stride - 2 * pad + dil * (k - 1) + opad + 1 < 1:
        pad = 0                                        # (an empty output: torch refuses)
    batch = draw(hs.sampled_from([(), (1,), (2,), (3,)]))
    xs = batch + (cin,) + (side,) * nd
    ws = (cin, cout // groups) + (k,) * nd
    bs = (cout,) if draw(hs.booleans()) else None
    layouts = [draw(hs.one_of(hs.none(), specs(s, world))) for s in (xs, ws, bs) if s]
    if all(s is None for s in layouts):
        layouts[0] = st.ReplicaSpec()
    return (nd, (xs, ws, bs), (stride, pad, opad, groups, dil), layouts,
            draw(hs.integers(0, 2**16)))


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_conv_transpose_matches_serial(world, data):
    run(world, _cases, [data.draw(_case(world)) for _ in range(2)])


@pytest.mark.parametrize("world", [2, 4])
def test_conv_transpose_column_and_row_parallel_are_megatron(world):
    """Weight sharded on dim 1 (out channels) with a replicated input: output channel-sharded,
    no forward communication; on dim 0 (in channels) with the input channel-sharded alike: a
    pending sum, none either (reduced once with a bias); grouped with whole groups per rank:
    local. Channel counts that do not divide the degree (5, 3) included."""
    r, s0, s1 = st.ReplicaSpec(), st.ShardSpec(0, world), st.ShardSpec(1, world)
    cases = [  # (nd, shapes, (stride, padding, output_padding, groups, dilation), layouts)
        (2, ((2, 3, 4, 4), (3, 8, 3, 3), (8,)), (2, 1, 1, 1, 1), [r, s1, s0]),
        (1, ((2, 3, 5), (3, 5, 3), None), (1, 0, 0, 1, 1), [r, s1]),
        (2, ((2, 8, 4, 4), (8, 5, 3, 3), None), (2, 0, 1, 1, 1), [s1, s0]),
        (1, ((3, 5, 6), (5, 3, 2), None), (1, 1, 0, 1, 2), [s1, s0]),
        (3, ((1, 8, 2, 2, 2), (8, 3, 2, 2, 2), (3,)), (1, 0, 0, 1, 1), [s1, s0, r]),
        (2, ((2, 8, 4, 4), (8, 1, 3, 3), (8,)), (2, 1, 0, 8, 1), [s1, s0, s0]),
    ]
    got = run(world, _cases, [c + (i,) for i, c in enumerate(cases)])[0]
    assert got == [(s1, []), (s1, []), (st.PartialSpec(), []), (st.PartialSpec(), []),
                   (r, ["all_reduce"]), (s1, [])], got


def _refused(rank):
    """Each bad call's message (None: it ran), with the input channel-sharded."""
    pg = st.ProcessGroup()
    x = st.ShardedTensor.from_global(torch.randn(2, 4, 5), pg, st.ShardSpec(1, 2))
    bad = [(torch.randn(3, 2, 3), None, {}),                   # weight for 3 input channels
           (torch.randn(4, 2, 3), torch.randn(3), {}),         # bias for 3 output channels
           (torch.randn(4, 2, 3), None, {"groups": 3}),        # 4 channels in 3 groups
           (torch.randn(4, 2, 3), None, {"output_padding": 1}),   # not below stride 1
           (torch.randn(5, 3, 3), None, {"conv": True})]       # F.conv1d: 3 input channels
    out = []
    for w, b, kw in bad:
        func = F.conv1d if kw.pop("conv", False) else F.conv_transpose1d
        try:
            func(x, w, b, **kw)
            out.append(None)
        except RuntimeError as e:
            out.append(str(e))
    return out


def test_bad_shapes_raise_before_any_rank_computes():
    """A weight, bias, groups or output_padding that does not fit the input raises torch's
    error naming the op on every rank (torch's meta functions do not check them: before, the
    shards met the mismatched weight and some ranks computed a wrong result)."""
    for msgs in run(2, _refused):
        assert all(m and m.startswith(("F.conv_transpose1d", "F.conv1d")) for m in msgs), msgs
