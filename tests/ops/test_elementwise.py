"""Elementwise rules (ops/elementwise.py): unary and binary ops against the serial op, forward and
every input gradient, on random shapes, broadcast patterns and layouts (uneven, strided,
partial); casts, copies, fills and *_like; the collectives each case may issue."""
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs

T = torch.Tensor


def make(full, spec, pg, rank, seed):
    """A ShardedTensor holding `full` (differentiable). A partial value gets random summands
    (rank 0 holds full + noise_0, the others noise_r, the noise summing to zero), so a rule that
    wrongly keeps a non-linear op partial is caught."""
    if spec is None:
        return full
    if not spec.is_partial:
        return st.ShardedTensor.from_global(full, pg, spec)
    d = pg.tp_world_size()
    g = torch.Generator().manual_seed(seed + 7)
    noise = torch.randn((d,) + tuple(full.shape), generator=g, dtype=full.dtype)
    noise = noise - noise.mean(0)
    return st.ShardedTensor.from_local(full * (rank == 0) + noise[rank], pg, spec,
                                       shape=full.shape)


def _full(x):
    return x.full() if isinstance(x, st.ShardedTensor) else x


# (name, fn, domain: "any" | "pos", linear: keeps a partial input partial, differentiable)
UNARY = [
    ("F.gelu", lambda x: F.gelu(x), "any", False, True),
    ("F.gelu tanh", lambda x: F.gelu(x, approximate="tanh"), "any", False, True),
    ("F.relu", F.relu, "any", False, True),
    ("torch.relu", torch.relu, "any", False, True),
    ("relu_", lambda x: x.clone().relu_(), "any", False, True),
    ("F.relu inplace", lambda x: F.relu(x.clone(), inplace=True), "any", False, True),
    ("F.silu", F.silu, "any", False, True),
    ("tanh", lambda x: x.tanh(), "any", False, True),
    ("torch.tanh", torch.tanh, "any", False, True),
    ("sigmoid", torch.sigmoid, "any", False, True),
    ("F.sigmoid", F.sigmoid, "any", False, True),
    ("exp", torch.exp, "any", False, True),
    ("exp_", lambda x: x.clone().exp_(), "any", False, True),
    ("log", torch.log, "pos", False, True),
    ("neg", lambda x: -x, "any", True, True),
    ("torch.neg", torch.neg, "any", True, True),
    ("conj", lambda x: x.conj(), "any", True, True),          # torch 2.4's Adam: grad.conj()
    ("torch.conj_physical", torch.conj_physical, "any", True, True),
    ("resolve_conj", lambda x: x.resolve_conj(), "any", True, True),
    ("torch.resolve_neg", torch.resolve_neg, "any", True, True),
    ("abs", abs, "any", False, True),
    ("sqrt", lambda x: x.sqrt(), "pos", False, True),
    ("rsqrt", torch.rsqrt, "pos", False, True),
    ("x**2", lambda x: x ** 2, "any", False, True),
    ("x.pow(3)", lambda x: x.pow(3), "any", False, True),
    ("torch.pow(x, 0.5)", lambda x: torch.pow(x, 0.5), "pos", False, True),
    ("2**x", lambda x: 2 ** x, "any", False, True),
    ("torch.pow(2, x)", lambda x: torch.pow(2, x), "any", False, True),
    ("square", torch.square, "any", False, True),
    ("sin", torch.sin, "any", False, True),
    ("cos", lambda x: x.cos(), "any", False, True),
    ("erf", torch.erf, "any", False, True),
    ("reciprocal", lambda x: x.reciprocal(), "pos", False, True),
    ("clamp", lambda x: x.clamp(-0.5, 0.5), "any", False, True),
    ("torch.clamp min", lambda x: torch.clamp(x, min=-0.2), "any", False, True),
    ("clamp_min", lambda x: x.clamp_min(0.1), "any", False, True),
    ("clamp_max_", lambda x: x.clone().clamp_max_(0.1), "any", False, True),
    ("softplus", F.softplus, "any", False, True),
    ("nan_to_num", lambda x: torch.nan_to_num(x / 0.5), "any", False, True),
    ("sign", torch.sign, "any", False, True),
    ("floor", torch.floor, "any", False, True),
    ("ceil", lambda x: x.ceil(), "any", False, True),
    ("round", torch.round, "any", False, True),
    ("logical_not", lambda x: torch.logical_not(x > 0), "any", False, False),
    ("~(x > 0)", lambda x: ~(x > 0), "any", False, False),
    ("x // 0.5", lambda x: x // 0.5, "any", False, False),
    ("x * 2.5", lambda x: x * 2.5, "any", True, True),
    ("2.5 * x", lambda x: 2.5 * x, "any", True, True),
    ("x / 3", lambda x: x / 3, "any", True, True),
    ("mul_", lambda x: x.clone().mul_(-1.5), "any", True, True),
    ("x + 1", lambda x: x + 1, "any", False, True),
    ("1 - x", lambda x: 1 - x, "any", False, True),
    ("2 / x", lambda x: 2 / x, "pos", False, True),
    ("x.to(float32)", lambda x: x.to(torch.float32), "any", False, True),  # reduces the source
    ("clone", lambda x: x.clone(), "any", True, True),
]


def _unary(rank, shape, spec, idx, seed):
    pg = st.ProcessGroup()
    _, fn, domain, _, diff = UNARY[idx]
    torch.manual_seed(seed)
    full = torch.randn(shape, dtype=torch.float64)
    if domain == "pos":
        full = full.abs() + 0.5
    full.requires_grad_()
    x = make(full, spec, pg, rank, seed)
    with st.CommTrace() as trace:
        y = fn(x)
    out = y.full()
    if diff:
        w = torch.randn(shape, dtype=torch.float64)
        (out.to(torch.float64) * w).sum().backward()
    return out.detach(), full.grad, y.spec, [e.kind for e in trace.events]


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_unary_matches_serial(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=7))
    spec = data.draw(specs(shape, world))
    idx = data.draw(hs.integers(0, len(UNARY) - 1))
    seed = data.draw(hs.integers(0, 2 ** 16))
    name, fn, domain, linear, diff = UNARY[idx]
    res = run(world, _unary, shape, spec, idx, seed)
    torch.manual_seed(seed)
    full = torch.randn(shape, dtype=torch.float64)
    if domain == "pos":
        full = full.abs() + 0.5
    full.requires_grad_()
    ref = fn(full)
    if diff:
        w = torch.randn(shape, dtype=torch.float64)
        (ref.to(torch.float64) * w).sum().backward()
    nspec = spec.normalize(shape)
    grads = [g for _, g, _, _ in res]
    if diff and nspec.is_partial:
        grads = [sum(grads)]
    for out, _, ospec, kinds in res:
        assert out.dtype == ref.dtype, name
        # a cast to float32 of a partial value rounds each summand: float32 tolerance
        tol = 1e-10 if out.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol, msg=name)
        if nspec.is_partial and not linear:
            assert ospec == st.ReplicaSpec()
            assert kinds == (["all_reduce"] if world > 1 else []), (name, kinds)
        else:
            assert ospec == nspec, (name, ospec)
            assert kinds == [], (name, kinds)
    if diff:
        for g in grads:
            torch.testing.assert_close(g, full.grad, rtol=1e-10, atol=1e-12, msg=name)


