"""The fast paths a decode step takes (ops/join.py, view.py, reduction.py, attention.py,
embedding.py), each against serial torch at worlds 1, 2, 4: basic indexing that leaves the
sharded dim whole, cat of one layout off the sharded dim, a one-dim sum/mean, cached reshape
and transpose plans, contiguous returning itself, sdpa of one head-sharded layout (GQA, plain
mask), argmax over a vocab-sharded dim, and the vocab-parallel lookup with a padding row. None
of them communicates."""
import pytest
import torch
import torch.nn.functional as F

import shardtensor as st
from shardtensor.testing import run
from strategies import SDPA_GQA, WORLDS
from test_view import check_op

EXACT = dict(rtol=1e-10, atol=1e-12)


def _items(rank, shape, spec, cases):
    out = []
    for fn in cases:
        specs, comm = check_op(rank, shape, spec, fn, 0)
        out.append((specs, comm))
    return out


_GETITEMS = [
    lambda x: x[..., :3],
    lambda x: x[..., 3:],
    lambda x: x[:, :, -1],
    lambda x: x[:, None],
    lambda x: x[None, ..., 1:2],
    lambda x: x[0],
    lambda x: x[:, :],
    lambda x: x[..., None, :],
    lambda x: x[:, :, :, 1],
]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dim", [1, 3, 0, None])
def test_basic_indexing_fast_path_matches_serial_without_communication(world, dim):
    spec = st.ReplicaSpec() if dim is None else st.ShardSpec(dim, world)
    cases = _GETITEMS
    if spec.is_shard and spec.dim == 3:     # slicing the sharded dim itself: the general rule
        cases = [c for c in cases if c not in (_GETITEMS[0], _GETITEMS[1], _GETITEMS[4],
                                               _GETITEMS[8])]
    if spec.is_shard and spec.dim == 0:     # an int on the sharded dim: the general rule
        cases = [c for c in cases if c is not _GETITEMS[5]]
    for specs, comm in run(world, _items, (2, 4, 3, 6), spec, cases)[0]:
        assert comm == [], comm


def _cat_case(rank, world):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 5, 6, dtype=torch.float64), torch.randn(1, 4, 2, 6, dtype=torch.float64)
    heads = st.ShardSpec(1, world)
    sa, sb = (st.ShardedTensor.from_global(t, pg, heads) for t in (a, b))
    # (from_local with shape= checks every rank's local shape: one all-gather, outside the trace)
    pa = st.ShardedTensor.from_local(a * (rank + 1.0), pg, st.PartialSpec(), shape=a.shape)
    with st.CommTrace() as tr:
        kv = torch.cat([sa, sb], dim=-2)                 # a KV cache append
        rope = torch.cat((-sa, sa), -1)                  # rotate_half
        three = torch.cat([sa, sa, sa], 2)
        part = torch.cat([pa, pa], dim=3)                # partial summands concatenate
    assert tr.count() == 0
    assert kv.spec == heads and rope.spec == heads and three.spec == heads
    assert part.spec.is_partial
    s = sum(range(1, world + 1))
    torch.testing.assert_close(kv.full(), torch.cat([a, b], -2), **EXACT)
    torch.testing.assert_close(rope.full(), torch.cat((-a, a), -1), **EXACT)
    torch.testing.assert_close(three.full(), torch.cat([a, a, a], 2), **EXACT)
    torch.testing.assert_close(part.full(), torch.cat([a * s, a * s], 3), **EXACT)
    # different layouts or the sharded dim itself still go through the general rule
    mixed = torch.cat([sa, a], dim=-2)
    torch.testing.assert_close(mixed.full(), torch.cat([a, a], -2), **EXACT)
    along = torch.cat([sa, sa], dim=1)
    torch.testing.assert_close(along.full(), torch.cat([a, a], 1), **EXACT)
    return True


@pytest.mark.parametrize("world", WORLDS)
def test_cat_of_one_layout_is_local(world):
    assert all(run(world, _cat_case, world))


_REDUCE = [
    lambda x: x.mean(-1, keepdim=True),
    lambda x: x.mean(0),
    lambda x: x.sum(2),
    lambda x: x.sum(-2, keepdim=True),
    lambda x: torch.mean(x, 1),
    lambda x: x.pow(2).mean(-1, keepdim=True),
]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_one_dim_sum_mean_fast_path_matches_serial(world, dim):
    # over the sharded dim too (then partial: the general rule), forward and gradient
    run(world, _items, (4, 6, 5), st.ShardSpec(dim, world), _REDUCE)


def _partial_mean(rank, world):
    pg = st.ProcessGroup()
    a = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    p = st.ShardedTensor.from_local(a * (rank + 1.0), pg, st.PartialSpec(), shape=a.shape)
    m = p.mean(-1, keepdim=True)
    assert m.spec.is_partial        # linear: stays a pending sum
    s = sum(range(1, world + 1))
    torch.testing.assert_close(m.full(), (a * s).mean(-1, keepdim=True), **EXACT)
    return True


@pytest.mark.parametrize("world", WORLDS)
def test_mean_of_a_partial_value_stays_partial(world):
    assert all(run(world, _partial_mean, world))


