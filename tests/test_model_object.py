"""What users do to a parallelized model object itself, next to the same on the serial model:
move it to the meta device and back (`to("meta")`, `to_empty`, then load or re-initialise),
`share_memory()`, assign `.data` (`vector_to_parameters`, `p.data = full_weight`), register
full backward hooks on its modules, and initialise sharded weights with the `nn.init` functions
that work on the global matrix (`orthogonal_`, `eye_`, which use QR and in-place transposes)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run
from strategies import WORLDS


def _v(x):
    return (x.full() if isinstance(x, st.ShardedTensor) else x).detach().double()


def _f(x):
    return x.full() if isinstance(x, st.ShardedTensor) else x


def _rel(a, b) -> float:
    a, b = _v(a), _v(b)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(),
                         nn.Linear(8, 6)).to(dtype)


def _par(m, pg):
    """Megatron's MLP split (0 column-, 2 row-parallel), the last layer replicated."""
    st.split_row(m[0].weight, pg)
    st.split_row(m[0].bias, pg)
    st.split_col(m[2].weight, pg)
    for p in (m[2].bias, m[4].weight, m[4].bias):
        st.replicate(p, pg)
    return m


def _x(dtype=torch.float32):
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)


def _layouts(m):
    return [(type(p).__name__, p.spec if isinstance(p, st.ShardedTensor) else None)
            for p in m.parameters()]


def _train(models, steps=2, dtype=torch.float32):
    """SGD steps on each model with the same batch; the outputs of the last forward."""
    x = _x(dtype)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    outs = None
    for _ in range(steps):
        outs = []
        for m, o in zip(models, opts):
            o.zero_grad()
            y = m(x)
            _f(y).pow(2).sum().backward()
            o.step()
            outs.append(y)
    return outs


# --- to("meta") / to_empty / load or re-initialise --------------------------------------------

def _meta_round_trip(rank, built_on_meta):
    pg = st.ProcessGroup()
    serial = _mlp(torch.float64)
    if built_on_meta:
        with torch.device("meta"):
            model = _mlp(torch.float64)
        _par(model, pg)
    else:
        model = _par(_mlp(torch.float64), pg)
        model.to("meta")
    expect = _layouts(_par(_mlp(torch.float64), pg))
    on_meta = [(p.is_meta, p.to_local().is_meta, tuple(p.shape)) for p in model.parameters()]
    model.to_empty(device="cpu")
    after_empty = (_layouts(model), [(p.device.type, p.to_local().device.type)
                                     for p in model.parameters()])
    model.load_state_dict(serial.state_dict(), strict=True)
    loaded = max(_rel(p, q) for p, q in zip(model.parameters(), serial.parameters()))
    out = _train((serial, model), dtype=torch.float64)
    trained = (_rel(out[1], out[0]),
               max(_rel(p, q) for p, q in zip(model.parameters(), serial.parameters())))
    # re-initialised after to_empty under the same seed as serial
    model.to("meta").to_empty(device="cpu")
    torch.manual_seed(4)
    for mod in serial:
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    torch.manual_seed(4)
    for mod in model:
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    reinit = all(torch.equal(_v(p), _v(q)) for p, q in zip(model.parameters(), serial.parameters()))
    return expect, on_meta, after_empty, loaded, trained, reinit, _layouts(model)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("built_on_meta", [False, True])
def test_meta_device_round_trip_stays_sharded_and_loads(world, built_on_meta):
    """model.to("meta") crashed in the `.data` setter (a shard cannot take a meta tensor's
    data: torch gives the module a new Parameter there, as serially); to_empty of a model built
    on the meta device crashed the same way."""
    for expect, on_meta, after_empty, loaded, (out, trained), reinit, final in \
            run(world, _meta_round_trip, built_on_meta):
        assert all(a and b for a, b, _ in on_meta)
        assert after_empty[0] == expect and final == expect
        assert all(d == ("cpu", "cpu") for d in after_empty[1])
        assert loaded == 0.0
        assert out < 1e-12 and trained < 1e-12
        assert reinit


