"""Linear algebra rules (ops/linear.py): F.linear, addmm (Conv1D), mm, bmm, baddbmm, matmul, mv,
dot, einsum. Forward and every input gradient equal the serial op (float64) for random shapes,
layouts, strides, uneven shards and world sizes; CommTrace counts for the Megatron layers."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs
from torch import nn

import shardtensor as st
from shardtensor.testing import assert_close, run
from strategies import WORLDS, specs

ST = st.ShardedTensor

FUNCS = {
    "linear": lambda x, w, b=None: F.linear(x, w, b),
    "mm": torch.mm,
    "mm_method": lambda a, b: a.mm(b),
    "bmm": torch.bmm,
    "matmul": torch.matmul,
    "matmul_op": lambda a, b: a @ b,
    "mv": torch.mv,
    "dot": torch.dot,
    "addmm": lambda a, b, c: torch.addmm(c, a, b, beta=0.5, alpha=1.5),
    "addmm_conv1d": lambda a, b, c: torch.addmm(c, a, b),
    "baddbmm": lambda a, b, c: torch.baddbmm(c, a, b, beta=2.0, alpha=0.25),
}


def _build(full, layout, pg):
    return full if layout is None else ST.from_global(full, pg, layout)


def _check(rank, name, shapes, layouts, grads, seed):
    """Serial vs sharded `name` on the same random float64 inputs: forward and input grads."""
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    fn = FUNCS[name] if not name.startswith("einsum:") else (
        lambda a, b: torch.einsum(name[7:], a, b))
    fulls = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ref = [f.clone().requires_grad_(g) for f, g in zip(fulls, grads)]
    mine = [f.clone().requires_grad_(g) for f, g in zip(fulls, grads)]
    expect = fn(*ref)
    out = fn(*[_build(f, l, pg) for f, l in zip(mine, layouts)])
    assert isinstance(out, ST), type(out)
    assert out.shape == expect.shape, (out.shape, expect.shape)
    got = out.full()
    assert_close(got, expect, rtol=1e-10, atol=1e-10, what=f"{name} forward")
    r = torch.randn(expect.shape, dtype=torch.float64)
    if any(grads):
        (expect * r).sum().backward()
        (got * r).sum().backward()
        for i, (a, b) in enumerate(zip(mine, ref)):
            if b.requires_grad:
                assert a.grad is not None, f"{name}: input {i} got no gradient"
                assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, what=f"{name} grad {i}")
    return out.spec


def layouts(shape, world, partial=True):
    return hs.one_of(hs.none(), specs(shape, world, partial=partial))


def _some_sharded(lay):
    """At least one operand must be a ShardedTensor for the rule to run."""
    return lay if any(l is not None for l in lay) else [st.ReplicaSpec()] + lay[1:]


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_linear_any_layouts(world, data):
    batch = data.draw(hs.lists(hs.integers(1, 4), max_size=2), "batch")
    k, n = data.draw(hs.integers(1, 9), "k"), data.draw(hs.integers(1, 9), "n")
    bias = data.draw(hs.booleans(), "bias")
    shapes = [tuple(batch) + (k,), (n, k)] + ([(n,)] if bias else [])
    lay = [data.draw(layouts(s, world, partial=(i == 0)), f"layout{i}")
           for i, s in enumerate(shapes)]
    lay = _some_sharded(lay)
    grads = [data.draw(hs.booleans(), "x grad"), True, True][:len(shapes)]
    spec = run(world, _check, "linear", shapes, lay, grads, data.draw(hs.integers(0, 2**16)))[0]
    xl, wl = lay[0], lay[1]
    last = len(shapes[0]) - 1
    if (wl is not None and wl.is_shard and wl.normalize((n, k)).dim == 0
            and (xl is None or xl.is_replicate)):             # column parallel
        assert spec == st.ShardSpec(last, world, wl.stride)
    if (wl is not None and wl.is_shard and wl.normalize((n, k)).dim == 1 and xl is not None
            and xl.is_shard and xl.normalize(shapes[0]).dim == last
            and xl.stride == wl.stride):                      # row parallel
        assert spec == (st.ReplicaSpec() if bias else st.PartialSpec())


EINSUMS = {
    "bhld,lrd->bhlr": "bhld lrd",
    "bind,bjnd->bnij": "bind bjnd",
    "...ij,...jk->...ik": "zij zjk",
    "ij,jk": "ij jk",
    "bij,bkj->bik": "bij bkj",
}


@hs.composite
def contraction(draw):
    """(function name, operand shapes) for every contraction the rules serve."""
    kind = draw(hs.sampled_from(["mm", "mm_method", "bmm", "matmul", "matmul_op", "mv", "dot",
                                 "addmm", "addmm_conv1d", "baddbmm", "einsum"]))
    z = lambda: draw(hs.integers(1, 6))
    b, i, k, j = z(), z(), z(), z()
    if kind in ("mm", "mm_method"):
        return kind, [(i, k), (k, j)]
    if kind == "bmm":
        return kind, [(b, i, k), (b, k, j)]
    if kind == "mv":
        return kind, [(i, k), (k,)]
    if kind == "dot":
        return kind, [(k,), (k,)]
    if kind in ("addmm", "addmm_conv1d"):
        return kind, [(i, k), (k, j), draw(hs.sampled_from([(j,), (i, j), (1, j)]))]
    if kind == "baddbmm":
        return kind, [(b, i, k), (b, k, j), draw(hs.sampled_from([(b, i, j), (i, j), (j,)]))]
    if kind == "einsum":
        eq = draw(hs.sampled_from(sorted(EINSUMS)))
        size = {c: z() for c in "bhldrinjkz"}
        return "einsum:" + eq, [tuple(size[c] for c in t) for t in EINSUMS[eq].split()]
    # matmul: 1-D or batched operands, batch dims broadcast from the right (1 or missing)
    bo = draw(hs.lists(hs.integers(1, 4), max_size=2))

    def operand(core):
        if draw(hs.booleans()) and draw(hs.booleans()):
            return core[-1:] if core[-1] == k else core[:1]       # 1-D
        keep = draw(hs.integers(0, len(bo)))
        bs = [n if draw(hs.booleans()) else 1 for n in bo[len(bo) - keep:]]
        return tuple(bs) + core
    return kind, [operand((i, k)), operand((k, j))]


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_contractions_any_layouts(world, data):
    name, shapes = data.draw(contraction(), "case")
    lay = [data.draw(layouts(s, world), f"layout{n}") for n, s in enumerate(shapes)]
    lay = _some_sharded(lay)
    grads = [data.draw(hs.booleans(), "grad a"), True, True][:len(shapes)]
    spec = run(world, _check, name, shapes, lay, grads, data.draw(hs.integers(0, 2**16)))[0]
    a, b = lay[0], lay[1]
    if (a is not None and b is not None and a.is_shard and b.is_shard and len(shapes) == 2
            and name in ("mm", "bmm") and a.normalize(shapes[0]).dim == len(shapes[0]) - 1
            and b.normalize(shapes[1]).dim == len(shapes[1]) - 2 and a.stride == b.stride):
        assert spec == st.PartialSpec()      # contraction sharded on both sides


def _explicit(rank):
    """Named cases: strided column parallel (fused qkv), Conv1D, uneven and empty shards."""
    d = st.ProcessGroup().tp_world_size()
    S = lambda dim, stride=1: st.ShardSpec(dim, d, stride)
    out = {}
    # fused qkv: nn.Linear weight (3h, h) split_row(stride=3) -> output strided on the last dim
    out["qkv"] = _check(rank, "linear", [(2, 3, 4), (12, 4), (12,)], [None, S(0, 3), S(0, 3)],
                        [True, True, True], 1)
    # GPT-2 Conv1D: addmm(bias, x2d, weight (in, out)) with weight split_col(stride=3)
    out["conv1d"] = _check(rank, "addmm_conv1d", [(6, 4), (4, 12), (12,)],
                           [None, S(-1, 3), S(0, 3)], [True, True, True], 2)
    # Conv1D row parallel: weight (in, out) split_row, input sharded on its last dim
    out["conv1d_row"] = _check(rank, "addmm_conv1d", [(6, 8), (8, 4), (4,)],
                               [S(-1), S(0), None], [True, True, True], 3)
    # uneven, with empty shards at world 4: 3 output features
    out["uneven"] = _check(rank, "linear", [(5, 4), (3, 4), (3,)], [None, S(0), S(0)],
                           [True, True, True], 4)
    out["uneven_row"] = _check(rank, "linear", [(5, 3), (4, 3)], [S(1), S(1)],
                               [True, True], 5)
    # attention: q @ k^T and attn @ v with heads sharded on both sides stay local
    out["scores"] = _check(rank, "matmul", [(2, 4, 3, 5), (2, 4, 5, 3)], [S(1), S(1)],
                           [True, True], 6)
    out["einsum_heads"] = _check(rank, "einsum:bind,bjnd->bnij", [(2, 3, 4, 5), (2, 3, 4, 5)],
                                 [S(2), S(2)], [True, True], 7)
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_named_layers_and_output_specs(world):
    out = run(world, _explicit)[0]
    S = lambda dim, stride=1: st.ShardSpec(dim, world, stride)
    assert out["qkv"] == S(2, 3)
    assert out["conv1d"] == S(1, 3)
    assert out["conv1d_row"] == st.ReplicaSpec()
    assert out["uneven"] == S(1)
    assert out["uneven_row"] == st.PartialSpec()
    assert out["scores"] == S(1)
    assert out["einsum_heads"] == S(1)


# --- CommTrace: the Megatron layers communicate exactly as Megatron does ------------------------

def _counts(trace):
    c = {}
    for e in trace.events:
        c[(e.phase, e.kind)] = c.get((e.phase, e.kind), 0) + 1
    return c


def _megatron_layers(rank):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    d = pg.tp_world_size()
    x = torch.randn(2, 3, 8, requires_grad=True)
    col, row = nn.Linear(8, 16), nn.Linear(16, 8)
    ref_col, ref_row = nn.Linear(8, 16), nn.Linear(16, 8)
    ref_col.load_state_dict(col.state_dict()), ref_row.load_state_dict(row.state_dict())
    st.split_row(col.weight, pg), st.split_row(col.bias, pg), st.split_col(row.weight, pg)
    out = {}
    with st.CommTrace() as t:
        h = col(x)
    out["col_fwd"] = _counts(t)
    with st.CommTrace() as t:
        y = row(h)
    out["row_fwd"] = _counts(t)
    out["specs"] = (h.spec, y.spec)
    ref_x = x.detach().clone().requires_grad_()
    ref = ref_row(ref_col(ref_x))
    assert_close(y.full(), ref, what="col->row")
    g = torch.randn(ref.shape)
    with st.CommTrace() as t:
        y.backward(g)
    out["bwd"] = _counts(t)
    ref.backward(g)
    assert_close(x.grad, ref_x.grad, what="x grad")
    assert_close(col.weight.grad, ref_col.weight.grad, what="col weight grad")
    assert_close(row.weight.grad, ref_row.weight.grad, what="row weight grad")
    assert_close(row.bias.grad, ref_row.bias.grad, what="row bias grad")
    # row parallel without a bias: the output stays partial until someone needs the value
    with st.CommTrace() as t:
        p = F.linear(h, row.weight)
    out["partial"] = (p.spec, _counts(t))
    # output_replicate: a column-parallel layer that gathers its output
    w = ST.from_global(ref_col.weight.detach(), pg, st.ShardSpec(0, d),
                       st.ComputeSpec(st.ComputePattern.TP1D, output_replicate=True))
    with st.CommTrace() as t:
        r = F.linear(x, w)
    assert_close(r.full(), F.linear(x, ref_col.weight), what="output_replicate")
    out["replicate"] = (r.spec, _counts(t))
    return out


def test_column_and_row_parallel_comm_counts():
    out = run(2, _megatron_layers)[0]
    assert out["specs"] == (st.ShardSpec(2, 2), st.ReplicaSpec())
    assert out["col_fwd"] == {}                                  # column parallel: silent
    assert out["row_fwd"] == {("forward", "all_reduce"): 1}      # row parallel + bias
    # backward: only the column layer's f (its input's gradient); row parallel needs none
    assert out["bwd"] == {("backward", "all_reduce"): 1}
    assert out["partial"] == (st.PartialSpec(), {})
    assert out["replicate"] == (st.ReplicaSpec(), {("forward", "all_gather"): 1})


class MLP(nn.Module):
    def __init__(self, h=8, f=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _seed_mlp(rank, order):
    """The seed demo: Linear -> GELU -> Linear, col->row (Megatron) vs row->col."""
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    ref, mlp = MLP(), MLP()
    mlp.load_state_dict(ref.state_dict())
    if order == "col->row":
        st.split_row(mlp.fc1.weight, pg), st.split_row(mlp.fc1.bias, pg)
        st.split_col(mlp.fc2.weight, pg)
    else:
        st.split_col(mlp.fc1.weight, pg)
        st.split_row(mlp.fc2.weight, pg), st.split_row(mlp.fc2.bias, pg)
    x = torch.randn(4, 5, 8)
    with st.CommTrace() as t:
        y = mlp(x).full()
        loss = (y ** 2).sum()
        loss.backward()
    (ref(x) ** 2).sum().backward()
    assert_close(y, ref(x), what=order)
    for (name, p), q in zip(mlp.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, what=f"{order} {name} grad")
    return _counts(t)


@pytest.mark.parametrize("world", [2, 4])
def test_seed_mlp_col_row_vs_row_col(world):
    col_row = run(world, _seed_mlp, "col->row")[0]
    row_col = run(world, _seed_mlp, "row->col")[0]
    assert col_row == {("forward", "all_reduce"): 1}        # x needs no grad: no backward f
    fwd = {k: v for k, v in row_col.items() if k[0] == "forward"}
    assert sum(fwd.values()) == 2, row_col                   # g1 (before GELU) and the gather
    assert fwd == {("forward", "all_reduce"): 1, ("forward", "all_gather"): 1}


def _errors(rank):
    pg = st.ProcessGroup()
    a = ST.from_global(torch.randn(4, 4), pg, st.ShardSpec(0, 2))
    out = {}
    try:
        torch.mm(a, torch.randn(4, 4), out=torch.empty(4, 4))
    except st.UnsupportedOpError as e:
        out["out"] = str(e)
    try:
        torch.einsum("ii,ij->j", a, torch.randn(4, 4))
    except st.UnsupportedOpError as e:
        out["diag"] = str(e)
    return out


def test_unsupported_arguments_raise_clearly():
    out = run(2, _errors)[0]
    assert "out=" in out["out"] and "torch.mm" in out["out"]
    assert "repeated labels" in out["diag"]


def _column_no_bias_repeated(rank):
    """Llama's q/k/v (column parallel, no bias) over two steps: the second step takes the
    weight's cached column path; values, gradients and communication equal the first's."""
    pg = st.ProcessGroup()
    d = pg.tp_world_size()
    torch.manual_seed(3)
    ws = [torch.randn(4 * d + 1, 6, dtype=torch.float64) for _ in range(3)]   # uneven at d > 1
    params = [ST.from_global(w.clone(), pg, st.ShardSpec(0, d)).requires_grad_() for w in ws]
    refs = [w.clone().requires_grad_() for w in ws]
    counts = []
    for step in range(2):
        x = torch.randn(2, 5, 6, dtype=torch.float64)
        xs = ST.from_global(x.clone(), pg, st.ReplicaSpec()).requires_grad_()
        xr = x.clone().requires_grad_()
        with st.CommTrace() as t:
            h = xs * 1.0                  # an activation (the f is shared on non-leaves only)
            outs = [F.linear(h, p) for p in params]
            loss = sum((o.full() * (i + 1)).sum() for i, o in enumerate(outs))
            loss.backward()
        counts.append({k: v for k, v in _counts(t).items() if k[0] == "backward"})
        ref = sum((F.linear(xr, r) * (i + 1)).sum() for i, r in enumerate(refs))
        ref.backward()
        for o in outs:
            assert o.spec == st.ShardSpec(2, d), o.spec
        assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-10, what=f"step {step} x grad")
        for p, r in zip(params, refs):
            assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-10, what=f"step {step} w grad")
    assert all(p._col is not None for p in params)
    return counts


@pytest.mark.parametrize("world", WORLDS)
def test_column_parallel_without_bias_repeated_steps(world):
    first, second = run(world, _column_no_bias_repeated)[0]
    assert first == second
    if world > 1:   # one f for q, k and v together (the shared input's gradient)
        assert first.get(("backward", "all_reduce")) == 1, first
