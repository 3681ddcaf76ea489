"""Reduction rules (ops/reduction.py) against serial torch, forward and input gradients, over
random dims of random layouts; local over non-sharded dims, the promised collectives over the
sharded dim (sum/mean: none, a partial value; softmax: two all-reduces)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.models_testing import build, inputs_for, weight_error
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs
from test_view import Op as ViewOp, check_op


class Op(ViewOp):
    """The reductions, as picklable callables (dispatch and repr from test_view.Op)."""

    _sum = staticmethod(lambda x, *a, **k: x.sum(*a, **k))
    _torch_sum = staticmethod(lambda x, *a, **k: torch.sum(x, *a, **k))
    _mean = staticmethod(lambda x, *a, **k: x.mean(*a, **k))
    _nansum = staticmethod(lambda x, *a, **k: torch.nansum(x, *a, **k))
    _amax = staticmethod(lambda x, *a, **k: x.amax(*a, **k))
    _amin = staticmethod(lambda x, *a, **k: torch.amin(x, *a, **k))
    _max = staticmethod(lambda x, *a, **k: tuple(x.max(*a, **k)) if a or k else x.max())
    _min = staticmethod(lambda x, *a, **k: tuple(torch.min(x, *a, **k)) if a or k else x.min())
    _argmax = staticmethod(lambda x, *a, **k: x.argmax(*a, **k))
    _argmin = staticmethod(lambda x, *a, **k: torch.argmin(x, *a, **k))
    _vector_norm = staticmethod(lambda x, *a, **k: torch.linalg.vector_norm(x, *a, **k))
    _norm = staticmethod(lambda x, *a, **k: x.norm(*a, **k))
    _torch_norm = staticmethod(lambda x, *a, **k: torch.norm(x, *a, **k))
    _logsumexp = staticmethod(lambda x, *a, **k: torch.logsumexp(x, *a, **k))
    _var = staticmethod(lambda x, *a, **k: x.var(*a, **k))
    _std = staticmethod(lambda x, *a, **k: torch.std(x, *a, **k))
    _var_mean = staticmethod(lambda x, *a, **k: torch.var_mean(x, *a, **k))
    _all = staticmethod(lambda x, *a, **k: (x > -0.5).all(*a, **k))
    _any = staticmethod(lambda x, *a, **k: torch.any(x > 1.0, *a, **k))
    _softmax = staticmethod(lambda x, d: F.softmax(x, dim=d))
    _torch_softmax = staticmethod(lambda x, d: torch.softmax(x, d))
    _method_softmax = staticmethod(lambda x, d: x.softmax(d))
    _log_softmax = staticmethod(lambda x, d: F.log_softmax(x, d))
    _torch_log_softmax = staticmethod(lambda x, d: x.log_softmax(dim=d))
    _softmax_f32 = staticmethod(lambda x, d: F.softmax(x, d, dtype=torch.float32).double())


SOFTMAX = ("softmax", "torch_softmax", "method_softmax", "log_softmax", "torch_log_softmax")


@hs.composite
def reduction_ops(draw, shape):
    nd = len(shape)
    one = hs.integers(-nd, nd - 1)
    many = hs.lists(hs.integers(0, nd - 1), min_size=1, max_size=nd, unique=True).map(tuple)
    keep = draw(hs.booleans())
    kind = draw(hs.sampled_from(["sum", "torch_sum", "mean", "nansum", "amax", "amin", "max",
                                 "min", "argmax", "argmin", "vector_norm", "norm", "logsumexp",
                                 "var", "std", "var_mean", "all", "any", *SOFTMAX]))
    if kind in SOFTMAX:
        return Op(kind, draw(one))
    if kind in ("sum", "torch_sum", "mean", "nansum", "amax", "amin", "logsumexp"):
        if kind != "logsumexp" and draw(hs.booleans()):
            return Op(kind)
        return Op(kind, draw(hs.one_of(one, many)), keepdim=keep)
    if kind in ("max", "min", "argmax", "argmin"):
        if draw(hs.booleans()):
            return Op(kind) if kind in ("max", "min") or not keep else Op(kind, keepdim=True)
        return Op(kind, draw(one), keepdim=keep)
    if kind in ("vector_norm", "norm"):
        ord = draw(hs.sampled_from([2, 1, 3, 0.5, math.inf, -math.inf, 0]))
        if kind == "norm" and ord == 0.5:
            ord = "fro"
        dim = draw(hs.one_of(hs.none(), one, many))
        return Op(kind, ord, dim, keepdim=keep)
    if kind in ("var", "std", "var_mean"):
        dim = draw(hs.one_of(hs.none(), one, many))
        dims = range(nd) if dim is None else [dim] if isinstance(dim, int) else dim
        count = math.prod(shape[d] for d in dims)   # degrees of freedom > 0, as torch asks
        return Op(kind, dim, correction=draw(hs.integers(0, min(2, count - 1))), keepdim=keep)
    return Op(kind, draw(one), keepdim=keep) if draw(hs.booleans()) else Op(kind)


def _reduced_dims(op, nd):
    if op.name in SOFTMAX:
        return {op.a[0] % nd}
    dim = op.a[1] if op.name in ("vector_norm", "norm") else (op.a[0] if op.a else None)
    if dim is None:
        return set(range(nd))
    return {dim % nd} if isinstance(dim, int) else {d % nd for d in dim}


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_reductions_match_serial(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=6))
    spec = data.draw(specs(shape, world))
    op = data.draw(reduction_ops(shape))
    out_specs, kinds = run(world, check_op, shape, spec, op, data.draw(hs.integers(0, 2**16)))[0]
    nspec = spec.normalize(shape)
    over_shard = nspec.is_shard and nspec.dim in _reduced_dims(op, len(shape))
    if nspec.is_replicate or (nspec.is_shard and not over_shard):
        assert kinds == [], (op, kinds)           # local: no collective, forward or backward
    if nspec.is_shard and not over_shard and op.name not in ("argmax", "argmin") and (
            op.a or op.name in SOFTMAX):
        assert out_specs[0].is_shard              # the shard survives
    if over_shard and op.name in ("sum", "torch_sum", "mean", "nansum"):
        assert kinds == [] and out_specs == [st.PartialSpec()]   # deferred all-reduce
    if nspec.is_partial and op.name in ("sum", "torch_sum", "mean", "nansum"):
        assert kinds == [] and out_specs == [st.PartialSpec()]


# --- softmax over the sharded dim: Megatron's two all-reduces ---------------------------------

def _softmax_comm(rank, shape):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(5)
    x = torch.randn(shape, dtype=torch.float64) * 10
    x[0, 0] = -math.inf     # a masked entry
    t = st.ShardedTensor.from_global(x, pg, st.ShardSpec(-1, n))
    with st.CommTrace() as trace:
        y = F.softmax(t, dim=-1)
        z = torch.log_softmax(t, -1)
    torch.testing.assert_close(y.full(), F.softmax(x, -1))
    torch.testing.assert_close(z.full(), F.log_softmax(x, -1))
    return y.spec, [(e.kind, e.phase) for e in trace.events]


@pytest.mark.parametrize("world", [2, 4])
def test_softmax_over_sharded_dim_two_all_reduces_and_keeps_the_shard(world):
    spec, events = run(world, _softmax_comm, (3, 7))[0]
    assert spec == st.ShardSpec(1, world)
    assert events == [("all_reduce", "forward")] * 4


def _max_indices_ties(rank):
    """max/argmax over the sharded dim return the first global occurrence on ties."""
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    t = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, n))
    v, i = t.max(dim=1)
    return v.full().tolist(), i.full().tolist(), t.argmax().full().item(), t.argmin(1).full().tolist()


@pytest.mark.parametrize("world", WORLDS)
def test_max_indices_are_global_first_occurrences(world):
    v, i, flat, amin = run(world, _max_indices_ties)[0]
    assert v == [3.0, 2.0] and i == [1, 0] and flat == 1 and amin == [3, 0]


def _clip_norm(rank):
    """clip_grad_norm_ over sharded and plain gradients gives the serial total norm."""
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(6)
    w, b = torch.randn(6, 5), torch.randn(5)
    gw, gb = torch.randn(6, 5), torch.randn(5)
    pw = torch.nn.Parameter(st.ShardedTensor.from_global(w, pg, st.ShardSpec(0, n)))
    pb = torch.nn.Parameter(b.clone())
    pw.grad = st.ShardedTensor.from_global(gw, pg, st.ShardSpec(0, n))
    pb.grad = gb.clone()
    with st.CommTrace() as trace:
        total = torch.nn.utils.clip_grad_norm_([pw, pb], max_norm=1e9, foreach=False)
    ref = torch.linalg.vector_norm(torch.stack([gw.norm(), gb.norm()]))
    total = total.full() if isinstance(total, st.ShardedTensor) else total
    torch.testing.assert_close(total, ref)
    return trace.count("all_reduce")


def test_clip_grad_norm_total_norm_is_global():
    assert run(2, _clip_norm)[0] == 1


# --- torch.norm (torch.functional.norm forwards out=None) and Adafactor, which calls it ---------

@hs.composite
def torch_norm_ops(draw, shape):
    nd = len(shape)
    p = draw(hs.sampled_from([None, "fro", 2, 1, math.inf, 3]))
    dims = hs.lists(hs.integers(-nd, nd - 1), min_size=1, max_size=min(nd, 2),
                    unique_by=lambda d: d % nd).map(tuple)   # 'fro' takes at most two dims
    dim = draw(hs.one_of(hs.none(), hs.integers(-nd, nd - 1), dims))
    keepdim = draw(hs.booleans())
    if draw(hs.booleans()):
        return Op("torch_norm", p=p, dim=dim, keepdim=keepdim)
    return Op("torch_norm", p, dim, keepdim)


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_torch_norm_matches_serial(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=6))
    spec = data.draw(specs(shape, world))
    op = data.draw(torch_norm_ops(shape))
    out_specs, kinds = run(world, check_op, shape, spec, op, data.draw(hs.integers(0, 2**16)))[0]
    nspec = spec.normalize(shape)
    dim = op.k["dim"] if op.k else op.a[1]
    dims = set(range(len(shape))) if dim is None else {
        d % len(shape) for d in ((dim,) if isinstance(dim, int) else dim)}
    if nspec.is_replicate or (nspec.is_shard and nspec.dim not in dims):
        assert kinds == [], (op, kinds)           # local: no collective, forward or backward
    if world > 1 and (nspec.is_partial or (nspec.is_shard and nspec.dim in dims)):
        # one reduction (the inf-norm's max also routes its gradient with one more)
        p = op.k["p"] if op.k else op.a[0]
        want = 2 if p == math.inf and nspec.is_shard else 1
        assert kinds == ["all_reduce"] * want, (op, kinds)


def _norm_out(rank):
    pg = st.ProcessGroup()
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, pg.tp_world_size()))
    got = [torch.norm(t).full(), torch.norm(t, out=None, dtype=torch.float64).full()]
    if pg.tp_world_size() == 1:   # the shard is the whole tensor: serial's out= write
        o = torch.empty(())
        torch.norm(t, out=o)
        assert torch.equal(o, torch.norm(x))
        return got
    with pytest.raises(st.UnsupportedOpError, match="out="):
        torch.norm(t, out=torch.empty(()))
    return got


@pytest.mark.parametrize("world", WORLDS)
def test_torch_norm_accepts_out_none_refuses_out_tensor(world):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for got, want in zip(run(world, _norm_out)[0], [x.norm(), x.norm(dtype=torch.float64)]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


def _adafactor(rank, foreach, steps=3):
    pg = st.ProcessGroup()
    serial = build("gpt2", "sdpa")
    model = st.parallelize(copy.deepcopy(serial), pg)
    opts = [torch.optim.Adafactor(m.parameters(), lr=1e-2, foreach=foreach)
            for m in (serial, model)]
    for step in range(steps):
        batch = inputs_for("gpt2", seed=step)
        for m, opt in zip((serial, model), opts):
            opt.zero_grad()
            m(**batch).loss.backward()
            opt.step()
    return weight_error(model, serial), weight_error(model, build("gpt2", "sdpa"))


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"),
                    reason="torch.optim.Adafactor appeared in torch 2.5")
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("foreach", [True, False])
def test_adafactor_on_gpt2_matches_serial(world, foreach):
    for err, moved in run(world, _adafactor, foreach):
        assert err < 1e-4, err
        assert moved > 1e-3                       # the steps did update the weights


def _norm_at_zeros(rank, world):
    pg = st.ProcessGroup()
    errs = {}
    for ordv in (0.5, -1.0, -2.0, 3.0, 1.0, 2.0):
        for case in ("zero_element", "zero_row"):
            torch.manual_seed(0)
            x = torch.randn(3, 8, dtype=torch.float64)
            if case == "zero_element":
                x[0, 5] = 0
            else:
                x[1] = 0
            x.requires_grad_()
            sx = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, world))
            w = torch.randn(3, dtype=torch.float64)
            n = torch.linalg.vector_norm(sx, ordv, dim=1).full()
            (n * w).sum().backward()
            g, x.grad = x.grad.clone(), None
            ref = torch.linalg.vector_norm(x, ordv, dim=1)
            (ref * w).sum().backward()
            errs[(ordv, case)] = max((n - ref).abs().max().item(),
                                     (g - x.grad).abs().nan_to_num(1e9).max().item())
    return errs


@pytest.mark.parametrize("world", [2, 4])
def test_vector_norm_over_the_sharded_dim_at_exact_zeros(world):
    """p < 1 and negative p: a zero element or an all-zero row gave NaN gradients (|x|^p's
    infinite derivative at a zero local norm) where serial gives finite ones."""
    for errs in run(world, _norm_at_zeros, world):
        bad = {k: v for k, v in errs.items() if not v < 1e-12}
        assert not bad, bad


def _fro_checks(rank):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6)
    sx = st.ShardedTensor.from_global(x, pg, st.ShardSpec(2, pg.tp_world_size()))
    out = []
    for kw in ({"ord": "fro", "dim": 1}, {"ord": "fro"}, {"ord": 2}):
        errs = []
        for t in (x, sx):
            try:
                torch.linalg.norm(t, **kw)
                errs.append(None)
            except RuntimeError as e:
                errs.append(str(e))
        out.append(errs)
    return out


def test_linalg_norm_refuses_what_serial_refuses():
    """ord='fro' with an int dim, and an ord without dim on a 3-D input, raise torch's own
    errors as in serial (the sharded rule computed a vector 2-norm instead)."""
    for serial_err, sharded_err in run(2, _fro_checks)[0]:
        assert serial_err is not None and sharded_err == serial_err


def _norm0_grad(rank, dim):
    pg = st.ProcessGroup()
    torch.manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64)
    x[1, 2] = 0.0
    w = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, pg.tp_world_size())).detach()
    w.requires_grad_()
    n = torch.linalg.vector_norm(w, 0, dim)
    (n * 2).sum().backward()
    return (n.full() if isinstance(n, st.ShardedTensor) else n), n.requires_grad, w.grad is None


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dim", [None, 1, 0])
def test_vector_norm_ord0_gives_no_gradient_as_serial(world, dim):
    torch.manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64)
    x[1, 2] = 0.0
    x.requires_grad_()
    ref = torch.linalg.vector_norm(x, 0, dim)
    (ref * 2).sum().backward()
    assert x.grad is None
    for n, requires_grad, no_grad in run(world, _norm0_grad, dim):
        torch.testing.assert_close(n, ref.detach())
        assert requires_grad and no_grad   # differentiable, and the input gets no gradient
