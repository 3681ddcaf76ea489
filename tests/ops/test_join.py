"""Slicing and joining rules (ops/join.py) against serial torch, forward and input gradients:
narrow/select/split/chunk/tensor_split/unbind, indexing and index assignment, cat/stack; the
fused q|k|v cases never communicate."""
import pytest
import torch
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs
from test_view import check_op


class Op:
    def __init__(self, name, *a):
        self.name, self.a = name, a

    def __call__(self, x):
        return getattr(self, "_" + self.name)(x, *self.a)

    def __repr__(self):
        return f"Op({self.name}, {self.a})"

    _narrow = staticmethod(lambda x, d, a, l: x.narrow(d, a, l))
    _select = staticmethod(lambda x, d, i: x.select(d, i))
    _split = staticmethod(lambda x, s, d: x.split(s, d))
    _torch_split = staticmethod(lambda x, s, d: torch.split(x, s, d))
    _chunk = staticmethod(lambda x, c, d: x.chunk(c, d))
    _tensor_split = staticmethod(lambda x, s, d: x.tensor_split(s, d))
    _unbind = staticmethod(lambda x, d: x.unbind(d))
    _getitem = staticmethod(lambda x, idx: x[idx])

    @staticmethod
    def _setitem(x, idx, vshape, seed):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(vshape, dtype=torch.float64, generator=g)
        y = x * 1.0 if not isinstance(x, st.ShardedTensor) else _copy(x)
        y[idx] = v
        return y

    @staticmethod
    def _cat(x, d, other_spec, seed, stack):
        g = torch.Generator().manual_seed(seed)
        other = torch.randn(x.shape, dtype=torch.float64, generator=g)
        if isinstance(x, st.ShardedTensor) and other_spec is not None:
            other = st.ShardedTensor.from_global(other, x.pg, other_spec)
        return torch.stack([x, other, x], d) if stack else torch.cat([x, other, x], d)


def _copy(x):
    """A non-leaf copy of a ShardedTensor built without elementwise rules (nor from_local's
    all-gather of the local shapes: x's own shard fits)."""
    return st.ShardedTensor.from_local(x.to_local() * 1.0, x.pg, x.spec, shape=x.shape,
                                       run_check=False)


@hs.composite
def index_items(draw, shape):
    items, k = [], draw(hs.integers(0, 3))   # index tensors broadcast: one length
    for n in shape:
        kind = draw(hs.sampled_from(["all", "slice", "step", "int", "tensor", "list", "none"]))
        if kind == "none":
            items.append(None)
            kind = "all"
        if kind == "all":
            items.append(slice(None))
        elif kind == "slice":
            a = draw(hs.integers(-n, n))
            items.append(slice(a, draw(hs.one_of(hs.none(), hs.integers(-n, n)))))
        elif kind == "step":
            items.append(slice(None, None, draw(hs.integers(2, 3))))
        elif kind == "int":
            items.append(draw(hs.integers(-n, n - 1)))
        else:   # a list as torch reads it: `scores[i, banned_ids] = -inf`, [] included
            ids = draw(hs.lists(hs.integers(0, n - 1), min_size=k, max_size=k))
            items.append(ids if kind == "list" else torch.tensor(ids, dtype=torch.long))
    if draw(hs.booleans()):   # an Ellipsis standing for one full dim
        full = [k for k, v in enumerate(items) if v == slice(None)]
        if full:
            items[draw(hs.sampled_from(full))] = Ellipsis
    elif draw(hs.booleans()):   # trailing full dims left out
        while items and items[-1] == slice(None):
            items.pop()
    return tuple(items)


