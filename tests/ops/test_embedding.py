"""F.embedding rules (ops/embedding.py): vocab-parallel (dim 0) -> PartialSpec, hidden-parallel
(dim 1) -> sharded last dim, replicated table -> the ids' layout. Forward, the table's gradient
and max_norm's in-place renorm equal serial for random sizes, strides, uneven and empty shards."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs
from torch import nn

import shardtensor as st
from shardtensor.testing import assert_close, run
from strategies import WORLDS, shard_specs

ST = st.ShardedTensor


def _lookup(rank, V, H, ishape, wlayout, ilayout, kw, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    full = torch.randn(V, H, dtype=torch.float64)
    ids = torch.randint(0, V, ishape)
    ref_w = full.clone().requires_grad_()
    mine = full.clone().requires_grad_()
    w = mine if wlayout is None else ST.from_global(mine, pg, wlayout)
    i = ids if ilayout is None else ST.from_global(ids, pg, ilayout)
    expect = F.embedding(ids, ref_w, **kw)
    with st.CommTrace() as t:
        out = F.embedding(i, w, **kw)
    kinds = [e.kind for e in t.events]
    assert isinstance(out, ST) and out.shape == expect.shape
    got = out.full()
    assert_close(got, expect, rtol=1e-12, atol=1e-12, what="embedding forward")
    r = torch.randn(expect.shape, dtype=torch.float64)
    (expect * r).sum().backward()
    (got * r).sum().backward()
    assert_close(mine.grad, ref_w.grad, rtol=1e-12, atol=1e-12, what="table grad")
    if kw.get("max_norm") is not None and wlayout is not None:
        assert_close(w.full(), ref_w, rtol=1e-12, atol=1e-12, what="renormed table")
    return out.spec, kinds


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_embedding_any_layout(world, data):
    V, H = data.draw(hs.integers(1, 12), "V"), data.draw(hs.integers(1, 6), "H")
    ishape = tuple(data.draw(hs.lists(hs.integers(1, 5), min_size=1, max_size=2), "ids"))
    wlayout = data.draw(hs.one_of(hs.none(), hs.just(st.ReplicaSpec()),
                                  shard_specs((V, H), world)), "table")
    ilayout = data.draw(hs.one_of(hs.none(), hs.just(st.ReplicaSpec()),
                                  shard_specs(ishape, world, allow_stride=False)), "ids layout")
    if wlayout is None and ilayout is None:
        ilayout = st.ReplicaSpec()
    kw = {}
    if data.draw(hs.booleans(), "padding"):
        kw["padding_idx"] = data.draw(hs.integers(-V, V - 1))
    if data.draw(hs.booleans(), "freq"):
        kw["scale_grad_by_freq"] = True
    hidden = wlayout is not None and wlayout.is_shard and wlayout.normalize((V, H)).dim == 1
    if data.draw(hs.booleans(), "max_norm") and not hidden:
        kw["max_norm"], kw["norm_type"] = 1.0, data.draw(hs.sampled_from([1.0, 2.0]))
    spec, kinds = run(world, _lookup, V, H, ishape, wlayout, ilayout, kw,
                      data.draw(hs.integers(0, 2**16)))[0]
    ids_replicated = ilayout is None or ilayout.is_replicate
    if wlayout is not None and wlayout.is_shard:
        assert spec == (st.ShardSpec(len(ishape), world, wlayout.stride) if hidden
                        else st.PartialSpec())
        if ids_replicated:
            assert kinds == []                  # both table layouts look up without talking


def _layers(rank):
    """nn.Embedding annotated both ways; CommTrace over forward and backward."""
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    out = {}
    for name, split in (("vocab", st.split_row), ("hidden", st.split_col)):
        ref, emb = nn.Embedding(11, 6, padding_idx=3), nn.Embedding(11, 6, padding_idx=3)
        emb.load_state_dict(ref.state_dict())
        split(emb.weight, pg)
        ids = torch.tensor([[3, 0, 10, 5], [7, 3, 1, 9]])
        with st.CommTrace() as t:
            y = emb(ids)
            full = y.full()
            full.pow(2).sum().backward()
        ref(ids).pow(2).sum().backward()
        assert_close(full, ref(ids), what=name)
        assert_close(emb.weight.grad, ref.weight.grad, what=f"{name} grad")
        assert emb.weight.grad.spec == emb.weight.spec
        out[name] = (y.spec, [(e.phase, e.kind) for e in t.events])
    # max_norm needs whole rows: a hidden-sharded table refuses it clearly
    w = ST.from_global(torch.randn(11, 6), pg, st.ShardSpec(1, pg.tp_world_size()))
    try:
        F.embedding(torch.tensor([1, 2]), w, max_norm=1.0)
    except st.UnsupportedOpError as e:
        out["max_norm"] = str(e)
    return out


def test_vocab_and_hidden_parallel_layers():
    out = run(4, _layers)[0]          # 11 rows over 4 ranks: uneven
    # vocab parallel: a PartialSpec, reduced once when the value is needed, nothing backward
    assert out["vocab"] == (st.PartialSpec(), [("forward", "all_reduce")])
    # hidden parallel: sharded on the last dim; .full() is the only collective
    assert out["hidden"] == (st.ShardSpec(2, 4), [("forward", "all_gather")])
    assert "max_norm" in out["max_norm"] and "hidden" in out["max_norm"]