# (name, fn(a, b), domain of a, domain of b, a may be a number, b may be a number, differentiable)
BINARY = [
    ("a + b", operator.add, "any", "any", True, True, True),
    ("a - b", operator.sub, "any", "any", True, True, True),
    ("a * b", operator.mul, "any", "any", True, True, True),
    ("a / b", operator.truediv, "any", "pos", True, True, True),
    ("a ** b", operator.pow, "pos", "any", True, True, True),
    ("torch.add alpha", lambda a, b: torch.add(a, b, alpha=0.5), "any", "any", False, True, True),
    ("torch.sub alpha", lambda a, b: torch.sub(a, b, alpha=2), "any", "any", False, True, True),
    ("torch.rsub", lambda a, b: torch.rsub(a, b), "any", "any", False, True, True),
    ("true_divide", lambda a, b: torch.true_divide(a, b), "any", "pos", False, True, True),
    ("mul method", lambda a, b: a.mul(b), "any", "any", False, True, True),
    ("maximum", torch.maximum, "any", "any", False, False, True),
    ("minimum", lambda a, b: torch.minimum(a, b), "any", "any", False, False, True),
    ("remainder", torch.remainder, "any", "pos", False, True, True),
    ("atan2", torch.atan2, "any", "any", False, False, True),
    ("a < b", operator.lt, "any", "any", True, True, False),
    ("ge", lambda a, b: torch.ge(a, b), "any", "any", False, True, False),
    ("eq", lambda a, b: a == b, "any", "any", True, True, False),
    ("isclose", lambda a, b: torch.isclose(a, a * 1.0000001 if isinstance(b, float) else b,
                                           atol=0.3), "any", "any", False, True, False),
    ("logical_and", lambda a, b: torch.logical_and(a > 0, b > 0), "any", "any", False, False, False),
    ("bool a & b", lambda a, b: (a > 0) & (b < 0), "any", "any", False, False, False),
    ("where", lambda a, b: torch.where(a > 0, a, b), "any", "any", False, True, True),
    ("where method", lambda a, b: a.where(b > 0, b), "any", "any", False, False, True),
    ("lerp", lambda a, b: torch.lerp(a, b, 0.3), "any", "any", False, False, True),
    ("lerp tensor weight", lambda a, b: torch.lerp(a, a * 2, b), "any", "any", False, False, True),
    ("addcmul", lambda a, b: torch.addcmul(a, a, b, value=0.5), "any", "any", False, False, True),
    ("addcdiv", lambda a, b: torch.addcdiv(a, a, b, value=-2), "any", "pos", False, False, True),
]
# in place: a has the output's shape; (name, fn, domain a, domain b, b may be a number)
INPLACE = [
    ("add_", lambda a, b: a.clone().add_(b, alpha=2), "any", "any", True),
    ("+=", lambda a, b: operator.iadd(a.clone(), b), "any", "any", True),
    ("sub_", lambda a, b: a.clone().sub_(b), "any", "any", True),
    ("mul_", lambda a, b: a.clone().mul_(b), "any", "any", True),
    ("*=", lambda a, b: operator.imul(a.clone(), b), "any", "any", True),
    ("div_", lambda a, b: a.clone().div_(b), "any", "pos", True),
    ("lerp_", lambda a, b: a.clone().lerp_(b, 0.25), "any", "any", False),
    ("addcmul_", lambda a, b: a.clone().addcmul_(b, b, value=0.1), "any", "any", False),
    ("addcdiv_", lambda a, b: a.clone().addcdiv_(a, b, value=0.1), "any", "pos", False),
    ("copy_", lambda a, b: a.clone().copy_(b), "any", "any", False),
    ("masked_fill_", lambda a, b: a.clone().masked_fill_(b > 0, -3.0), "any", "any", False),
    ("masked_fill", lambda a, b: a.masked_fill(b > 0, 2.0), "any", "any", False),
    ("torch.maximum out=", lambda a, b: _maximum_out(a, b), "any", "any", False),
]


