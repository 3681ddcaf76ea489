"""Loss rules (ops/loss.py): cross_entropy and nll_loss on logits sharded over the class dim
(vocab parallel, never gathered), over a row dim, partial or replicated. Loss and the logits'
gradient equal serial (float64) with ignore_index, label smoothing, class weights, probability
targets and every reduction; CommTrace shows no all_gather."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.spec import take_shard
from shardtensor.testing import assert_close, run
from strategies import WORLDS

ST = st.ShardedTensor


def _loss(rank, name, shape, spec, kw, prob, seed):
    """Serial vs sharded loss; the logits are a leaf shard so the trace holds only the rule's
    own collectives (forward and backward)."""
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64) * 3
    c = 1 if len(shape) > 1 else 0
    C = shape[c]
    if name == "nll_loss":
        x = torch.log_softmax(x, c)
    tshape = tuple(shape[:c]) + tuple(shape[c + 1:])
    if prob:
        target = torch.softmax(torch.randn(shape, dtype=torch.float64), c)
    else:
        target = torch.randint(0, C, tshape)
        if kw.get("ignore_index") is not None and target.numel():
            target[torch.rand(tshape) < 0.3] = kw["ignore_index"]
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, dtype=torch.float64) + 0.5
    fn = getattr(F, name)
    ref_x = x.clone().requires_grad_()
    expect = fn(ref_x, target, **kw)
    if spec.is_shard:
        local = take_shard(x, spec.normalize(shape), pg.tp_local_rank()).clone().requires_grad_()
    else:
        local = (x if spec.is_replicate or rank == 0 else torch.zeros_like(x)).clone()
        local.requires_grad_()
    sx = ST.from_local(local, pg, spec, shape=shape)
    with st.CommTrace() as t:
        out = fn(sx, target, **kw)
    val = out.to_local() if out.spec.is_replicate else out.full()   # (its backward is silent)
    g = torch.randn(expect.shape, dtype=torch.float64)
    with st.CommTrace() as tb:
        (val * g).sum().backward()
    (expect * g).sum().backward()
    assert out.shape == expect.shape
    # (a mean over all-ignored targets is nan, serially too)
    torch.testing.assert_close(val, expect.detach(), rtol=1e-10, atol=1e-10, equal_nan=True,
                               msg=lambda m: f"{name} forward: {m}")
    want = ref_x.grad
    if spec.is_shard:
        want = take_shard(want, spec.normalize(shape), pg.tp_local_rank())
    torch.testing.assert_close(local.grad, want, rtol=1e-10, atol=1e-10, equal_nan=True,
                               msg=lambda m: f"{name} grad: {m}")
    return out.spec, [(e.phase, e.kind) for e in t.events + tb.events]


@hs.composite
def cases(draw, world, name):
    ndim = draw(hs.sampled_from([1, 2, 2, 3]))
    C = draw(hs.integers(1, 11))
    shape = ((draw(hs.integers(1, 5)),) if ndim > 1 else ()) + (C,) + (
        (draw(hs.integers(1, 3)),) if ndim > 2 else ())
    c = 1 if ndim > 1 else 0
    where = draw(hs.sampled_from(["class", "class", "class", "row", "replica", "partial"]))
    if where == "row" and ndim > 1:
        dim = draw(hs.sampled_from([d for d in range(ndim) if d != c]))
        spec = st.ShardSpec(dim, world)
    elif where == "replica":
        spec = st.ReplicaSpec()
    elif where == "partial" and name == "nll_loss":
        spec = st.PartialSpec()
    else:
        stride = draw(hs.sampled_from([s for s in (1, 2, 3) if C % s == 0]))
        spec = st.ShardSpec(c, world, stride)
    prob = name == "cross_entropy" and draw(hs.integers(0, 3)) == 0
    kw = {"reduction": draw(hs.sampled_from(["mean", "sum", "none"]))}
    if not prob and draw(hs.booleans()):
        kw["ignore_index"] = draw(hs.sampled_from([-100, 0]))
    if name == "cross_entropy" and draw(hs.booleans()):
        kw["label_smoothing"] = draw(hs.sampled_from([0.1, 0.25]))
    if draw(hs.booleans()):
        kw["weight"] = True
    return shape, spec, kw, prob


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@given(data=hs.data())
def test_loss_matches_serial(world, name, data):
    shape, spec, kw, prob = data.draw(cases(world, name))
    ospec, events = run(world, _loss, name, shape, spec, kw, prob,
                        data.draw(hs.integers(0, 2**16)))[0]
    assert not any(kind == "all_gather" for _, kind in events), events
    c = 1 if len(shape) > 1 else 0
    if spec.is_shard and spec.dim == c and world > 1:
        if name == "cross_entropy":     # max + stacked sums, forward only; loss replicated
            assert ospec == st.ReplicaSpec()
            assert events == [("forward", "all_reduce")] * 2
        else:                           # linear in the log-probs: a partial loss, no collective
            assert ospec == st.PartialSpec()
            assert events == []


@pytest.mark.parametrize("world", [2, 4])
def test_probability_targets_rows_sharded_after_class_dim(world):
    """reduction='none' with probability targets and logits sharded on a dim after the class
    dim: the per-row loss has no class dim, so its layout is one dim lower (found by hypothesis)."""
    ospec, _ = run(world, _loss, "cross_entropy", (3, 5, 7), st.ShardSpec(2, world),
                   {"reduction": "none"}, True, 0)[0]
    assert ospec == st.ShardSpec(1, world)


def _hf_lm_loss(rank):
    """HF's causal-LM loss: logits (B, S, V) vocab-sharded, view(-1, V), ignore_index -100,
    label smoothing; 13 classes over the ranks (uneven)."""
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    B, S, V = 2, 5, 13
    logits = torch.randn(B, S, V)
    labels = torch.randint(0, V, (B, S))
    labels[0, :2] = -100
    spec = st.ShardSpec(1, pg.tp_world_size())
    local = take_shard(logits.view(-1, V), spec, pg.tp_local_rank()).clone().requires_grad_()
    x = ST.from_local(local, pg, spec, shape=(B * S, V))
    ref = logits.view(-1, V).clone().requires_grad_()
    with st.CommTrace() as t:
        loss = F.cross_entropy(x, labels.view(-1), ignore_index=-100, label_smoothing=0.1)
        loss.backward()
    expect = F.cross_entropy(ref, labels.view(-1), ignore_index=-100, label_smoothing=0.1)
    expect.backward()
    assert_close(loss.to_local(), expect, rtol=1e-5, what="float32 loss")
    assert_close(local.grad, take_shard(ref.grad, spec, pg.tp_local_rank()), rtol=1e-5,
                 what="float32 grad")
    return [(e.phase, e.kind, e.nbytes) for e in t.events]


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy_never_gathers(world):
    events = run(world, _hf_lm_loss)[0]
    # one all-reduce of the per-row max, one of the stacked (sum-exp, target, smoothing) sums:
    # per-row sizes, never the logits' (10 rows x 13 classes)
    assert [e[:2] for e in events] == [("forward", "all_reduce")] * 2
    assert events[0][2] == 10 * 4 and events[1][2] == 3 * 10 * 4


def _bad_target(rank):
    pg = st.ProcessGroup()
    x = ST.from_global(torch.randn(3, 4), pg, st.ShardSpec(1, pg.tp_world_size()))
    try:
        F.cross_entropy(x, torch.tensor([0, 4, 1]))
    except IndexError as e:
        return str(e)


def test_out_of_range_target_raises():
    assert "out of bounds" in run(2, _bad_target)[0]


# pointwise losses (ops/loss.py pointwise_loss): distillation's KL on vocab-sharded logits, MSE,
# BCE with logits (pos_weight over the class dim), ... with every reduction
POINTWISE = {
    "kl_div": lambda a, b, r: F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1),
                                       reduction="batchmean" if r == "mean" else r),
    "kl_div log_target": lambda a, b, r: F.kl_div(a, b, reduction=r, log_target=True),
    "mse_loss": lambda a, b, r: F.mse_loss(a, b, reduction=r),
    "l1_loss": lambda a, b, r: F.l1_loss(a, b, reduction=r),
    "smooth_l1_loss": lambda a, b, r: F.smooth_l1_loss(a, b, reduction=r, beta=0.5),
    "huber_loss": lambda a, b, r: F.huber_loss(a, b, reduction=r, delta=0.7),
    "bce_with_logits": lambda a, b, r: F.binary_cross_entropy_with_logits(
        a, b.sigmoid(), reduction=r,
        pos_weight=torch.linspace(0.5, 2.0, a.shape[-1], dtype=torch.float64)),
    "binary_cross_entropy": lambda a, b, r: F.binary_cross_entropy(a.sigmoid(), b.sigmoid(),
                                                                   reduction=r),
    "poisson_nll_loss": lambda a, b, r: F.poisson_nll_loss(a, b.exp(), reduction=r),
}


def _pointwise(rank, name, shape, xspec, tspec, reduction, seed):
    from ops.test_elementwise import make
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(shape, dtype=torch.float64, generator=g)
    w = torch.randn(shape, dtype=torch.float64, generator=g)
    sx, stt = make(x, xspec, pg, rank, seed), make(t, tspec, pg, rank, seed + 1)
    out = POINTWISE[name](sx, stt, reduction)
    val = out.full() if isinstance(out, st.ShardedTensor) else out
    (val * w).sum().backward() if reduction == "none" else val.backward()
    return val.detach(), x.grad


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_pointwise_losses_match_serial(world, data):
    from strategies import shapes, specs
    shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=7))
    name = data.draw(hs.sampled_from(sorted(POINTWISE)))
    xspec = data.draw(specs(shape, world))
    tspec = data.draw(hs.one_of(hs.none(), hs.just(xspec), specs(shape, world)))
    reduction = data.draw(hs.sampled_from(["none", "mean", "sum"]))
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _pointwise, name, shape, xspec, tspec, reduction, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(shape, dtype=torch.float64, generator=g)
    w = torch.randn(shape, dtype=torch.float64, generator=g)
    ref = POINTWISE[name](x, t, reduction)
    (ref * w).sum().backward() if reduction == "none" else ref.backward()
    grads = [gr for _, gr in res]
    if xspec.normalize(shape).is_partial:
        grads = grads[:1]    # rank 0's summand holds x
    for val, _ in res:
        torch.testing.assert_close(val, ref.detach(), msg=name)
    for gr in grads:
        torch.testing.assert_close(gr, x.grad, msg=name)