def _hf_meta(rank, arch):
    pg = st.ProcessGroup()
    serial = build(arch, "sdpa")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    sd = serial.state_dict()
    for m in (serial, model):   # (the move unties tied weights, serially too: tie again)
        m.to("meta")
        m.to_empty(device="cpu")
        m.load_state_dict(sd)
        m.tie_weights()
    batch = inputs_for(arch)
    ls, lm = serial(**batch).loss, model(**batch).loss
    ls.backward()
    lm.backward()
    g = max(_rel(p.grad, q.grad) for p, q in zip(model.parameters(), serial.parameters()))
    sharded = sum(isinstance(p, st.ShardedTensor) and p.spec.is_shard for p in model.parameters())
    return _rel(lm, ls), g, sharded


@pytest.mark.parametrize("world", [2, 4])
def test_hf_model_to_meta_and_back(world):
    for loss, grad, sharded in run(world, _hf_meta, "gpt2"):
        assert loss < 1e-5 and grad < 1e-4
        assert sharded > 0


# --- share_memory ---------------------------------------------------------------------------

def _share(rank):
    pg = st.ProcessGroup()
    serial, model = _mlp(), _par(_mlp(), pg)
    expect = _layouts(model)
    params = list(model.parameters())
    model.share_memory()
    serial.share_memory()
    same = all(a is b for a, b in zip(params, model.parameters()))
    shared = [(p.is_shared(), p.to_local().is_shared(), p.is_pinned()) for p in model.parameters()]
    out = _train((serial, model))
    return same, expect == _layouts(model), shared, _rel(out[1], out[0]), \
        max(_rel(p, q) for p, q in zip(model.parameters(), serial.parameters()))


@pytest.mark.parametrize("world", WORLDS)
def test_share_memory_keeps_the_sharded_parameters(world):
    """model.share_memory() raised UnsupportedOpError (Tensor.share_memory_ had no rule) and
    p.is_pinned() reached __torch_dispatch__."""
    for same, layouts, shared, out, params in run(world, _share):
        assert same and layouts
        assert all(s == (True, True, False) for s in shared), shared
        assert out < 1e-5 and params < 1e-5


# --- .data assignment --------------------------------------------------------------------------

def _data(rank):
    pg = st.ProcessGroup()
    serial, model = _mlp(), _par(_mlp(), pg)
    params = list(model.parameters())
    expect = _layouts(model)
    res = {}
    # torch's own utility: p.data = vec[i:j].view_as(p).data for every parameter
    vec = torch.nn.utils.parameters_to_vector(serial.parameters()).detach() * 1.5
    res["to_vector"] = _rel(torch.nn.utils.parameters_to_vector(model.parameters()),
                            torch.nn.utils.parameters_to_vector(serial.parameters()))
    torch.nn.utils.vector_to_parameters(vec, model.parameters())
    torch.nn.utils.vector_to_parameters(vec.clone(), serial.parameters())   # (.data aliases)
    res["from_vector"] = max(_rel(p, q) for p, q in zip(model.parameters(), serial.parameters()))
    # p.data = a full plain tensor (the shard is copied: the full tensor is not kept alive)
    full = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    model[0].weight.data = full
    serial[0].weight.data = full.clone()
    w = model[0].weight
    res["full"] = (_rel(w, full), w.to_local().is_contiguous(),
                   w.spec.is_replicate or w.to_local().untyped_storage().data_ptr()
                   != full.untyped_storage().data_ptr())
    # p.data = a ShardedTensor laid out otherwise (redistributed), and another dtype
    other = st.ShardedTensor.from_global(full * 2, pg, st.ReplicaSpec())
    model[0].weight.data = other
    serial[0].weight.data = full * 2
    model[2].weight.data = serial[2].weight.detach().double()
    serial[2].weight.data = serial[2].weight.detach().double()
    res["other"] = (_rel(model[0].weight, serial[0].weight), model[2].weight.dtype,
                    model[2].weight.to_local().dtype)
    model[2].weight.data = model[2].weight.data.float()
    serial[2].weight.data = serial[2].weight.data.float()
    # a tensor of another shape: refused, naming both shapes, nothing changed
    before = _v(model[0].weight)
    try:
        model[0].weight.data = torch.zeros(3, 8)
        res["bad"] = None
    except st.ShardingError as e:
        res["bad"] = (str(e), torch.equal(before, _v(model[0].weight)))
    same = all(a is b for a, b in zip(params, model.parameters()))
    out = _train((serial, model))
    res["trained"] = (_rel(out[1], out[0]),
                      max(_rel(p, q) for p, q in zip(model.parameters(), serial.parameters())))
    return res, same, expect == _layouts(model)