@hs.composite
def join_ops(draw, shape):
    nd = len(shape)
    d = draw(hs.integers(-nd, nd - 1))
    n = shape[d]
    kind = draw(hs.sampled_from(["narrow", "select", "split", "torch_split", "chunk",
                                 "tensor_split", "unbind", "getitem", "setitem", "cat", "stack"]))
    if kind == "narrow":
        a = draw(hs.integers(0, n))
        return Op(kind, d, a, draw(hs.integers(0, n - a)))
    if kind == "select":
        return Op(kind, d, draw(hs.integers(-n, n - 1)))
    if kind in ("split", "torch_split"):
        how = draw(hs.one_of(hs.integers(1, n), hs.lists(hs.integers(0, n), max_size=3)
                             .filter(lambda v: sum(v) <= n).map(lambda v: v + [n - sum(v)])))
        return Op(kind, how, d)
    if kind == "chunk":
        return Op(kind, draw(hs.integers(1, n + 1)), d)
    if kind == "tensor_split":
        how = draw(hs.one_of(hs.integers(1, n + 1), hs.lists(hs.integers(-n, n), max_size=3)))
        return Op(kind, how, d)
    if kind == "unbind":
        return Op(kind, d)
    if kind == "getitem":
        return Op(kind, draw(index_items(shape)))
    if kind == "setitem":
        idx = tuple(v for v in draw(index_items(shape)) if v is not None)
        vshape = torch.empty(shape)[idx].shape
        if draw(hs.booleans()) and len(vshape):   # a value that broadcasts
            vshape = torch.Size([1] * draw(hs.integers(0, 1)) + [1] + list(vshape[1:]))
        return Op(kind, idx, tuple(vshape), draw(hs.integers(0, 99)))
    other = draw(hs.sampled_from([None, "same", "replica"]))
    return Op("cat", d, other, draw(hs.integers(0, 99)), kind == "stack")


def _check_join(rank, shape, spec, op, seed):
    if op.name == "cat" and op.a[1] is not None:
        other = spec if op.a[1] == "same" else st.ReplicaSpec()
        op = Op("cat", op.a[0], other, *op.a[2:])
    return check_op(rank, shape, spec, op, seed)


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_slicing_and_joining_match_serial(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=7))
    spec = data.draw(specs(shape, world))
    op = data.draw(join_ops(shape))
    _, kinds = run(world, _check_join, shape, spec, op, data.draw(hs.integers(0, 2**16)))[0]
    nspec = spec.normalize(shape)
    if not nspec.is_shard and op.name != "cat":
        assert kinds == [], (op, kinds)
    if nspec.is_shard and op.name in ("narrow", "split", "chunk", "getitem", "select"):
        d = op.a[0] if op.name in ("narrow", "select") else op.a[-1]
        if op.name != "getitem" and d % len(shape) != nspec.dim:
            assert kinds == [], (op, kinds)     # slicing another dim is local


# Python lists on the sharded dim, [] included (transformers 4.x's no-repeat-ngram processor
# writes `scores[i, banned_tokens] = -inf` with an empty list first): [] was read as a float
# tensor, IndexError where torch reads an empty integer index
LIST_INDICES = [("getitem", ((slice(None), []),)), ("getitem", ((0, []),)),
                ("getitem", (([], slice(None)),)), ("getitem", ((1, [6, 0, 6]),)),
                ("setitem", ((0, []), (0,), 1)), ("setitem", ((slice(None), []), (3, 0), 2)),
                ("setitem", ((slice(None), [1, 5, 6]), (3, 3), 3))]


@pytest.mark.parametrize("world", WORLDS)
def test_list_indices_on_the_sharded_dim_match_serial(world):
    for dim in (0, 1):
        for name, args in LIST_INDICES:
            run(world, check_op, (3, 7), st.ShardSpec(dim, world), Op(name, *args), 0)


# --- fused q|k|v -------------------------------------------------------------------------------

def _qkv(rank, hidden, how):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 3 * hidden, dtype=torch.float64, requires_grad=True)
    t = st.ShardedTensor.from_global(x, pg, st.ShardSpec(-1, n, stride=3))
    with st.CommTrace() as trace:
        if how == "split":
            parts = t.split(hidden, dim=-1)
        elif how == "chunk":
            parts = t.chunk(3, dim=-1)
        elif how == "slices":
            parts = [t[..., :hidden], t[:, :, hidden:2 * hidden], t[..., 2 * hidden:]]
        else:
            parts = torch.tensor_split(t, 3, dim=2)
        again = torch.cat(parts, dim=-1)
    for p, r in zip(parts, x.split(hidden, dim=-1)):
        torch.testing.assert_close(p.full(), r)
    torch.testing.assert_close(again.full(), x)
    return [p.spec for p in parts], again.spec, len(trace.events)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("how", ["split", "chunk", "slices", "tensor_split"])