def _maximum_out(a, b):
    with torch.no_grad():
        return torch.maximum(a, b, out=a.clone())


def _operand(kind, shape, spec, domain, pg, rank, seed):
    if kind == "number":
        return 0.75 if domain == "pos" else -0.625, None
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(shape, generator=g, dtype=torch.float64)
    if domain == "pos":
        full = full.abs() + 0.5
    if kind == "const":            # a plain tensor that needs no gradient (rope's cos/sin)
        return full, None
    full.requires_grad_()
    return make(full, spec if kind == "st" else None, pg, rank, seed), full


def _binary(rank, case, a_desc, b_desc, seed):
    pg = st.ProcessGroup()
    fn = case[1]
    a, fa = _operand(*a_desc, pg, rank, seed)
    b, fb = _operand(*b_desc, pg, rank, seed + 1)
    with st.CommTrace() as trace:
        y = fn(a, b)
    out = _full(y)
    if out.dtype == torch.float64 and out.requires_grad:
        g = torch.Generator().manual_seed(seed + 2)
        (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum().backward()
    grads = [None if f is None else f.grad for f in (fa, fb)]
    spec = y.spec if isinstance(y, st.ShardedTensor) else None
    return out.detach(), grads, spec, [(e.kind, e.phase) for e in trace.events]


def _serial(case, a_desc, b_desc, seed):
    fn = case[1]
    vals = []
    for (kind, shape, _, domain), s in ((a_desc, seed), (b_desc, seed + 1)):
        if kind == "number":
            vals.append((0.75 if domain == "pos" else -0.625, None))
            continue
        g = torch.Generator().manual_seed(s)
        full = torch.randn(shape, generator=g, dtype=torch.float64)
        if domain == "pos":
            full = full.abs() + 0.5
        if kind == "const":
            vals.append((full, None))
            continue
        full.requires_grad_()
        vals.append((full, full))
    out = fn(vals[0][0], vals[1][0])
    if out.dtype == torch.float64 and out.requires_grad:
        g = torch.Generator().manual_seed(seed + 2)
        (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum().backward()
    return out.detach(), [None if f is None else f.grad for _, f in vals]


@hs.composite
def broadcast_pair(draw, world, inplace):
    """Output shape and two operand shapes that broadcast to it (dropped leading dims, size-1
    dims); with `inplace` the first operand has the output's shape."""
    out = draw(shapes(max_dims=3, max_side=6))

    def operand():
        k = draw(hs.integers(0, len(out)))
        s = list(out[len(out) - k:])
        for i in range(len(s)):
            if draw(hs.booleans()) and draw(hs.booleans()):
                s[i] = 1
        return tuple(s)
    return (tuple(out) if inplace else operand()), operand()


def _run_binary(world, data, case, inplace):
    sa, sb = data.draw(broadcast_pair(world, inplace))
    name, fn, da, db = case[:4]
    a_num = not inplace and case[4]
    b_num = case[4] if inplace else case[5]
    kinds_a = ["st", "st", "plain", "const"] + (["number"] if a_num else [])
    kinds_b = ["st", "st", "plain", "const"] + (["number"] if b_num else [])
    ka = data.draw(hs.sampled_from(kinds_a))
    kb = data.draw(hs.sampled_from(kinds_b if ka == "st" else ["st"]))
    if name == "copy_" and ka != "st":
        ka = "st"
    spa = data.draw(_specs(sa, world)) if ka == "st" else None
    spb = data.draw(_specs(sb, world)) if kb == "st" else None
    seed = data.draw(hs.integers(0, 2 ** 16))
    a_desc, b_desc = (ka, sa, spa, da), (kb, sb, spb, db)
    res = run(world, _binary, case, a_desc, b_desc, seed)
    ref, ref_grads = _serial(case, a_desc, b_desc, seed)
    for out, grads, spec, events in res:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=name)
        assert out.dtype == ref.dtype
        fwd = [k for k, ph in events if ph == "forward"]
        n_st = (ka == "st") + (kb == "st")
        assert len(fwd) <= n_st + 1, (name, fwd)
        shard_specs = [_out_spec(s, sh, ref.dim()) for s, sh in ((spa, sa), (spb, sb))
                       if s is not None and s.normalize(sh).is_shard]
        partial = any(s is not None and s.normalize(sh).is_partial for s, sh in ((spa, sa), (spb, sb)))
        if not partial and len(set(shard_specs)) <= 1 and None not in shard_specs:
            if not (inplace and shard_specs and (spa is None or not spa.normalize(sa).is_shard)):
                assert fwd == [], (name, a_desc, b_desc, fwd)     # local: no communication
                if shard_specs and spec is not None:
                    assert spec == shard_specs[0], (name, spec)
    for i, rg in enumerate(ref_grads):
        if rg is None:
            continue
        desc = (a_desc, b_desc)[i]
        got = [grads[i] for _, grads, _, _ in res]
        if desc[0] == "st" and desc[2].normalize(desc[1]).is_partial:
            got = [sum(got)]
        for g in got:
            torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12, msg=f"{name} grad {i}")