@pytest.mark.parametrize("world", WORLDS)
def test_data_assignment_takes_full_tensors_and_keeps_the_layout(world):
    """`p.data = plain full tensor` raised ShardingError, so torch's vector_to_parameters could
    not load a parallelized model; now the shard takes this rank's piece (like copy_)."""
    for res, same, layouts in run(world, _data):
        assert same and layouts
        assert res["to_vector"] == 0.0 and res["from_vector"] == 0.0
        assert res["full"] == (0.0, True, True)
        assert res["other"] == (0.0, torch.float64, torch.float64)
        msg, unchanged = res["bad"]
        assert "(3, 8)" in msg and "(12, 8)" in msg and unchanged
        assert res["trained"][0] < 1e-5 and res["trained"][1] < 1e-5


# --- full backward hooks -------------------------------------------------------------------------

def _hooked(rank, x_grad):
    pg = st.ProcessGroup()
    x = _x().requires_grad_(x_grad)
    runs = []
    for sharded in (False, True):
        m = _par(_mlp(), pg) if sharded else _mlp()
        seen = []

        def hook(mod, gin, gout):
            seen.append(("hook", [None if g is None else (type(g).__name__, tuple(g.shape), _v(g))
                                  for g in gin],
                         [(type(g).__name__, tuple(g.shape), _v(g)) for g in gout]))
            if gin[0] is not None:
                return (gin[0] * 2,)

        def pre(mod, gout):
            seen.append(("pre", [(type(g).__name__, tuple(g.shape), _v(g)) for g in gout]))
            return (gout[0] * 3,)
        for i in (0, 2, 4):
            m[i].register_full_backward_hook(hook)
            m[i].register_full_backward_pre_hook(pre)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "no inputs require gradients" (serial too)
            _f(m(x)).pow(2).sum().backward()
        runs.append((seen, [_v(p.grad) for p in m.parameters()],
                     None if x.grad is None else x.grad.clone()))
        x.grad = None
    (s_seen, s_grads, s_x), (m_seen, m_grads, m_x) = runs
    kinds, shapes, worst = [], [], 0.0
    for a, b in zip(s_seen, m_seen):
        kinds.append((a[0], b[0]))
        for ga, gb in zip(sum(a[1:], []), sum(b[1:], [])):
            if ga is None or gb is None:
                shapes.append((ga, gb))
                continue
            shapes.append((ga[1], gb[1]))
            kinds.append((ga[0], gb[0]))
            worst = max(worst, ((ga[2] - gb[2]).abs().max() / ga[2].abs().max()).item())
    grads = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(m_grads, s_grads))
    xg = None if s_x is None else ((m_x - s_x).abs().max() / s_x.abs().max()).item()
    return len(s_seen), len(m_seen), kinds, shapes, worst, grads, xg


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("x_grad", [True, False])
def test_full_backward_hooks_see_global_gradients(world, x_grad):
    """register_full_backward_hook / _pre_hook on a module with sharded tensors raised 'Error
    while setting up backward hooks' (torch's BackwardHookFunction ran on the wrappers while
    the rules answer grad_fn from the shard). Now the hooks see the gradients as ShardedTensors
    of the global shapes, with serial's values, and what they return replaces them."""
    for n_s, n_m, kinds, shapes, worst, grads, xg in run(world, _hooked, x_grad):
        assert n_s == n_m == 6
        # sharded modules hand ShardedTensors (plain x's gradient stays plain, as serially)
        assert all(a == b or (a == "Tensor" and b == "ShardedTensor") for a, b in kinds), kinds
        assert all(a == b for a, b in shapes), shapes
        assert worst < 1e-5 and grads < 1e-5
        assert (xg is None) == (not x_grad) and (xg is None or xg < 1e-5)


