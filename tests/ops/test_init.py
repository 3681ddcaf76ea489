"""In-place random fills and torch.nn.init on ShardedTensors (ops/elementwise.py
`random_fill_`): with the same seed, every layout ends up holding exactly the serial values,
and every rank's default generator stays in step with serial's."""
import pytest
import torch
from hypothesis import given, strategies as hs
from torch import nn

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, specs

INITS = {
    "normal_": lambda t: t.normal_(0.5, 2.0),
    "uniform_": lambda t: t.uniform_(-0.1, 0.3),
    "bernoulli_": lambda t: t.bernoulli_(0.3),
    "exponential_": lambda t: t.exponential_(1.5),
    "log_normal_": lambda t: t.log_normal_(0.0, 0.5),
    "cauchy_": lambda t: t.cauchy_(),
    "random_": lambda t: t.random_(0, 7),
    "nn.init.normal_": lambda t: nn.init.normal_(t, std=0.02),
    "nn.init.trunc_normal_": lambda t: nn.init.trunc_normal_(t, std=0.5, a=-0.6, b=0.6),
    "nn.init.xavier_uniform_": nn.init.xavier_uniform_,
    "nn.init.kaiming_uniform_": lambda t: nn.init.kaiming_uniform_(t, a=5 ** 0.5),
    "nn.init.kaiming_normal_": nn.init.kaiming_normal_,
}
NEED_2D = {"nn.init.xavier_uniform_", "nn.init.kaiming_uniform_", "nn.init.kaiming_normal_"}


def _fill(rank, name, shape, spec, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    ref = INITS[name](torch.zeros(shape, dtype=torch.float64))
    after_ref = torch.rand(4)
    torch.manual_seed(seed)
    x = st.ShardedTensor.from_global(torch.zeros(shape, dtype=torch.float64), pg, spec)
    with torch.no_grad():
        out = INITS[name](x)
    after = torch.rand(4)
    assert out is x
    assert torch.equal(x.full(), ref), (name, spec)
    assert torch.equal(after, after_ref), "the default generator left step with serial"
    return after.tolist()


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_random_fills_equal_serial(world, data):
    name = data.draw(hs.sampled_from(sorted(INITS)), "init")
    nd = data.draw(hs.integers(2 if name in NEED_2D else 1, 3), "ndim")
    shape = tuple(data.draw(hs.lists(hs.integers(1, 7), min_size=nd, max_size=nd), "shape"))
    spec = data.draw(specs(shape, world, partial=True), "spec")
    outs = run(world, _fill, name, shape, spec, data.draw(hs.integers(0, 2**16), "seed"))
    assert all(o == outs[0] for o in outs)      # every rank's generator in step


def _leaf(rank):
    pg = st.ProcessGroup()
    p = st.ShardedTensor.from_global(torch.zeros(4, 3), pg, st.ShardSpec(0, 2)).requires_grad_()
    before = p.to_local().clone()
    state = torch.get_rng_state()
    try:
        p.normal_()
    except RuntimeError as e:
        return str(e), torch.equal(p.to_local(), before) and torch.equal(torch.get_rng_state(), state)
    return None, None


def test_fill_of_a_leaf_that_requires_grad_is_refused_as_serially():
    msg, unchanged = run(2, _leaf)[0]
    assert msg is not None and "leaf Variable that requires grad" in msg
    assert unchanged


FACTORIES = {
    "new_zeros(size)": lambda t, s: t.new_zeros(s),
    "new_zeros(*ints)": lambda t, s: t.new_zeros(*s),
    "new_ones(size=)": lambda t, s: t.new_ones(size=s),
    "new_full": lambda t, s: t.new_full(s, 2.5),
    "new_full(dtype)": lambda t, s: t.new_full(s, 3, dtype=torch.int64),
    "new_empty": lambda t, s: t.new_empty(s).fill_(1.0),
    "new_tensor": lambda t, s: t.new_tensor([[1.0, 2.0]]),
    "new_zeros(requires_grad)": lambda t, s: t.new_zeros(s, requires_grad=True),
    # the legacy constructor (torch 2.4's nn.init.orthogonal_ calls x.new(rows, cols))
    "new(*ints)": lambda t, s: t.new(*s).fill_(1.0),
    "new(Size)": lambda t, s: t.new(torch.Size(s)).fill_(1.0),
    "new(data)": lambda t, s: t.new([[1.0, 2.0]]),
    "new()": lambda t, s: t.new(),
}


def _factory(rank, name, shape, spec, same):
    pg = st.ProcessGroup()
    full = torch.randn(shape, dtype=torch.float64)
    x = st.ShardedTensor.from_global(full, pg, spec)
    size = shape if same else tuple(shape) + (2,)
    ref = FACTORIES[name](full, size)
    out = FACTORIES[name](x, size)
    got = out.full() if isinstance(out, st.ShardedTensor) else out
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype)
    assert torch.equal(got, ref), name
    assert got.requires_grad == ref.requires_grad
    keeps = isinstance(out, st.ShardedTensor) and out.spec == x.spec
    return keeps


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_new_factories_equal_serial(world, data):
    name = data.draw(hs.sampled_from(sorted(FACTORIES)), "factory")
    shape = tuple(data.draw(hs.lists(hs.integers(1, 6), min_size=1, max_size=3), "shape"))
    spec = data.draw(specs(shape, world, partial=True), "spec")
    same = data.draw(hs.booleans(), "same size")
    keeps = run(world, _factory, name, shape, spec, same)[0]
    # x's own shape from a sharded x: laid out like x (no full-size buffer on any rank)
    assert keeps == (same and spec.is_shard and name not in ("new_tensor", "new(data)", "new()"))