def _specs(shape, world):
    """specs() that also covers 0-dim operands (replicated or partial only)."""
    if not shape:
        return hs.sampled_from([st.ReplicaSpec(), st.PartialSpec()])
    return specs(shape, world)


def _out_spec(spec, shape, ndim):
    """The output-dim ShardSpec of an operand's shard (None when it is a broadcast size-1 dim)."""
    s = spec.normalize(shape)
    if shape[s.dim] == 1:  # may broadcast against a longer dim: the output cannot keep it
        return None
    return st.ShardSpec(s.dim + ndim - len(shape), s.degree, s.stride)


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_binary_broadcast_matches_serial(world, data):
    case = BINARY[data.draw(hs.integers(0, len(BINARY) - 1))]
    _run_binary(world, data, case, inplace=False)


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_inplace_binary_matches_serial(world, data):
    case = INPLACE[data.draw(hs.integers(0, len(INPLACE) - 1))]
    _run_binary(world, data, case, inplace=True)


# --- partial rules and the collectives they issue --------------------------------------------------

def _partial_rules(rank):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(0)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    P, Q = make(x, st.PartialSpec(), pg, rank, 1), make(y, st.PartialSpec(), pg, rank, 2)
    R = st.ShardedTensor.from_global(bias, pg, st.ReplicaSpec())
    S = st.ShardedTensor.from_global(y, pg, st.ShardSpec(1, n))
    cases = {
        "P + Q": (lambda: P + Q, x + y),
        "P - Q": (lambda: P - Q, x - y),
        "P * 3": (lambda: P * 3, x * 3),
        "P * plain": (lambda: P * bias, x * bias),
        "P * R": (lambda: P * R, x * bias),
        "P / R": (lambda: P / (R.abs() + 1), x / (bias.abs() + 1)),
        "-P": (lambda: -P, -x),
        "where(c, P, Q)": (lambda: torch.where(y > 0, P, Q), torch.where(y > 0, x, y)),
        "lerp(P, Q, w)": (lambda: torch.lerp(P, Q, bias), torch.lerp(x, y, bias)),
        "P * Q": (lambda: P * Q, x * y),
        "P + R": (lambda: P + R, x + bias),
        "P + plain": (lambda: P + bias, x + bias),
        "P + 1": (lambda: P + 1, x + 1),
        "relu(P)": (lambda: torch.relu(P), torch.relu(x)),
        "P > 0": (lambda: P > 0, x > 0),
        "floor div": (lambda: torch.div(P, 0.5, rounding_mode="floor"),
                      torch.div(x, 0.5, rounding_mode="floor")),
        "P + S": (lambda: P + S, x + y),
        "S * P": (lambda: S * P, x * y),
        "P.add_(Q)": (lambda: P.clone().add_(Q), x + y),
        "P.mul_(2)": (lambda: P.clone().mul_(2), x * 2),
        "P.add_(R)": (lambda: P.clone().add_(R), x + bias),
    }
    out = {}
    for name, (fn, ref) in cases.items():
        # fresh summands for every case: a case that reduces P rebinds it (replicated after)
        P, Q = make(x, st.PartialSpec(), pg, rank, 1), make(y, st.PartialSpec(), pg, rank, 2)
        with st.CommTrace() as trace:
            r = fn()
        assert torch.allclose(r.full(), ref), name
        out[name] = (r.spec, [e.kind for e in trace.events])
    return out