def _hf_hooked(rank):
    pg = st.ProcessGroup()
    serial = build("llama", "sdpa")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    batch = inputs_for("llama")
    res = []
    for m in (serial, model):
        seen = []
        mlp = m.model.layers[0].mlp
        mlp.register_full_backward_hook(
            lambda mod, gin, gout: seen.append((tuple(gin[0].shape), _v(gin[0]), _v(gout[0]))))
        m(**batch).loss.backward()
        res.append((seen, [p.grad for p in m.parameters()]))
    (s_seen, s_grads), (m_seen, m_grads) = res
    shapes = [(a[0], b[0]) for a, b in zip(s_seen, m_seen)]
    worst = max(max(_rel(b[1], a[1]), _rel(b[2], a[2])) for a, b in zip(s_seen, m_seen))
    return shapes, worst, max(_rel(p, q) for p, q in zip(m_grads, s_grads))


@pytest.mark.parametrize("world", [2, 4])
def test_full_backward_hook_on_a_parallelized_hf_block(world):
    for shapes, worst, grads in run(world, _hf_hooked):
        assert shapes and all(a == b for a, b in shapes)
        assert worst < 1e-4 and grads < 1e-4


def _deprecated_hook(rank):
    pg = st.ProcessGroup()
    out = []
    for sharded in (False, True):
        m = _par(_mlp(), pg) if sharded else _mlp()
        calls = []
        for i in (0, 2, 4):
            m[i].register_backward_hook(lambda mod, gin, gout: calls.append(len(gout)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _f(m(_x())).pow(2).sum().backward()
        ours = [str(w.message) for w in caught if "shardtensor" in str(w.message)]
        out.append((len(calls), ours, [_v(p.grad) for p in m.parameters()]))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_deprecated_backward_hook_warns_that_it_sees_shards(world):
    """The deprecated register_backward_hook sat on the shard's last autograd node and saw its
    local gradients (shard shapes at tp > 1) without a word, where register_full_backward_hook
    sees the global ones. It still runs, and now warns, naming the full hook."""
    for (n_s, w_s, g_s), (n_m, w_m, g_m) in run(world, _deprecated_hook):
        assert n_s == n_m == 3 and w_s == []
        assert len(w_m) == 3 and all("Linear.register_backward_hook" in w and
                                     "register_full_backward_hook" in w for w in w_m), w_m
        assert max(_rel(a, b) for a, b in zip(g_m, g_s)) < 1e-5


# --- nn.init on the global matrix ----------------------------------------------------------------

INITS = {
    "orthogonal_": nn.init.orthogonal_,
    "orthogonal_(gain)": lambda t: nn.init.orthogonal_(t, gain=0.5),
    "eye_": nn.init.eye_,
    "t_": lambda t: t.t_(),
    "transpose_": lambda t: t.transpose_(0, -1),
}


def _init(rank, name, shape, dim):
    pg = st.ProcessGroup()
    torch.manual_seed(3)
    ref = INITS[name](torch.randn(shape, dtype=torch.float64))
    after_ref = torch.rand(3)
    torch.manual_seed(3)
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    st.shard_param(p, pg, st.ShardSpec(dim, pg.tp_world_size()))
    with torch.no_grad():
        out = INITS[name](p)
    after = torch.rand(3)
    return (out is p, isinstance(p, nn.Parameter), tuple(p.shape) == tuple(ref.shape),
            p.spec.is_shard, torch.equal(_v(p), ref), torch.equal(after, after_ref))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name,shape", [("orthogonal_", (10, 6)), ("orthogonal_", (5, 9)),
                                        ("orthogonal_(gain)", (6, 2, 3)), ("eye_", (7, 5)),
                                        ("eye_", (4, 9)), ("t_", (6, 9)),
                                        ("transpose_", (4, 3, 5))])
