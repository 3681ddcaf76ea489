"""F.scaled_dot_product_attention (ops/attention.py) against serial torch: q, k, v sharded on
heads (uneven, strided, GQA) or batch, replicated, with masks, causal, scale; gradients of q, k,
v; no collective where heads align; per-rank dropout streams."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import SDPA_GQA, WORLDS


def _sdpa(rank, b, hq, hkv, l, s, d, layout, mask_kind, causal, scale, seed):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(seed)
    q = torch.randn(b, hq, l, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, s, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, s, d + 1, dtype=torch.float64, requires_grad=True)
    mask = {"none": None, "bool": torch.rand(l, s) > 0.3,
            "heads": torch.randn(b, hq, l, s, dtype=torch.float64),
            "batch": torch.randn(b, 1, l, s, dtype=torch.float64)}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[:, 0] = True                      # no fully masked row
    kw = dict(attn_mask=mask, is_causal=causal, scale=scale)
    if hq != hkv:
        kw["enable_gqa"] = True
    if causal:
        kw["attn_mask"] = None
    if layout == "heads":
        sq = skv = st.ShardSpec(1, n)
    elif layout == "heads_stride2":
        sq, skv = st.ShardSpec(1, n, stride=2), st.ShardSpec(1, n, stride=2)
    elif layout == "batch":
        sq = skv = st.ShardSpec(0, n)
    elif layout == "q_only":
        sq, skv = st.ShardSpec(1, n), None
    else:
        sq = skv = st.ReplicaSpec()
    tq = st.ShardedTensor.from_global(q, pg, sq)
    tk = k if skv is None else st.ShardedTensor.from_global(k, pg, skv)
    tv = v if skv is None else st.ShardedTensor.from_global(v, pg, skv)
    with st.CommTrace() as trace:
        out = F.scaled_dot_product_attention(tq, tk, tv, **kw)
    fwd = [e.kind for e in trace.events]
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, **kw)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (out.full() * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(out.full(), ref.detach(), rtol=1e-9, atol=1e-10)
    for a, r in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-10)
    return out.spec, fwd


@hs.composite
def attention_cases(draw, world):
    layout = draw(hs.sampled_from(["heads", "heads_stride2", "batch", "q_only", "replica"]))
    hkv = draw(hs.integers(1, 5))
    g = draw(hs.sampled_from([1, 1, 2, 3] if SDPA_GQA else [1]))
    if layout == "heads_stride2":
        hkv = 2 * hkv
    return dict(b=draw(hs.integers(1, 3)), hq=hkv * g, hkv=hkv, l=draw(hs.integers(1, 5)),
                s=draw(hs.integers(1, 5)), d=draw(hs.integers(1, 4)), layout=layout,
                mask_kind=draw(hs.sampled_from(["none", "bool", "heads", "batch"])),
                causal=draw(hs.booleans()), scale=draw(hs.sampled_from([None, 0.3])),
                seed=draw(hs.integers(0, 2**16)))


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_sdpa_matches_serial(world, data):
    c = data.draw(attention_cases(world))
    spec, fwd = run(world, _sdpa, *c.values())[0]
    if c["layout"] in ("heads", "heads_stride2", "q_only"):
        assert spec.is_shard and spec.dim == 1
    if c["layout"] == "batch":
        assert spec == st.ShardSpec(0, world)
    if c["layout"] in ("heads", "heads_stride2", "batch", "replica") and c["hq"] == c["hkv"]:
        assert fwd == []           # heads (or batches) are independent: no communication


NO_GQA = pytest.mark.skipif(not SDPA_GQA, reason="torch < 2.5: sdpa has no enable_gqa")


@NO_GQA
@pytest.mark.parametrize("world", [2, 4])
def test_sdpa_gqa_aligned_heads_is_local(world):
    # 8 query heads, 4 kv heads: every rank's query heads use exactly its kv heads
    spec, fwd = run(world, _sdpa, 2, 8, 4, 3, 3, 2, "heads", "heads", False, None, 0)[0]
    assert spec == st.ShardSpec(1, world) and fwd == []


@NO_GQA
def test_sdpa_gqa_kv_heads_fewer_than_ranks_is_exact():
    spec, fwd = run(4, _sdpa, 1, 4, 2, 3, 3, 2, "heads", "none", True, None, 0)[0]
    assert spec == st.ShardSpec(1, 4) and fwd == ["all_gather", "all_gather"]


def _dropout(rank):
    """Sharded heads draw their dropout masks from per-rank streams; the default generator is
    left in step across ranks."""
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(7)
    q = torch.randn(1, 1, 6, 4).expand(1, n, 6, 4).contiguous()   # every head the same
    t = st.ShardedTensor.from_global(q, pg, st.ShardSpec(1, n))
    out = F.scaled_dot_product_attention(t, t, t, dropout_p=0.5)
    after = torch.rand(3)
    return out.to_local().flatten().tolist(), after.tolist()


def test_sdpa_dropout_per_rank_streams():
    (o0, a0), (o1, a1) = run(2, _dropout)
    assert a0 == a1            # the default generator is untouched and in step
    assert o0 != o1            # the two ranks' heads drew different masks