def test_partial_stays_partial_only_where_linear():
    res = run(2, _partial_rules)[0]
    P, R = st.PartialSpec(), st.ReplicaSpec()
    for name in ("P + Q", "P - Q", "P * 3", "P * plain", "P * R", "P / R", "-P",
                 "where(c, P, Q)", "lerp(P, Q, w)", "P.add_(Q)", "P.mul_(2)"):
        assert res[name] == (P, []) or (name == "P / R" and res[name][0] == P), (name, res[name])
    assert res["P * Q"] == (P, ["all_reduce"])          # one factor reduced, the product partial
    for name in ("P + R", "P + plain", "P + 1", "relu(P)", "P > 0", "floor div", "P.add_(R)"):
        assert res[name] == (R, ["all_reduce"]), (name, res[name])
    for name in ("P + S", "S * P"):                      # reduce-scatter into the shard's layout
        assert res[name] == (st.ShardSpec(1, 2), ["reduce_scatter"]), (name, res[name])


def _layouts(rank):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    big = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    A = st.ShardedTensor.from_global(x, pg, st.ShardSpec(0, n))
    B = st.ShardedTensor.from_global(big, pg, st.ShardSpec(2, n))
    out = {}
    with st.CommTrace() as t1:
        y = A + bias                       # plain bias broadcast along the sharded dim 0
    out["broadcast"] = (y.spec, [e.kind for e in t1.events])
    with st.CommTrace() as t2:
        z = B * A                          # Shard(2) of 72 elements vs Shard(0) of 24: move A
        (z.full() * z.full()).sum().backward()
    out["mixed"] = (z.spec, [(e.kind, e.phase, e.op) for e in t2.events])
    with st.CommTrace() as t3:
        (y.full() ** 2).sum().backward()
    out["bias grad"] = [(e.kind, e.phase) for e in t3.events]
    ref_bias = 2 * (x.detach() + bias.detach()).sum(0) + 0 * bias
    out["bias ok"] = bool(torch.allclose(bias.grad, ref_bias))
    return out