def test_global_matrix_inits_equal_serial(world, name, shape):
    """nn.init.orthogonal_ and eye_ raised UnsupportedOpError on a sharded weight (linalg.qr,
    torch.eye(out=), Tensor.t_ had no rule). Values now equal serial's under the same seed and
    every rank's generator stays in step with serial's."""
    for dim in range(len(shape)):
        for r in run(world, _init, name, shape, dim):
            assert r == (True,) * 6, (dim, r)



def _transpose_registered_copy(rank, name):
    """t_/transpose_ of a copy standing for a view (x.view(4, 6) of a column-sharded (6, 4): the
    shards cannot present it, so it is a copy registered, by weak reference, to write back)."""
    pg = st.ProcessGroup()
    full = torch.arange(24, dtype=torch.float64).reshape(6, 4)
    x = st.ShardedTensor.from_global(full, pg, st.ShardSpec(1, pg.tp_world_size()))
    v = x.view(4, 6)
    before = (tuple(v.shape), tuple(v._local.shape), v.spec, _v(v).clone())
    try:
        INITS[name](v)
        err = ""
    except st.UnsupportedOpError as e:
        err = str(e)
    after = (tuple(v.shape), tuple(v._local.shape), v.spec, _v(v).clone())
    return err, before[:3] == after[:3] and torch.equal(before[3], after[3]), \
        torch.equal(_v(x), full)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["t_", "transpose_"])
def test_transposing_a_registered_view_copy_in_place_is_refused_changing_nothing(world, name):
    """swap_tensors refuses a weakly referenced tensor, and it did so after the shard had been
    transposed in place: a RuntimeError ('Cannot swap t1 because it has weakref ...') left the
    copy with a transposed shard under the untransposed global shape and layout (its values
    garbled). Now refused first, naming the op, layout and the out-of-place form."""
    for err, unchanged, base_kept in run(world, _transpose_registered_copy, name):
        assert name in err and "ShardSpec" in err and ".t()" in err, err
        assert unchanged and base_kept


def _qr(rank, shape, dim, mode):
    pg = st.ProcessGroup()
    a = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = a.clone().requires_grad_()
    q, r = torch.linalg.qr(x, mode=mode)
    (q.sum() + r.pow(2).sum()).backward()
    y = st.ShardedTensor.from_global(a.clone(), pg, st.ShardSpec(dim, pg.tp_world_size()))
    y.requires_grad_()
    with st.CommTrace() as trace:
        qs, rs = torch.linalg.qr(y, mode=mode)
    (_f(qs).sum() + _f(rs).pow(2).sum()).backward()
    kinds = {e.kind for e in trace.events}
    return (torch.equal(_v(qs), q.detach().double()), torch.equal(_v(rs), r.detach().double()),
            _rel(y.grad, x.grad), qs.spec.is_replicate, kinds)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shape,mode", [((7, 4), "reduced"), ((4, 7), "reduced"),
                                        ((4, 6), "complete")])
def test_qr_of_a_sharded_matrix_is_serials(world, shape, mode):
    for dim in (0, 1):
        for q, r, g, rep, kinds in run(world, _qr, shape, dim, mode):
            assert q and r and rep and g < 1e-12
            assert kinds <= {"all_gather"}


# --- resize_token_embeddings after parallelize: a clear error, nothing changed -------------------

