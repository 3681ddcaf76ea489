"""Second-order gradients (`create_graph=True`) through the tensor-parallel collectives
(shardtensor/collectives.py) against serial, in float64: gradient penalties w.r.t. the input and
the parameters, Hessian-vector products, through every collective and its conjugate. Before,
every collective's backward refused a graph (NotImplementedError); earlier still the raw
backward collectives gave silently wrong second-order gradients (rel err 0.3-1.1)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs

TOL = 1e-9   # float64


def _full(x):
    return x.full() if isinstance(x, st.ShardedTensor) else x


def _rel(a, b):
    a, b = _full(a).detach(), _full(b).detach()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() if b.numel() else 0.0


# --- each collective and its conjugate: redistributions between nonlinear maps ---------------

def _chain(x, l1, l2, l3, w, pg=None):
    """sum(w * tanh(R23(1.5 * R12(tanh(R01(x)))))) with R the redistributions Replica -> l1 ->
    l2 -> l3 -> Replica (serial when pg is None): every collective sits between nonlinear maps,
    so the second derivative goes through its backward's backward."""
    if pg is None:
        return (w * torch.tanh(1.5 * torch.tanh(x))).sum()
    a = st.ShardedTensor.from_global(x, pg, l1)
    h = torch.tanh(a)                       # keeps a shard's layout; a partial one is reduced
    b = h.redistribute(l2) * 1.5            # linear: a partial l2 stays partial
    c = b.redistribute(l3)
    return (w * _full(torch.tanh(c))).sum()


def _chain_grads(shape, l1, l2, l3, seed, pg=None):
    """(f, d f / d x, a Hessian-vector product, d (f + penalty) / d x) of `_chain`."""
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, v, u = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    f = _chain(x, l1, l2, l3, w, pg)
    (g,) = torch.autograd.grad(f, x, create_graph=True)
    (hvp,) = torch.autograd.grad(g, x, u, retain_graph=True)      # Hessian-vector product
    (f + (v * g * g).sum()).backward()                           # a gradient penalty
    return f.detach(), g.detach(), hvp, x.grad


def _chain_rank(rank, shape, l1, l2, l3, seed):
    return _chain_grads(shape, l1, l2, l3, seed, st.ProcessGroup())


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_redistributions_second_order(world, data):
    """Replica -> l1 -> l2 -> l3 -> Replica over random layouts (shard/replica/partial, strides,
    uneven shards): scatter, gather, partial-from-replica/shard, all-reduce, reduce-scatter,
    all-to-all, each met by a create_graph backward and a double backward."""
    shape = data.draw(shapes(max_dims=3, max_side=7))
    l1 = data.draw(specs(shape, world))
    l2, l3 = data.draw(specs(shape, world)), data.draw(specs(shape, world))
    seed = data.draw(hs.integers(0, 2 ** 16))
    ref = _chain_grads(shape, l1, l2, l3, seed)
    for out in run(world, _chain_rank, shape, l1, l2, l3, seed):
        for what, a, b in zip(("f", "grad", "hvp", "penalty grad"), out, ref):
            assert _rel(a, b) < TOL, (what, _rel(a, b))


# --- (1) (2) a column-then-row MLP: penalties w.r.t. the input and the parameters -------------

ACTS = {"tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}


def _mlp(sizes, act, seed, pg=None, stride=1):
    """Linear(i, h) column parallel (split_row, weight and bias), act, Linear(h, o) row parallel
    (split_col; its bias replicated), float64; serial when pg is None."""
    i, h, o = sizes
    torch.manual_seed(seed)
    fc1 = torch.nn.Linear(i, h).double()
    fc2 = torch.nn.Linear(h, o).double()
    if pg is not None:
        st.split_row(fc1.weight, pg, stride), st.split_row(fc1.bias, pg, stride)
        st.split_col(fc2.weight, pg, stride)
    x = torch.randn(4, i, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, o, dtype=torch.float64)
    return fc1, fc2, x, t, (lambda z: fc2(ACTS[act](fc1(z))))


def _mlp_grads(fc1, fc2, x):
    return [_full(p.grad) for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)] + [x.grad]