def test_layout_choice_and_conjugate_collectives():
    res = run(2, _layouts)[0]
    assert res["broadcast"] == (st.ShardSpec(0, 2), [])
    spec, events = res["mixed"]
    assert spec == st.ShardSpec(2, 2)
    fwd = [e for e in events if e[1] == "forward" and e[2] not in ("ShardedTensor.full",)]
    assert [e[0] for e in fwd] == ["all_to_all"]
    assert ("all_reduce", "backward") in res["bias grad"]   # the bias gradient is summed
    assert res["bias ok"]


def _dtypes(rank):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    i = st.ShardedTensor.from_global(torch.arange(8).view(2, 4), pg, st.ShardSpec(1, n))
    f = st.ShardedTensor.from_global(torch.ones(2, 4), pg, st.ShardSpec(1, n))
    h = st.ShardedTensor.from_global(torch.ones(2, 4, dtype=torch.float16), pg, st.ReplicaSpec())
    return {
        "int + 0.5": (i + 0.5).dtype, "int * 2": (i * 2).dtype, "int / 2": (i / 2).dtype,
        "f32 * f64 plain": (f * torch.ones(4, dtype=torch.float64)).dtype,
        "f32 + f64 0-dim": (f + torch.tensor(1.0, dtype=torch.float64)).dtype,
        "f16 + f32 plain": (h + torch.ones(4)).dtype, "int > 3": (i > 3).dtype,
        "int // 3": (i // 3).full().tolist(), "int % 3": (i % 3).full().tolist(),
    }


def test_dtype_promotion_as_torch():
    res = run(2, _dtypes)[0]
    x, f = torch.arange(8).view(2, 4), torch.ones(2, 4)
    assert res["int + 0.5"] == (x + 0.5).dtype and res["int * 2"] == torch.int64
    assert res["int / 2"] == torch.float32
    assert res["f32 * f64 plain"] == torch.float64
    assert res["f32 + f64 0-dim"] == (f + torch.tensor(1.0, dtype=torch.float64)).dtype
    assert res["f16 + f32 plain"] == torch.float32 and res["int > 3"] == torch.bool
    assert res["int // 3"] == (x // 3).tolist() and res["int % 3"] == (x % 3).tolist()


# --- casts, copies, fills, *_like ---------------------------------------------------------------

def _casts(rank):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(3)
    x = torch.randn(5, 6)
    t = st.ShardedTensor.from_global(x, pg, st.ShardSpec(0, n))
    d = st.ShardedTensor.from_global(x.double(), pg, st.ReplicaSpec())
    p = make(x.double(), st.PartialSpec(), pg, rank, 4)
    checks = {}
    for name, y in {
        "to(float64)": t.to(torch.float64), "to(dtype=)": t.to(dtype=torch.float64),
        "to(cpu, float64)": t.to("cpu", torch.float64), "to(other)": t.to(d),
        "to(device=, non_blocking)": t.to(device="cpu", dtype=torch.float16, non_blocking=True),
        "double": t.double(), "half": t.half(), "bfloat16": t.bfloat16(), "float": d.float(),
        "type(float64)": t.type(torch.float64), "type_as": t.type_as(d),
        "to copy": t.to(torch.float32, copy=True), "clone": t.clone(), "long": t.long(),
    }.items():
        assert isinstance(y, st.ShardedTensor), name
        assert y.spec == (d.spec if name == "float" else t.spec), name
        checks[name] = bool(torch.equal(y.full(), x.to(y.dtype))) and y.shape == x.shape
    checks["to same is self"] = t.to(torch.float32) is t and t.float() is t
    checks["to copy is new"] = t.to(torch.float32, copy=True) is not t
    checks["type str"] = t.type() == "torch.FloatTensor"
    pf = p.float()   # a cast of a pending sum reduces the source once (p is replicated after)
    checks["partial float"] = (pf.spec == st.ReplicaSpec() and torch.allclose(pf.full(), x)
                               and p.spec == st.ReplicaSpec())
    pl = p.to(torch.int64)
    checks["partial to int"] = pl.spec == st.ReplicaSpec() and torch.equal(pl.full(), x.double().to(torch.int64))
    return checks


def test_casts_keep_layout():
    for checks in run(2, _casts):
        assert all(checks.values()), {k: v for k, v in checks.items() if not v}


def _likes(rank, shape, spec, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    x = torch.randn(shape)
    t = make(x, spec, pg, rank, seed)
    out = {}
    for name, fn in {
        "zeros_like": torch.zeros_like, "ones_like": torch.ones_like,
        "full_like": lambda v: torch.full_like(v, 2.5),
        "empty_like": lambda v: torch.empty_like(v).fill_(1.0),
        "zeros_like f64": lambda v: torch.zeros_like(v, dtype=torch.float64),
        "rand_like": torch.rand_like, "randn_like": torch.randn_like,
    }.items():
        torch.manual_seed(seed + 1)
        y = fn(t)
        out[name] = (y.spec, y.full(), torch.rand(()).item())  # the generator advanced alike
    return out


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_like_ops_layout_and_values(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=6))
    spec = data.draw(specs(shape, world))
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _likes, shape, spec, seed)
    x = torch.randn(shape)
    want_spec = st.ReplicaSpec() if spec.is_partial else spec.normalize(shape)
    for name, fn in {"zeros_like": torch.zeros_like, "ones_like": torch.ones_like,
                     "full_like": lambda v: torch.full_like(v, 2.5),
                     "empty_like": lambda v: torch.ones_like(v),
                     "zeros_like f64": lambda v: torch.zeros_like(v, dtype=torch.float64),
                     "rand_like": torch.rand_like, "randn_like": torch.randn_like}.items():
        torch.manual_seed(seed + 1)
        ref = fn(x)
        after = torch.rand(()).item()
        for r in res:
            spec_got, val, nxt = r[name]
            assert spec_got == want_spec, (name, spec_got)
            torch.testing.assert_close(val, ref, msg=name)    # random fills equal the serial draw
            assert nxt == after, name


def _copies(rank, shape, dst_spec, src_kind, src_spec, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    b.requires_grad_()
    dst = make(a, dst_spec, pg, rank, seed)
    src = make(b, src_spec, pg, rank, seed + 1) if src_kind == "st" else b
    with torch.no_grad():
        z = make(a.clone(), dst_spec, pg, rank, seed)
        z.zero_()
        f = make(a.clone(), dst_spec, pg, rank, seed)
        f.fill_(1.5)
    y = dst.clone()
    r = y.copy_(src)
    assert r is y and y.spec == dst.spec
    (y.full() * torch.arange(b.numel(), dtype=torch.float64).view(shape)).sum().backward()
    return y.full().detach(), b.grad, z.full(), f.full()


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_copy_zero_fill_between_layouts(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=6))
    dst_spec = data.draw(specs(shape, world))
    src_kind = data.draw(hs.sampled_from(["st", "plain"]))
    src_spec = data.draw(specs(shape, world))
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _copies, shape, dst_spec, src_kind, src_spec, seed)
    torch.manual_seed(seed)
    _, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = torch.arange(b.numel(), dtype=torch.float64).view(shape)
    grads = [g for _, g, _, _ in res]
    if src_kind == "st" and src_spec.is_partial:
        grads = [sum(grads)]
    for y, _, z, f in res:
        torch.testing.assert_close(y, b)
        assert torch.equal(z, torch.zeros(shape, dtype=torch.float64))
        assert torch.equal(f, torch.full(shape, 1.5, dtype=torch.float64))
    for g in grads:
        torch.testing.assert_close(g, w)


