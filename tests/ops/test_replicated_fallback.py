"""Ops with no rule whose ShardedTensor inputs are all replicated run on the local tensors
(every rank computes the serial result; no communication) instead of raising: e.g. generate's
`no_repeat_ngram_size` (Tensor.unfold on replicated input ids). Sharded or partial inputs, and
random ops, still get the clear UnsupportedOpError."""
import pytest
import torch
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS

T = torch.Tensor

# (name, fn(x) with x of shape (4, 6), differentiable, in place)
OPS = [
    ("unfold", lambda x: x.unfold(1, 2, 1), True, False),
    ("diag_embed", torch.diag_embed, True, False),
    ("cummax values", lambda x: torch.cummax(x, 1).values, True, False),
    ("cummax indices", lambda x: torch.cummax(x, 1).indices, False, False),
    ("logcumsumexp", lambda x: torch.logcumsumexp(x, 0), True, False),
    ("kron", lambda x: torch.kron(x, torch.ones(2, 1)), True, False),
    ("fliplr", torch.fliplr, True, False),
    ("rot90", torch.rot90, True, False),
    ("diff", lambda x: torch.diff(x, dim=1), True, False),
    ("trace", torch.trace, True, False),
    ("take", lambda x: torch.take(x, torch.tensor([0, 5, 23])), True, False),
    ("bucketize", lambda x: torch.bucketize(x, torch.tensor([-1.0, 0.0, 1.0])), False, False),
    ("searchsorted", lambda x: torch.searchsorted(torch.sort(x, 1).values, x), False, False),
    ("index_add_", lambda x: x.clone().index_add_(1, torch.tensor([0, 2, 2]), torch.ones(4, 3, dtype=x.dtype)),
     True, True),
    ("scatter_", lambda x: x.clone().scatter_(1, torch.tensor([[1], [0], [5], [2]]), -1.0),
     True, True),
    ("index_fill_", lambda x: x.clone().index_fill_(0, torch.tensor([1, 3]), 0.5), True, True),
]


def _one(rank, idx, seed):
    pg = st.ProcessGroup()
    _, fn, diff, inplace = OPS[idx]
    torch.manual_seed(seed)
    full = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    x = st.ShardedTensor.from_global(full, pg, st.ReplicaSpec())
    with st.CommTrace() as trace:
        y = fn(x)
    spec = y.spec if isinstance(y, st.ShardedTensor) else None
    out = y.full() if isinstance(y, st.ShardedTensor) else y
    if diff:
        out.double().pow(2).sum().backward()
    return out.detach(), full.grad, spec, [e.kind for e in trace.events]


@pytest.mark.parametrize("world", WORLDS)
@given(idx=hs.integers(0, len(OPS) - 1), seed=hs.integers(0, 2 ** 16))
def test_replicated_inputs_run_locally(world, idx, seed):
    name, fn, diff, _ = OPS[idx]
    torch.manual_seed(seed)
    full = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ref = fn(full)
    if diff:
        ref.double().pow(2).sum().backward()
    for out, grad, spec, kinds in run(world, _one, idx, seed):
        assert spec == st.ReplicaSpec(), name
        assert kinds == [], name
        torch.testing.assert_close(out, ref.detach(), msg=name)
        if diff:
            torch.testing.assert_close(grad, full.grad, msg=name)


def _inplace_and_refusals(rank):
    pg = st.ProcessGroup()
    d = pg.tp_world_size()
    x = st.ShardedTensor.from_global(torch.zeros(4, 6), pg, st.ReplicaSpec())
    same = x.index_fill_(1, torch.tensor([2]), 1.0) is x
    out = {"same object": same, "value": x.full().sum().item()}
    sharded = st.ShardedTensor.from_global(torch.zeros(4, 6), pg, st.ShardSpec(0, d))
    partial = st.ShardedTensor.from_local(torch.zeros(4, 6), pg, st.PartialSpec(),
                                          shape=(4, 6))
    for key, fn in [("sharded", lambda: torch.diag_embed(sharded)),
                    ("partial", lambda: torch.diag_embed(partial)),
                    ("random", lambda: torch.poisson(x.abs() + 1))]:
        try:
            torch.manual_seed(0)
            got = fn().full()
            torch.manual_seed(0)   # the same call on the plain value
            want = {"sharded": lambda: torch.diag_embed(torch.zeros(4, 6)),
                    "partial": lambda: torch.diag_embed(torch.zeros(4, 6)),
                    "random": lambda: torch.poisson(x.full().abs() + 1)}[key]()
            out[key] = torch.equal(got, want)
        except st.UnsupportedOpError as e:
            out[key] = str(e)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_inplace_keeps_object_and_others_refuse(world):
    for out in run(world, _inplace_and_refusals):
        assert out["same object"] and out["value"] == 4.0
        if world == 1:   # a layout of degree 1 is the whole tensor: serial's op and values
            assert out["sharded"] is True and out["partial"] is True and out["random"] is True
            continue
        assert "diag_embed" in out["sharded"] and "ShardSpec" in out["sharded"]
        assert "diag_embed" in out["partial"] and "PartialSpec" in out["partial"]
        assert "poisson" in out["random"]   # each rank would draw other numbers


def _reshaped_in_place(rank):
    pg = st.ProcessGroup()
    x = torch.arange(24.0).reshape(4, 6)
    out = {}
    for name, fn in [("unsqueeze_", lambda t: t.unsqueeze_(1)),
                     ("squeeze_", lambda t: t.unsqueeze(0).squeeze_(0).unsqueeze_(0).squeeze_()),
                     ("resize_", lambda t: t.resize_(3, 8))]:
        t = st.ShardedTensor.from_global(x.clone(), pg, st.ReplicaSpec())
        got = fn(t)
        want = fn(x.clone())
        out[name] = (tuple(got.shape), got.dim(), tuple(got.full().shape),
                     torch.equal(got.full(), want), tuple(want.shape))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_in_place_shape_changes_reach_the_wrapper(world):
    # an in-place op with no rule that changes a replicated tensor's shape (unsqueeze_, resize_)
    # ran on the shard only: the wrapper kept presenting the old shape over the new shard
    for out in run(world, _reshaped_in_place):
        for name, (shape, nd, full_shape, same, want) in out.items():
            assert shape == full_shape == want and nd == len(want) and same, name