def test_strided_qkv_splits_into_three_plain_shards_without_communication(world, how):
    for hidden in (4, 5):   # 5: uneven heads-free hidden, still local
        pspecs, cspec, nev = run(world, _qkv, hidden, how)[0]
        assert pspecs == [st.ShardSpec(2, world)] * 3
        assert cspec == st.ShardSpec(2, world, stride=3)
        assert nev == 0


def _index_no_comm(rank):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    x = torch.arange(4 * 5 * 6.0).reshape(4, 5, 6)
    t = st.ShardedTensor.from_global(x, pg, st.ShardSpec(2, n))
    idx = torch.tensor([3, 0, 3])
    with st.CommTrace() as trace:
        outs = [t[1], t[:, None, 2:], t[idx], t[..., None], t[idx, :, :][:, [1, 2]], t[:, -1],
                t[None, 1:3, ..., :]]
    refs = [x[1], x[:, None, 2:], x[idx], x[..., None], x[idx, :, :][:, [1, 2]], x[:, -1],
            x[None, 1:3, ..., :]]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.full(), r)
    # an int on the sharded dim: a partial value, still no communication
    with st.CommTrace() as t2:
        last = t[..., -1]
    torch.testing.assert_close(last.full(), x[..., -1])
    return len(trace.events) + len(t2.events), [o.spec for o in outs], last.spec


@pytest.mark.parametrize("world", WORLDS)
def test_indexing_off_the_sharded_dim_is_local(world):
    nev, ospecs, last = run(world, _index_no_comm)[0]
    assert nev == 0
    assert ospecs[0] == st.ShardSpec(1, world) and ospecs[3] == st.ShardSpec(2, world)
    assert ospecs[2] == st.ShardSpec(2, world) and ospecs[6] == st.ShardSpec(3, world)
    # at tp 1 the shard is the whole tensor: serial's view of it, replicated
    assert last == (st.PartialSpec() if world > 1 else st.ReplicaSpec())


def _stack_norms(rank):
    """clip_grad_norm_'s pattern: stack 0-dim norms of sharded and plain tensors."""
    pg = st.ProcessGroup()
    torch.manual_seed(4)
    a, b = torch.randn(5, 3), torch.randn(4)
    ta = st.ShardedTensor.from_global(a, pg, st.ShardSpec(0, pg.tp_world_size()))
    norms = [torch.linalg.vector_norm(ta), torch.linalg.vector_norm(b)]
    total = torch.linalg.vector_norm(torch.stack(norms))
    ref = torch.linalg.vector_norm(torch.stack([a.norm(), b.norm()]))
    torch.testing.assert_close(total.full(), ref)
    return total.spec


def test_stack_of_norms_is_replicated():
    assert run(2, _stack_norms)[0] == st.ReplicaSpec()


# --- writing through basic-indexing results that the shards cannot present as views ------------

_WRITES = {
    "add_": lambda v: v.add_(1.5),
    "mul_": lambda v: v.mul_(-2.0),
    "fill_": lambda v: v.fill_(3.0),
    "iadd": lambda v: v.__iadd__(0.5),
    "setitem": lambda v: v.__setitem__(..., 4.0),
}