def _bad(rank):
    pg = st.ProcessGroup()
    t = st.ShardedTensor.from_global(torch.ones(4), pg, st.ShardSpec(0, pg.tp_world_size()))
    out = {}
    try:
        torch.where(t > 0)
    except st.UnsupportedOpError as e:
        out["where1"] = str(e)
    plain = torch.empty(4)
    with st.CommTrace() as trace:
        r = torch.add(t, t, out=plain)           # a plain out= gets the whole value
    out["plain out"] = r is plain and torch.equal(plain, torch.full((4,), 2.0))
    out["plain out gathers"] = [e.kind for e in trace.events] == ["all_gather"]
    p = st.ShardedTensor.from_global(torch.empty(4), pg, st.PartialSpec())
    r = torch.mul(t, 3, out=p)                  # out= of another layout keeps its layout
    out["partial out"] = r is p and p.spec.is_partial and torch.equal(p.full(), torch.full((4,), 3.0))
    o = st.ShardedTensor.from_global(torch.empty(4), pg, st.ShardSpec(0, pg.tp_world_size()))
    r = torch.add(t, t, out=o)
    out["out ok"] = r is o and torch.equal(o.full(), torch.full((4,), 2.0))
    return out


def test_unsupported_forms_raise():
    out = run(2, _bad)[0]
    assert "torch.where(condition)" in out["where1"]
    assert out["out ok"] and out["plain out"] and out["plain out gathers"] and out["partial out"]


