"""`torch._foreach_*` rules (ops/foreach.py): every op against the serial op on lists mixing
layouts and plain tensors; `_foreach_norm` is the global norm with one collective; AdamW, Adam
and SGD (foreach and for-loop) and clip_grad_norm_ on sharded nn.Linear parameters follow the
serial trajectory exactly and communicate nothing but the norm's reduction."""
import math

import pytest
import torch
from hypothesis import given, strategies as hs
from torch import nn

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs

F64 = torch.float64
_scale = torch.tensor(0.3, dtype=F64)

# (name, fn(xs, ys) -> list of outputs)
OPS = [
    ("add scalar", lambda xs, ys: torch._foreach_add(xs, 1.5)),
    ("add list alpha", lambda xs, ys: torch._foreach_add(xs, ys, alpha=0.5)),
    ("add_ list", lambda xs, ys: _ip(torch._foreach_add_, xs, ys, alpha=-2)),
    ("add_ tensor", lambda xs, ys: _ip(torch._foreach_add_, xs, _scale)),
    ("sub", lambda xs, ys: torch._foreach_sub(xs, ys)),
    ("mul scalar list", lambda xs, ys: torch._foreach_mul(xs, [0.5 + i for i in range(len(xs))])),
    ("mul_ tensor", lambda xs, ys: _ip(torch._foreach_mul_, xs, _scale)),
    ("mul_ list", lambda xs, ys: _ip(torch._foreach_mul_, xs, ys)),
    ("div_ list", lambda xs, ys: _ip(torch._foreach_div_, xs, ys)),
    ("div scalar", lambda xs, ys: torch._foreach_div(xs, 3.0)),
    ("lerp_", lambda xs, ys: _ip(torch._foreach_lerp_, xs, ys, 0.1)),
    ("lerp tensor weights", lambda xs, ys: torch._foreach_lerp(xs, ys, ys)),
    ("addcmul_", lambda xs, ys: _ip(torch._foreach_addcmul_, xs, ys, ys, value=0.25)),
    ("addcdiv_ scalars", lambda xs, ys: _ip(torch._foreach_addcdiv_, xs, ys, xs,
                                             [-0.1 * (i + 1) for i in range(len(xs))])),
    ("addcdiv_ tensor scalars", lambda xs, ys: _ip(torch._foreach_addcdiv_, xs, ys, ys,
                                                    torch.arange(len(xs), dtype=F64) + 0.5)),
    ("sqrt", lambda xs, ys: torch._foreach_sqrt(xs)),
    ("sqrt_", lambda xs, ys: _ip(torch._foreach_sqrt_, xs)),
    ("neg", lambda xs, ys: torch._foreach_neg(xs)),
    ("reciprocal_", lambda xs, ys: _ip(torch._foreach_reciprocal_, xs)),
    ("exp", lambda xs, ys: torch._foreach_exp(xs)),
    ("maximum_", lambda xs, ys: _ip(torch._foreach_maximum_, xs, ys)),
    ("minimum", lambda xs, ys: torch._foreach_minimum(xs, ys)),
    ("clamp_min_", lambda xs, ys: _ip(torch._foreach_clamp_min_, xs, 0.9)),
    ("pow", lambda xs, ys: torch._foreach_pow(xs, 2.0)),
    ("scalar pow", lambda xs, ys: torch._foreach_pow(0.5, xs)),
    ("copy_", lambda xs, ys: _ip(torch._foreach_copy_, xs, ys)),
    ("zero_", lambda xs, ys: _ip(torch._foreach_zero_, xs)),
]


def _ip(op, xs, *args, **kwargs):
    xs = [x.clone() for x in xs]
    op(xs, *args, **kwargs)
    return xs


def _make(full, spec, pg):
    return full if spec is None else st.ShardedTensor.from_global(full, pg, spec)


def _values(shapes_, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(s, generator=g, dtype=F64) + 0.5 for s in shapes_]
    ys = [torch.rand(s, generator=g, dtype=F64) + 0.5 for s in shapes_]
    return xs, ys


def _foreach(rank, idx, shapes_, xspecs, yspecs, seed):
    pg = st.ProcessGroup()
    xs, ys = _values(shapes_, seed)
    X = [_make(x, s, pg) for x, s in zip(xs, xspecs)]
    Y = [_make(y, s, pg) for y, s in zip(ys, yspecs)]
    with torch.no_grad(), st.CommTrace() as trace:
        out = OPS[idx][1](X, Y)
    return ([o.full() if isinstance(o, st.ShardedTensor) else o for o in out],
            [o.spec if isinstance(o, st.ShardedTensor) else None for o in out],
            [e.kind for e in trace.events])


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_foreach_ops_match_serial(world, data):
    idx = data.draw(hs.integers(0, len(OPS) - 1))
    k = data.draw(hs.integers(1, 3))
    shapes_ = [data.draw(shapes(max_dims=3, max_side=6)) for _ in range(k)]
    kind = data.draw(hs.sampled_from(["same", "same", "mixed"]))
    layout = lambda s: data.draw(hs.one_of(hs.none(), specs(s, world, partial=False)))
    xspecs = [layout(s) for s in shapes_]
    if kind == "same":
        yspecs = list(xspecs)
    else:
        yspecs = [data.draw(hs.one_of(hs.none(), specs(s, world))) for s in shapes_]
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _foreach, idx, shapes_, xspecs, yspecs, seed)
    xs, ys = _values(shapes_, seed)
    ref = OPS[idx][1](xs, ys)
    for outs, ospecs, kinds in res:
        assert len(outs) == len(ref)
        for o, r, sp, xs_ in zip(outs, ref, ospecs, xspecs):
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=OPS[idx][0])
            if xs_ is not None and kind == "same":
                assert sp == xs_.normalize(o.shape), (OPS[idx][0], sp)
        if kind == "same":
            assert kinds == [], (OPS[idx][0], kinds)   # one local call: no communication