def _write_through(rank, shape, spec, idx, write, seed):
    """x[idx].<write> on serial and sharded x (both non-leaves with history): x's values and
    the gradient reaching the leaf; also the Python form x[idx] += 1."""
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    leaf = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape, dtype=torch.float64)
    sleaf = st.ShardedTensor.from_global(leaf, pg, spec)
    res = []
    for form in ("method", "python"):
        vals, grads = [], []
        for x in (leaf * 2, sleaf * 2):
            if form == "method":
                _WRITES[write](x[idx])
            else:
                x[idx] += 1
            full = x.full() if isinstance(x, st.ShardedTensor) else x
            (full * w).sum().backward()
            vals.append(full.detach())
            grads.append(leaf.grad.clone())
            leaf.grad = None
        res.append(((vals[0] - vals[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item()))
    return res


@hs.composite
def _basic_index(draw, shape, dim):
    """A basic index addressing `dim` with a slice (any start/stop/step > 0) or an int."""
    n = shape[dim]
    if draw(hs.booleans()):
        it = draw(hs.integers(-n, n - 1))
    else:
        it = slice(draw(hs.integers(-n, n)), draw(hs.one_of(hs.none(), hs.integers(-n, n))),
                   draw(hs.integers(1, 3)))
    lead = tuple(slice(None) for _ in range(dim))
    return lead + (it,)


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_writes_into_indexed_results_reach_the_tensor(world, data):
    """Serial x[idx] (basic indexing) is a view: writing into it writes into x. Where the shards
    cannot present it as a view (a step, an int, or a slice not falling on shard boundaries on
    the sharded dim) the result is a copy that writes back; before, such writes were silently
    lost (x unchanged) or crashed in autograd (a view of a collective's output)."""
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=9), "shape")
    dim = data.draw(hs.integers(0, len(shape) - 1), "dim")
    stride = data.draw(hs.sampled_from([s for s in (1, 2, 3) if shape[dim] % s == 0]), "stride")
    spec = st.ShardSpec(dim, world, stride)
    idx = data.draw(_basic_index(shape, dim), "idx")
    write = data.draw(hs.sampled_from(sorted(_WRITES)), "write")
    for res in run(world, _write_through, shape, spec, idx, write, data.draw(hs.integers(0, 99))):
        for val_err, grad_err in res:
            assert val_err < 1e-12 and grad_err < 1e-12, (res, idx, spec)


# --- writes a decode loop makes: into plain tensors, through masks laid out like the target -------

def _plain_targets(rank, world):
    """A plain tensor is a replicated value: a replicated or partial ShardedTensor written into
    it (or a value written at a replicated ShardedTensor index) is serial's write on every rank,
    gradient included; a sharded value is still refused, the target unchanged."""
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, generator=g)
    x = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 4, dtype=torch.float64, generator=g)
    sl = st.ShardedTensor.from_global(logits, pg, st.ShardSpec(2, world))
    rep = st.ShardedTensor.from_global(x, pg, st.ReplicaSpec()) * 2
    part = st.ShardedTensor.from_global(x.detach() * 3, pg, st.PartialSpec())
    at = st.ShardedTensor.from_global(torch.tensor([1, 3]), pg, st.ReplicaSpec())
    tokens, ref_tokens = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    buf, ref = torch.zeros(3, 2, 4, dtype=torch.float64), torch.zeros(3, 2, 4, dtype=torch.float64)
    with st.CommTrace() as trace:
        tokens[:, 2] = torch.argmax(sl[:, -1], dim=-1)   # llama: tokens[:, cur_pos] = next_token
        buf[0] = rep
        buf[1, :, 1:] = part[:, 1:]
        buf[2, :, at] = 7.0
    ref_tokens[:, 2] = logits[:, -1].argmax(-1)
    ref[0] = x * 2
    ref[1, :, 1:] = x.detach()[:, 1:] * 3
    ref[2, :, [1, 3]] = 7.0
    assert type(buf) is torch.Tensor and type(tokens) is torch.Tensor
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(buf.detach(), ref.detach(), rtol=0, atol=0)
    (buf * w).sum().backward()
    torch.testing.assert_close(x.grad, w[0] * 2, rtol=0, atol=0)
    kinds = [e.kind for e in trace.events]   # argmax's pair and the partial's reduction only
    if world > 1:   # (at tp 1 a shard is the whole tensor: serial's write)
        before = buf.detach().clone()
        # the error names the layout the buffer would need (a KV cache's annotation)
        need = r"__setitem__.*ShardSpec.*\.full\(\).*from_global\(buf, pg, ShardSpec\(2, "
        with pytest.raises(st.UnsupportedOpError, match=need):
            buf[0, :, :3] = sl[:, 0, :3]
        assert torch.equal(buf.detach(), before)
    return kinds


@pytest.mark.parametrize("world", WORLDS)
def test_replicated_values_write_into_plain_tensors(world):
    # writing a replicated ShardedTensor (llama's `tokens[:, cur_pos] = next_token`, the argmax
    # of vocab-sharded logits) into a plain tensor raised UnsupportedOpError like a shard did
    kinds = run(world, _plain_targets, world)[0]
    assert kinds == ([] if world == 1 else ["all_reduce"] * 3), kinds