def _input_penalty(sizes, act, seed, pg=None, stride=1):
    """loss = mse(mlp(x), t) + ||d loss / d x||^2, backward."""
    fc1, fc2, x, t, mlp = _mlp(sizes, act, seed, pg, stride)
    loss = F.mse_loss(mlp(x), t)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + gx.pow(2).sum()).backward()
    return [_full(gx).detach()] + _mlp_grads(fc1, fc2, x)


def _param_penalty(sizes, act, seed, pg=None, stride=1):
    """loss = mse(mlp(x), t) + sum over parameters of ||d loss / d p||^2, backward."""
    fc1, fc2, x, t, mlp = _mlp(sizes, act, seed, pg, stride)
    loss = F.mse_loss(mlp(x), t)
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    pen = sum(g.pow(2).sum() for g in grads)
    (loss + pen).backward()
    return [_full(g).detach() for g in grads] + _mlp_grads(fc1, fc2, x)


def _backward_penalty(sizes, act, seed, pg=None, stride=1):
    """loss.backward(create_graph=True), then the penalty on the parameters' .grad, backward
    (the gradients accumulate: loss's and the penalty's, as serially)."""
    fc1, fc2, x, t, mlp = _mlp(sizes, act, seed, pg, stride)
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    F.mse_loss(mlp(x), t).backward(create_graph=True)
    first = [_full(p.grad).detach().clone() for p in params]
    sum(p.grad.pow(2).sum() for p in params).backward()
    out = first + _mlp_grads(fc1, fc2, x)
    for p in params + [x]:   # the graph-holding .grad makes a reference cycle: break it
        p.grad = None
    return out


PENALTIES = {"input": _input_penalty, "params": _param_penalty, "backward": _backward_penalty}


def _mlp_rank(rank, which, sizes, act, seed, stride):
    fn = PENALTIES[which]
    with st.CommTrace() as tr:
        out = fn(sizes, act, seed, st.ProcessGroup(), stride)
    return out, sorted({(e.kind, e.phase) for e in tr.events})


@pytest.mark.parametrize("which", sorted(PENALTIES))
@pytest.mark.parametrize("world", WORLDS)
@given(i=hs.integers(1, 6), h=hs.integers(1, 12), o=hs.integers(1, 5),
       act=hs.sampled_from(sorted(ACTS)), stride=hs.sampled_from([1, 2]),
       seed=hs.integers(0, 2 ** 16))
def test_mlp_gradient_penalty(world, which, i, h, o, act, stride, seed):
    """(1) ||d loss / d x||^2 and (2) sum ||d loss / d p||^2 (by autograd.grad, and by
    backward(create_graph=True) and .grad) on a column-then-row MLP (uneven shards included):
    the gradients of loss + penalty w.r.t. every parameter and the input."""
    if h % stride:
        stride = 1
    ref = PENALTIES[which]((i, h, o), act, seed)
    for out, kinds in run(world, _mlp_rank, which, (i, h, o), act, seed, stride):
        for k, (a, b) in enumerate(zip(out, ref)):
            assert _rel(a, b) < TOL, (k, _rel(a, b))
        if world > 1:   # the collectives' conjugates ran in the backward
            assert ("all_reduce", "backward") in kinds, kinds


# --- (3) (4) Hessian-vector products on parallelized HF models --------------------------------
# GPT-2: vocab-parallel embedding tied with the vocab-parallel LM head and cross entropy, fused
# q|k|v (Conv1D, stride 3) column parallel, row-parallel projections; Llama: grouped kv heads,
# rotary embeddings, RMSNorm, gated MLP. Eager attention (sdpa's CPU kernel has no double
# backward, serially either).