_VIEWS = [
    lambda x: x.view(2, 3, 4, 4).transpose(1, 2).reshape(2, 4, 12),   # heads split / merge
    lambda x: x.view(2, 3, 4, 4).transpose(1, 2).contiguous().view(2, 4, 12),
    lambda x: x.reshape(2, 3, -1, 4).transpose(1, 2).transpose(1, 2).reshape(2, 3, 16),
    lambda x: x.transpose(0, 2).transpose(-1, 0),
]


@pytest.mark.parametrize("world", WORLDS)
def test_cached_reshape_and_transpose_plans_match_serial(world):
    # the same reshapes twice: the second call reads the cached plan
    run(world, _items, (2, 3, 16), st.ShardSpec(2, world), _VIEWS + _VIEWS)
    run(world, _items, (2, 3, 16), st.ReplicaSpec(), _VIEWS)


def _contiguous_self(rank):
    pg = st.ProcessGroup()
    x = st.ShardedTensor.from_global(torch.randn(2, 8), pg, st.ShardSpec(1, pg.tp_world_size()))
    x = x.contiguous()                  # (a column shard of `full` is a strided view: copied)
    assert x.to_local().is_contiguous() and x.contiguous() is x
    y = x.t().contiguous()
    assert y is not x and y.to_local().is_contiguous()
    torch.testing.assert_close(y.full(), x.full().t())
    return True


@pytest.mark.parametrize("world", WORLDS)
def test_contiguous_returns_the_tensor_when_its_shard_is_contiguous(world):
    assert all(run(world, _contiguous_self))


def _sdpa(rank, world, hq, hkv, masked, causal):
    pg = st.ProcessGroup()
    torch.manual_seed(1)
    b, s, t, d = 2, 3, 5, 4
    q = torch.randn(b, hq, s, d, dtype=torch.float64)
    k = torch.randn(b, hkv, t, d, dtype=torch.float64)
    v = torch.randn(b, hkv, t, d, dtype=torch.float64)
    mask = torch.randn(b, 1, s, t, dtype=torch.float64) if masked else None
    kw = dict(attn_mask=mask, dropout_p=0.0, scale=0.3, is_causal=causal)
    if hq != hkv:
        kw["enable_gqa"] = True
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    heads = st.ShardSpec(1, world)
    sq, sk, sv = (st.ShardedTensor.from_global(x, pg, heads) for x in (q, k, v))
    with st.CommTrace() as tr:
        out = F.scaled_dot_product_attention(sq, sk, sv, **kw)
    assert tr.count() == 0
    assert out.spec == heads
    torch.testing.assert_close(out.full(), ref, **EXACT)
    return True


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("hq,hkv", [(4, 4)] + ([(8, 4)] if SDPA_GQA else []))
@pytest.mark.parametrize("masked,causal", [(False, False), (True, False), (False, True)])
def test_sdpa_of_one_head_layout_is_local(world, hq, hkv, masked, causal):
    assert all(run(world, _sdpa, world, hq, hkv, masked, causal))


def _argmax(rank, world):
    pg = st.ProcessGroup()
    torch.manual_seed(2)
    logits = torch.randn(3, 2, 61, dtype=torch.float64)
    logits[0, 0, 7] = logits[0, 0, 40] = 50.0          # a tie across shards: the first wins
    x = st.ShardedTensor.from_global(logits, pg, st.ShardSpec(2, world))
    out = []
    for keep in (False, True):
        i = torch.argmax(x[:, -1], -1, keepdim=keep)
        assert i.spec.is_replicate
        torch.testing.assert_close(i.full(), torch.argmax(logits[:, -1], -1, keepdim=keep))
        j = x.argmin(2)
        torch.testing.assert_close(j.full(), logits.argmin(2))
        m = x.max(-1, keepdim=keep)
        torch.testing.assert_close(m.values.full(), logits.max(-1, keepdim=keep).values)
        torch.testing.assert_close(m.indices.full(), logits.max(-1, keepdim=keep).indices)
        out.append(torch.equal(x.argmax().full(), logits.argmax()))
    strided = st.ShardedTensor.from_global(logits[..., :60], pg, st.ShardSpec(2, world, 3))
    torch.testing.assert_close(strided.argmax(-1).full(), logits[..., :60].argmax(-1))
    return all(out)


@pytest.mark.parametrize("world", WORLDS)
def test_argmax_over_the_vocab_shards_matches_serial(world):
    assert all(run(world, _argmax, world))


def _lookup(rank, world, pad):
    pg = st.ProcessGroup()
    torch.manual_seed(3)
    table = torch.randn(61, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 5, 60, 30, 31], [16, 15, 0, 45, 46]])
    ref = F.embedding(ids, table, padding_idx=pad)
    from shardtensor.spec import take_shard
    spec = st.ShardSpec(0, world)
    leaf = take_shard(table.detach(), spec, rank).clone().requires_grad_()
    w = st.ShardedTensor.from_local(leaf, pg, spec, shape=table.shape)
    out = F.embedding(ids, w, padding_idx=pad)
    assert out.spec.is_partial
    torch.testing.assert_close(out.full(), ref, **EXACT)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (ref * g).sum().backward()
    (out.full() * g).sum().backward()
    torch.testing.assert_close(leaf.grad, take_shard(table.grad, spec, rank), **EXACT)
    return True


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("pad", [None, 0, 31, -1])
def test_vocab_parallel_lookup_with_padding_row(world, pad):
    assert all(run(world, _lookup, world, pad))