def _norm(rank, shapes_, specs_, ord, seed):
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=F64) for s in shapes_]
    X = [_make(x, s, pg) for x, s in zip(xs, specs_)]
    with st.CommTrace() as trace:
        norms = torch._foreach_norm(X, ord)
    return ([n.full() if isinstance(n, st.ShardedTensor) else n for n in norms],
            [n.spec if isinstance(n, st.ShardedTensor) else None for n in norms],
            [e.kind for e in trace.events])


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_foreach_norm_is_the_global_norm(world, data):
    k = data.draw(hs.integers(1, 4))
    shapes_ = [data.draw(shapes(max_dims=3, max_side=6)) for _ in range(k)]
    specs_ = [data.draw(hs.one_of(hs.none(), specs(s, world, partial=True))) for s in shapes_]
    ord = data.draw(hs.sampled_from([2, 2.0, 1, 3, math.inf, -math.inf, 0]))
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _norm, shapes_, specs_, ord, seed)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=F64) for s in shapes_]
    ref = [torch.linalg.vector_norm(x, ord) for x in xs]
    n_shard = sum(1 for s in specs_ if s is not None and s.is_shard)
    n_partial = sum(1 for s in specs_ if s is not None and s.is_partial)
    for norms, nspecs, kinds in res:
        for n, r, sp, s in zip(norms, ref, nspecs, specs_):
            assert n.shape == () and (sp is None) == (s is None)
            assert sp is None or sp == st.ReplicaSpec()
            torch.testing.assert_close(n, r, rtol=1e-10, atol=1e-12)
        if world > 1:
            want = ["all_reduce"] * n_partial
            if n_shard:
                want.append("all_gather" if math.isinf(ord) else "all_reduce")
            assert sorted(kinds) == sorted(want), kinds


# --- optimizers and gradient clipping on sharded nn.Linear parameters ---------------------------

def _model(pg=None):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5), nn.Linear(5, 3)).double()
    if pg is not None:
        st.split_row(m[0].weight, pg)
        st.split_row(m[0].bias, pg)
        st.split_col(m[2].weight, pg)
        st.replicate(m[2].bias, pg)
        # m[3] stays plain: the optimizer's lists mix ShardedTensors and plain tensors
    return m


def _grads(m, step, pg):
    g = torch.Generator().manual_seed(100 + step)
    for p in m.parameters():
        full = torch.randn(p.shape, generator=g, dtype=F64)
        p.grad = st.ShardedTensor.from_global(full, pg, p.spec) if isinstance(
            p, st.ShardedTensor) else full


OPTIMS = {
    "AdamW": lambda ps, fe: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=fe),
    "Adam": lambda ps, fe: torch.optim.Adam(ps, lr=0.02, weight_decay=0.05, foreach=fe),
    "SGD": lambda ps, fe: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                          weight_decay=0.01, foreach=fe),
    "SGD plain momentum": lambda ps, fe: torch.optim.SGD(ps, lr=0.1, momentum=0.5, foreach=fe),
}


def _optimize(rank, name, foreach, clip, serial):
    pg = None if serial else st.ProcessGroup()
    m = _model(pg)
    opt = OPTIMS[name](m.parameters(), foreach)
    norms, events = [], []
    for step in range(3):
        if serial:
            g = torch.Generator().manual_seed(100 + step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g, dtype=F64)
        else:
            _grads(m, step, pg)
        with st.CommTrace() as trace:
            if clip is not None:
                n = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.5, norm_type=clip,
                                                   foreach=foreach)
                norms.append(float(n.full() if isinstance(n, st.ShardedTensor) else n))
            opt.step()
        events.append([(e.kind, e.op) for e in trace.events])
        opt.zero_grad()
    params = [p.full() if isinstance(p, st.ShardedTensor) else p for p in m.parameters()]
    specs_ = [p.spec if isinstance(p, st.ShardedTensor) else None for p in m.parameters()]
    return [p.detach() for p in params], specs_, norms, events


@pytest.mark.parametrize("world", (2, 4))
@pytest.mark.parametrize("foreach", (True, False))
@pytest.mark.parametrize("name", list(OPTIMS))
def test_optimizer_matches_serial(world, foreach, name):
    ref, _, _, _ = _optimize(0, name, foreach, None, True)
    for params, specs_, _, events in run(world, _optimize, name, foreach, None, False):
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
        assert specs_[:4] == [st.ShardSpec(0, world), st.ShardSpec(0, world),
                              st.ShardSpec(1, world), st.ReplicaSpec()]
        assert events == [[], [], []]              # the optimizer step is local


@pytest.mark.parametrize("norm_type", (2.0, math.inf))
@pytest.mark.parametrize("foreach", (True, False))
def test_clip_grad_norm_is_global(foreach, norm_type):
    ref, _, ref_norms, _ = _optimize(0, "SGD", foreach, norm_type, True)
    for params, _, norms, events in run(2, _optimize, "SGD", foreach, norm_type, False):
        assert norms == pytest.approx(ref_norms, rel=1e-12)
        assert ref_norms[0] > 1.5                  # the clipping scales the gradients
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
        kinds = [k for k, _ in events[0]]
        assert len(kinds) == (1 if foreach else 3), events[0]   # foreach: one for all shards