def _reduce_once(rank):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    # a pending sum read by several non-linear consumers (a norm, then q, k, v) is reduced once
    p = st.ShardedTensor.from_global(x, pg, st.PartialSpec())
    with st.CommTrace() as trace:
        a = torch.relu(p)
        b = p.pow(2)
        c = p + w
    out = (a.full() * 1 + b.full() * 2 + c.full() * 3).sum()
    out.backward()
    return [e.kind for e in trace.events], p.spec, x.grad.clone()


def test_partial_value_is_reduced_once_for_every_reader():
    for kinds, spec, grad in run(2, _reduce_once):
        assert kinds == ["all_reduce"]
        assert spec == st.ReplicaSpec()
        torch.manual_seed(0)
        x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, dtype=torch.float64)
        (torch.relu(x) + 2 * x ** 2 + 3 * (x + w)).sum().backward()
        torch.testing.assert_close(grad, x.grad)


def _allclose(rank, spec_a, spec_b):
    pg = st.ProcessGroup()
    x = torch.arange(24.0, dtype=torch.float64).view(4, 6)
    y = x.clone()
    y[3, 5] += 1e-3                      # differs in one element, held by one rank
    a = make(x, spec_a, pg, rank, 0)
    b = make(y, spec_b, pg, rank, 1)
    return (torch.allclose(a, b), torch.allclose(a, b, atol=1e-2), torch.equal(a, a * 1),
            torch.equal(a, b), a.allclose(b, rtol=0, atol=2e-3))


@pytest.mark.parametrize("world", WORLDS)
def test_allclose_and_equal_agree_on_every_rank(world):
    for sa, sb in [(st.ShardSpec(1, world), st.ShardSpec(1, world)),
                   (st.ShardSpec(0, world), None), (st.PartialSpec(), st.ShardSpec(1, world))]:
        for res in run(world, _allclose, sa, sb):
            assert res == (False, True, True, False, True), (sa, sb)


def _inplace_too_small(rank, cases):
    pg = st.ProcessGroup()
    out = []
    for xshape, yshape, spec, name, y_sharded in cases:
        g = torch.Generator().manual_seed(len(out))
        full = torch.randn(xshape, dtype=torch.float64, generator=g)
        y = torch.randn(yshape, dtype=torch.float64, generator=g)
        x = st.ShardedTensor.from_global(full.clone(), pg, spec)
        if y_sharded:
            y = st.ShardedTensor.from_global(y, pg, st.ShardSpec(spec.dim, spec.degree))
        try:
            getattr(x, name)(y)
            err = None
        except RuntimeError as e:
            err = str(e)
        out.append((err, torch.equal(x.full(), full)))   # (a collective after the error)
    return out


@pytest.mark.parametrize("world", (2, 4))
@settings(max_examples=5)
@given(data=hs.data())
def test_inplace_whose_broadcast_outgrows_self_raises_on_every_rank(world, data):
    """x.add_(y) where y broadcasts x to a larger shape raises serial's RuntimeError on every
    rank, writing nothing. Sharded on a dim x has size 1 (uneven: ranks holding nothing) it
    raised on some ranks only: at tp 4 a (5, 1) x sharded on dim 1 plus a (5, 5) y raised on
    rank 0 and wrote on ranks 1-3 (found by the OpInfo sweep)."""
    cases = []
    for _ in range(6):
        n = data.draw(hs.integers(2, 3))
        dim = data.draw(hs.integers(0, n - 1))
        yshape = tuple(data.draw(hs.integers(2, 5)) for _ in range(n))
        xshape = tuple(1 if k == dim else s for k, s in enumerate(yshape))
        name = data.draw(hs.sampled_from(["add_", "mul_", "sub_", "div_", "pow_", "atan2_",
                                          "__iadd__"]))
        cases.append((xshape, yshape, st.ShardSpec(dim, world), name,
                      data.draw(hs.booleans())))
    res = run(world, _inplace_too_small, cases)
    for k, case in enumerate(cases):
        for rank, r in enumerate(res):
            err, unchanged = r[k]
            assert err is not None and "doesn't match the broadcast shape" in err, (rank, case, err)
            assert unchanged, (rank, case)