def _hvp(model, arch, pg=None):
    """(loss, d loss / d p, H v, d (loss + 0.1 sum ||d loss / d p||^2) / d p) for a seeded v."""
    model.zero_grad()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(5)
    vs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    if pg is not None:
        vs = [st.ShardedTensor.from_global(v, pg, p.spec) if isinstance(p, st.ShardedTensor)
              else v for v, p in zip(vs, params)]
    batch = inputs_for(arch)
    labels = batch.pop("labels")
    logits = model(**batch).logits      # HF's loss runs in float32: this one in float64
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vs))
    hv = torch.autograd.grad(dot, params, retain_graph=True)
    (loss + 0.1 * sum(g.pow(2).sum() for g in grads)).backward()
    return ([_full(loss).detach()], [_full(g).detach() for g in grads], [_full(h) for h in hv],
            [_full(p.grad) for p in params])


def _model_rank(rank, arch):
    pg = st.ProcessGroup()
    model = build(arch, "eager", dtype=torch.float64)
    st.parallelize(model, pg)
    return _hvp(model, arch, pg)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("world", WORLDS)
def test_model_hessian_vector_product(world, arch):
    ref = _hvp(build(arch, "eager", dtype=torch.float64), arch)
    for out in run(world, _model_rank, arch):
        for what, xs, ys in zip(("loss", "grad", "hvp", "penalty grad"), out, ref):
            errs = [_rel(a, b) for a, b in zip(xs, ys)]
            assert len(xs) == len(ys) and max(errs) < TOL, (what, max(errs))


# --- (4) a vocab-parallel embedding and cross entropy: penalties on the embedding output ------

def _vocab_model(V, H, eps, target, seed, pg=None, stride=1):
    """Embedding(V, H) vocab parallel -> tanh -> Linear(H, V) column parallel (logits sharded
    over the vocabulary) -> cross entropy (label smoothing eps; class targets with an ignored
    one, class targets with class weights, or probability targets); loss plus ||d loss / d e||^2
    for the embedding output e (a partial value when sharded) plus the parameters'
    ||d loss / d p||^2."""
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(V, H).double()
    head = torch.nn.Linear(H, V, bias=False).double()
    if pg is not None:
        st.split_row(emb.weight, pg, stride), st.split_row(head.weight, pg, stride)
    ids = torch.randint(0, V, (3, 4))
    labels = torch.randint(0, V, (3, 4))
    labels[0, 1] = -100
    weight = torch.rand(V, dtype=torch.float64) + 0.5 if target == "weighted" else None
    if target == "probs":
        labels = torch.softmax(torch.randn(3, 4, V, dtype=torch.float64), -1)
    e = emb(ids)
    logits = head(torch.tanh(e * 1.0))      # e itself stays a partial value
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), weight,
                           label_smoothing=eps)
    params = [emb.weight, head.weight]
    ge, *gp = torch.autograd.grad(loss, [e] + params, create_graph=True)
    (loss + ge.pow(2).sum() + sum(g.pow(2).sum() for g in gp)).backward()
    return [_full(loss).detach(), _full(ge).detach()] + [_full(p.grad) for p in params]


def _vocab_rank(rank, V, H, eps, target, seed, stride):
    return _vocab_model(V, H, eps, target, seed, st.ProcessGroup(), stride)


@pytest.mark.parametrize("world", WORLDS)
@given(V=hs.integers(3, 13), H=hs.integers(1, 6), eps=hs.sampled_from([0.0, 0.1]),
       target=hs.sampled_from(["classes", "weighted", "probs"]), stride=hs.sampled_from([1, 2]),
       seed=hs.integers(0, 2 ** 16))
def test_vocab_parallel_embedding_and_cross_entropy(world, V, H, eps, target, stride, seed):
    if V % stride:
        stride = 1
    ref = _vocab_model(V, H, eps, target, seed)
    for out in run(world, _vocab_rank, V, H, eps, target, seed, stride):
        for k, (a, b) in enumerate(zip(out, ref)):
            assert _rel(a, b) < TOL, (k, _rel(a, b))


# --- reductions over a sharded dim (softmax, norms, extrema: ExtremumFromRegion) -------------