def _resize_after(rank, arch):
    pg = st.ProcessGroup()
    serial = build(arch, "sdpa")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    batch = inputs_for(arch)
    try:
        model.resize_token_embeddings(70, mean_resizing=False)
        msg = None
    except st.UnsupportedOpError as e:
        msg = str(e)
    emb = model.get_input_embeddings().weight
    return (msg, tuple(emb.shape), emb.spec.is_shard, model.config.vocab_size,
            _rel(model(**batch).loss, serial(**batch).loss))


@pytest.mark.parametrize("world", [2, 4])
def test_resize_token_embeddings_after_parallelize_names_the_fix(world):
    """The error said only 'writing a sharded value into a plain tensor is not supported',
    naming neither the op, the layout, nor the known limit (resize before parallelize)."""
    for msg, shape, sharded, vocab, loss in run(world, _resize_after, "gpt2"):
        assert msg is not None and "Tensor.__setitem__" in msg and "ShardSpec(dim=0" in msg
        assert "resize_token_embeddings" in msg and "before shardtensor.parallelize" in msg
        assert shape == (61, 32) and sharded and vocab == 61 and loss < 1e-5


# --- torch.func over a parallelized model ---------------------------------------------------------

def _func_grad(rank):
    pg = st.ProcessGroup()
    serial, model = _mlp(), _par(_mlp(), pg)
    x = _x()

    def loss(m):
        return lambda params: _f(torch.func.functional_call(m, params, (x,))).pow(2).sum()
    # plain full parameters in place of the sharded ones: the model runs serially, any transform
    plain = {k: v.detach() for k, v in serial.named_parameters()}
    ref = torch.func.grad(loss(serial))(plain)
    got = torch.func.grad(loss(model))(plain)
    plain_err = max(_rel(got[k], ref[k]) for k in ref)
    try:
        torch.func.grad(loss(model))(dict(model.named_parameters()))
        msg = None
    except RuntimeError as e:
        msg = str(e)
    return plain_err, msg


@pytest.mark.parametrize("world", [1, 2])
def test_torch_func_transforms_name_themselves(world):
    """torch.func.grad over sharded parameters reached __torch_dispatch__ with 'please report
    this': the message now says torch.func transforms run below the rules and what to use."""
    for plain_err, msg in run(world, _func_grad):
        assert plain_err < 1e-6
        assert msg is not None and "torch.func transforms" in msg and "autograd.grad" in msg


def _vmap_replicated(rank):
    """transformers 4.x's causal mask: vmap of `kv_idx <= q_idx` over a cache_position that
    assisted decoding computed from vocab-sharded logits (`n_matches`), so a replicated
    ShardedTensor; it reached __torch_dispatch__ and raised."""
    pg = st.ProcessGroup()
    logits = torch.randn(2, 61, generator=torch.Generator().manual_seed(0))
    sharded = st.ShardedTensor.from_global(logits, pg, st.ShardSpec(1, pg.tp_world_size()))
    n_matches = (sharded.argmax(-1) == logits.argmax(-1)).sum()
    position = torch.arange(3) + n_matches
    mask = torch.vmap(torch.vmap(lambda q, k: k <= q, in_dims=(None, 0)), in_dims=(0, None))
    got = mask(position, torch.arange(8))
    ref = mask(torch.arange(3) + 2, torch.arange(8))
    refused = []
    for f, x in ((lambda v: v * 2, sharded), (lambda v: v.add_(1), position)):
        try:                          # a shard, and a write into a replicated value
            torch.vmap(f)(x)
        except RuntimeError as e:
            refused.append("torch.func transforms" in str(e))
    return (isinstance(position, st.ShardedTensor) and position.spec.is_replicate,
            torch.equal(got, ref), refused)


@pytest.mark.parametrize("world", [2, 4])
def test_vmap_over_replicated_values_runs_as_serial(world):
    for replicated, equal, refused in run(world, _vmap_replicated):
        assert replicated and equal
        assert refused == [True, True]