def _mask_writes(rank, world, spec, value):
    """x[mask] = value with a bool mask laid out like x (nanoGPT's top-k:
    `logits[logits < v[:, [-1]]] = -inf` on vocab-sharded logits): serial's values and
    gradient, and no collective for the write."""
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 3, 13, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 3, 13, dtype=torch.float64, generator=g)
    ref = full * 1.0
    leaf = full.detach().clone().requires_grad_()
    y = st.ShardedTensor.from_global(leaf, pg, spec) * 1.0
    kth = torch.topk(full.detach(), 4).values[..., [-1]]
    mask = y < (st.ShardedTensor.from_global(kth, pg, st.ReplicaSpec()) if value == "st" else kth)
    v = {"inf": -float("inf"), "num": 2.5, "st": st.ShardedTensor.from_global(
        torch.tensor(-1.0, dtype=torch.float64), pg, st.ReplicaSpec()),
         "tensor": torch.tensor(0.5, dtype=torch.float64)}[value]
    with st.CommTrace() as trace:
        y[mask] = v
    ref[ref < kth] = v.to_local() if value == "st" else v
    torch.testing.assert_close(y.full(), ref.detach(), rtol=0, atol=0)
    y = y.masked_fill(y == -float("inf"), 0.0)
    ref = ref.masked_fill(ref == -float("inf"), 0.0)
    (y.full() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(leaf.grad, full.grad, rtol=0, atol=0)
    return y.spec, len(trace.events)


def _mask_write_cases(rank, world):
    return [(dim, stride, value, _mask_writes(rank, world, st.ShardSpec(dim, world, stride), value))
            for dim, stride in ((2, 1), (1, 1), (2, 13))
            for value in ("inf", "num", "st", "tensor")]


@pytest.mark.parametrize("world", WORLDS)
def test_mask_writes_with_the_targets_layout_are_local(world):
    # the mask was gathered (an all-gather of batch x vocab bools per decode step) and the
    # write done through its nonzero indices
    for dim, stride, value, (spec, nev) in run(world, _mask_write_cases, world)[0]:
        assert nev == 0, (dim, stride, value, nev)


def _value_grads(rank, world):
    """x[mask] = v and x[:, ids] = v on a tensor sharded on the written dim, v read by every
    rank (replicated ShardedTensor or plain, requiring grad): v's gradient is serial's."""
    pg = st.ProcessGroup()
    out = []
    for dim, stride in ((1, 1), (1, 3), (0, 1)):
        for how in ("mask", "ids"):
            for kind in ("st", "plain"):
                g = torch.Generator().manual_seed(7)
                full = torch.randn(6, 12, dtype=torch.float64, generator=g)
                w = torch.randn(6, 12, dtype=torch.float64, generator=g)
                v0 = torch.randn((6, 1) if how == "ids" else (), dtype=torch.float64,
                                 generator=g).requires_grad_()
                v1 = v0.detach().clone().requires_grad_()
                ids = torch.tensor([1, 5, 10])
                ref, y = full * 1.0, st.ShardedTensor.from_global(
                    full, pg, st.ShardSpec(dim, world, stride)) * 1.0
                vv = (st.ShardedTensor.from_global(v1, pg, st.ReplicaSpec())
                      if kind == "st" else v1) * 2
                if how == "mask":
                    ref[ref > 0] = v0 * 2
                    y[y > 0] = vv
                else:
                    ref[:, ids] = v0 * 2
                    y[:, ids] = vv
                (ref * w).sum().backward()
                (y.full() * w).sum().backward()
                torch.testing.assert_close(y.full(), ref.detach(), rtol=0, atol=0)
                torch.testing.assert_close(v1.grad, v0.grad, rtol=1e-12, atol=1e-12)
                out.append((dim, stride, how, kind))
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_written_values_get_every_ranks_gradient(world):
    # a value written at entries spread over the ranks (a local mask write, an index write on
    # the sharded dim) got only this rank's entries' gradient: each rank a different one
    assert len(run(world, _value_grads, world)[0]) == 12