REDUCTIONS = {
    "softmax": lambda x, d: torch.softmax(x, d),
    "log_softmax": lambda x, d: F.log_softmax(x, d),
    "logsumexp": lambda x, d: torch.logsumexp(x, d, keepdim=True),
    "amax": lambda x, d: x.amax(d, keepdim=True),
    "amin": lambda x, d: torch.amin(x, d, keepdim=True),
    "max": lambda x, d: x.max(d, keepdim=True).values,
    "inf_norm": lambda x, d: torch.linalg.vector_norm(x, float("inf"), d, keepdim=True),
    "norm": lambda x, d: x.norm(dim=d, keepdim=True),
    "var": lambda x, d: x.var(d, keepdim=True),
    "mean": lambda x, d: x.mean(d, keepdim=True),
    "layer_norm": lambda x, d: F.layer_norm(x, x.shape[d:]),   # allreduce_for_shards
    "rms_norm": lambda x, d: F.rms_norm(x, x.shape[d:]),
}


def _reduction(x, q, name, spec, w, pg=None):
    """sum(w * tanh(2 * op(tanh(x)) * q)): x sharded on spec.dim, the reduction's output times
    a parameter q sharded on another dim (replicated for 1-D x): second-order terms reach q
    through the rank that holds an extremum, and through the others."""
    a, qa = x, q
    if pg is not None:
        a = st.ShardedTensor.from_global(x, pg, spec)
        if x.dim() > 1:
            qa = st.ShardedTensor.from_global(q, pg, st.ShardSpec(spec.dim - 1, spec.degree))
    y = REDUCTIONS[name](torch.tanh(a), spec.dim)
    return (w * _full(torch.tanh(y * 2.0 * qa))).sum()


def _reduction_inputs(shape, name, spec, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    oshape = REDUCTIONS[name](x.detach(), spec.dim).shape
    q = torch.randn(oshape, dtype=torch.float64, requires_grad=True)
    return x, q, torch.randn(oshape, dtype=torch.float64)


def _reduction_penalty(shape, name, spec, seed, pg=None):
    x, q, w = _reduction_inputs(shape, name, spec, seed)
    f = _reduction(x, q, name, spec, w, pg)
    gx, gq = torch.autograd.grad(f, (x, q), create_graph=True)
    (f + gx.pow(2).sum() + gq.pow(2).sum()).backward()
    return gx.detach(), gq.detach(), x.grad, q.grad


def _reduction_rank(rank, shape, name, spec, seed):
    return _reduction_penalty(shape, name, spec, seed, st.ProcessGroup())


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_reductions_over_the_sharded_dim(world, data):
    shape = data.draw(shapes(max_dims=3, min_side=2, max_side=7))
    dim = data.draw(hs.integers(0, len(shape) - 1))
    spec = st.ShardSpec(dim, world, data.draw(hs.sampled_from(
        [s for s in (1, 2) if shape[dim] % s == 0])))
    name = data.draw(hs.sampled_from(sorted(REDUCTIONS)))
    seed = data.draw(hs.integers(0, 2 ** 16))
    ref = _reduction_penalty(shape, name, spec, seed)
    for out in run(world, _reduction_rank, shape, name, spec, seed):
        for k, (a, b) in enumerate(zip(out, ref)):
            assert _rel(a, b) < TOL, (k, _rel(a, b))


# --- non-reentrant activation checkpointing ----------------------------------------------------

def _checkpointed_penalty(pg=None):
    from torch.utils.checkpoint import checkpoint
    fc1, fc2, x, t, mlp = _mlp((5, 8, 3), "tanh", 0, pg)
    loss = F.mse_loss(checkpoint(mlp, x, use_reentrant=False), t)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + gx.pow(2).sum()).backward()
    return _mlp_grads(fc1, fc2, x)


def _checkpointed_rank(rank):
    return _checkpointed_penalty(st.ProcessGroup())


@pytest.mark.parametrize("world", WORLDS)
def test_input_penalty_through_non_reentrant_checkpoint(world):
    """The recomputed block's collectives take the double backward too (reentrant checkpoint
    refuses autograd.grad serially; with ShardedTensors its bridge refuses create_graph)."""
    ref = _checkpointed_penalty()
    for out in run(world, _checkpointed_rank):
        for k, (a, b) in enumerate(zip(out, ref)):
            assert _rel(a, b) < TOL, (k, _rel(a, b))
